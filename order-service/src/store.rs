//! SQL for orders and their history.

use chrono::{DateTime, Utc};
use events::{CorrelationId, Envelope, FailureReason, LineItem, OrderId};
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::domain::NewOrder;

#[derive(Debug, sqlx::FromRow)]
pub struct OrderRow {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: String,
    pub failure_reason: Option<String>,
    pub items: Json<Vec<LineItem>>,
    pub total_minor: i64,
    pub correlation_id: String,
    pub trace_id: Option<String>,
    pub refunded: bool,
    pub request_fingerprint: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, sqlx::FromRow)]
pub struct HistoryRow {
    pub event_id: Uuid,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

const ORDER_COLUMNS: &str = "order_id, customer_id, status, failure_reason, items, total_minor, \
     correlation_id, trace_id, refunded, request_fingerprint, created_at, updated_at";

pub struct Insert<'a> {
    pub id: OrderId,
    pub order: &'a NewOrder,
    pub correlation_id: &'a CorrelationId,
    pub trace_id: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
}

/// Inserts a PENDING order. `false` when the idempotency key is taken.
pub async fn insert(conn: &mut PgConnection, new: Insert<'_>) -> Result<bool, sqlx::Error> {
    let fingerprint = new.idempotency_key.map(|_| new.order.fingerprint());
    let inserted = sqlx::query(
        "INSERT INTO orders (order_id, customer_id, status, items, total_minor, correlation_id,
                             trace_id, idempotency_key, request_fingerprint)
         VALUES ($1, $2, 'PENDING', $3, $4, $5, $6, $7, $8)
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(new.id.as_uuid())
    .bind(new.order.customer_id.as_str())
    .bind(Json(&new.order.items))
    .bind(new.order.total.minor())
    .bind(new.correlation_id.as_str())
    .bind(new.trace_id)
    .bind(new.idempotency_key)
    .bind(fingerprint)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

pub async fn find<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

pub async fn find_by_idempotency_key<'e>(
    db: impl PgExecutor<'e>,
    key: &str,
) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE idempotency_key = $1"
    ))
    .bind(key)
    .fetch_optional(db)
    .await
}

pub async fn history<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
) -> Result<Vec<HistoryRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, event_type, occurred_at, recorded_at, data
         FROM order_history WHERE order_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(db)
    .await
}

/// Appends `events` to their orders' history.
pub async fn record_history(
    conn: &mut PgConnection,
    events: &[&Envelope],
) -> Result<(), sqlx::Error> {
    let mut order_ids = Vec::with_capacity(events.len());
    let mut event_ids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut times = Vec::with_capacity(events.len());
    let mut data = Vec::with_capacity(events.len());
    for e in events {
        order_ids.push(e.order_id.as_uuid());
        event_ids.push(e.event_id);
        types.push(e.event_type());
        times.push(e.occurred_at);
        let v = serde_json::to_value(&e.event).map_err(|err| sqlx::Error::Encode(Box::new(err)))?;
        data.push(v.get("data").cloned().unwrap_or(serde_json::Value::Null));
    }
    sqlx::query(
        "INSERT INTO order_history (order_id, event_id, event_type, occurred_at, data)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::jsonb[])",
    )
    .bind(&order_ids)
    .bind(&event_ids)
    .bind(&types)
    .bind(&times)
    .bind(&data)
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks the order for the rest of the transaction; returns its status and total.
pub async fn lock(
    conn: &mut PgConnection,
    id: OrderId,
) -> Result<Option<(String, i64, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, total_minor, created_at FROM orders WHERE order_id = $1 FOR UPDATE",
    )
    .bind(id.as_uuid())
    .fetch_optional(conn)
    .await
}

pub async fn confirm(conn: &mut PgConnection, id: OrderId) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE orders SET status = 'CONFIRMED', updated_at = now() WHERE order_id = $1")
        .bind(id.as_uuid())
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn fail(
    conn: &mut PgConnection,
    id: OrderId,
    reason: FailureReason,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE orders SET status = 'FAILED', failure_reason = $2, updated_at = now() WHERE order_id = $1")
        .bind(id.as_uuid())
        .bind(reason.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn touch(
    conn: &mut PgConnection,
    id: OrderId,
    refunded: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE orders SET refunded = refunded OR $2, updated_at = now() WHERE order_id = $1",
    )
    .bind(id.as_uuid())
    .bind(refunded)
    .execute(conn)
    .await?;
    Ok(())
}
