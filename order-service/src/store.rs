//! SQL for orders and their history.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use events::{CorrelationId, Envelope, LineItem, Money, OrderId};
use saga_runtime::outbox::Prepared;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::domain::{NewOrder, OrderState, OrderStatus};

#[derive(Debug, sqlx::FromRow)]
pub struct OrderRow {
    pub order_id: Uuid,
    pub customer_id: String,
    #[sqlx(try_from = "String")]
    pub status: OrderStatus,
    pub failure_reason: Option<String>,
    pub items: Json<Vec<LineItem>>,
    pub total_minor: i64,
    pub correlation_id: String,
    pub trace_id: Option<String>,
    pub refunded: bool,
    pub stock_released: bool,
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
     correlation_id, trace_id, refunded, stock_released, request_fingerprint, created_at, updated_at";

/// A PENDING order to insert, as stored.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub id: Uuid,
    pub customer_id: String,
    pub items: serde_json::Value,
    pub total_minor: i64,
    pub correlation_id: String,
    pub trace_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// Normalised request body, compared when the key is used again.
    pub request_fingerprint: Option<String>,
}

impl NewRow {
    pub fn new(
        id: OrderId,
        order: &NewOrder,
        correlation_id: &CorrelationId,
        trace_id: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: id.as_uuid(),
            customer_id: order.customer_id.as_str().to_owned(),
            items: serde_json::to_value(&order.items)?,
            total_minor: order.total.minor(),
            correlation_id: correlation_id.as_str().to_owned(),
            trace_id: trace_id.map(str::to_owned),
            idempotency_key: idempotency_key.map(str::to_owned),
            request_fingerprint: idempotency_key.map(|_| order.fingerprint()),
        })
    }
}

/// The statement [`create`] runs.
static CREATE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH new AS (
             INSERT INTO orders (order_id, customer_id, status, items, total_minor, correlation_id,
                                 trace_id, idempotency_key, request_fingerprint)
             SELECT o.order_id, o.customer_id, 'PENDING', o.items, o.total_minor, o.correlation_id,
                    o.trace_id, o.idempotency_key, o.request_fingerprint
             FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::bigint[], $5::text[], $6::text[],
                         $7::text[], $8::text[])
                  AS o(order_id, customer_id, items, total_minor, correlation_id, trace_id,
                       idempotency_key, request_fingerprint)
             ON CONFLICT (customer_id, idempotency_key) DO NOTHING
             RETURNING order_id),
         history AS (
             INSERT INTO order_history (order_id, event_id, event_type, occurred_at, data)
             SELECT h.* FROM unnest($9::uuid[], $10::uuid[], $11::text[], $12::timestamptz[], $13::jsonb[])
                  AS h(order_id, event_id, event_type, occurred_at, data)
             WHERE h.order_id IN (SELECT order_id FROM new)
             ON CONFLICT (order_id, event_id) DO NOTHING),
         events AS ({} {})
         SELECT order_id, NULL::bigint, NULL::uuid, NULL::bool FROM new
         UNION ALL SELECT NULL, id, event_id, behind FROM events",
        Prepared::insert(14, Some("SELECT order_id FROM new")),
        Prepared::RETURNING
    )
});

/// One row of [`create`]'s answer: an inserted order's ID, or an outbox
/// row's `(id, event_id, behind)`.
type Written = (Option<Uuid>, Option<i64>, Option<Uuid>, Option<bool>);

/// What [`create`] wrote.
#[derive(Debug, Default)]
pub struct Created {
    /// Orders inserted: those whose idempotency key was free (an order
    /// whose key is taken, even by an earlier row of the same call, is
    /// left out).
    pub orders: HashSet<Uuid>,
    /// The outbox rows written, `(id, event_id, behind)`: only inserted
    /// orders' events.
    pub events: Vec<(i64, Uuid, bool)>,
}

/// Inserts PENDING orders, their `created` history and their outbox rows in
/// one statement, so one round trip and one implicit transaction: an order
/// whose idempotency key is taken gets neither history nor event.
pub async fn create<'e>(
    db: impl PgExecutor<'e>,
    rows: &[&NewRow],
    created: &[&Envelope],
    events: &Prepared,
) -> Result<Created, sqlx::Error> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let customers: Vec<&str> = rows.iter().map(|r| r.customer_id.as_str()).collect();
    let items: Vec<&serde_json::Value> = rows.iter().map(|r| &r.items).collect();
    let totals: Vec<i64> = rows.iter().map(|r| r.total_minor).collect();
    let correlations: Vec<&str> = rows.iter().map(|r| r.correlation_id.as_str()).collect();
    let traces: Vec<Option<&str>> = rows.iter().map(|r| r.trace_id.as_deref()).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.idempotency_key.as_deref()).collect();
    let prints: Vec<Option<&str>> = rows
        .iter()
        .map(|r| r.request_fingerprint.as_deref())
        .collect();
    let h = History::of(created)?;
    let query = sqlx::query_as(CREATE.as_str())
        .bind(&ids)
        .bind(&customers)
        .bind(&items)
        .bind(&totals)
        .bind(&correlations)
        .bind(&traces)
        .bind(&keys)
        .bind(&prints)
        .bind(&h.order_ids)
        .bind(&h.event_ids)
        .bind(&h.types)
        .bind(&h.times)
        .bind(&h.data);
    let written: Vec<Written> = events.bind(query).fetch_all(db).await?;
    let mut out = Created::default();
    for row in written {
        match row {
            (Some(order), _, _, _) => {
                out.orders.insert(order);
            }
            (None, Some(id), Some(event), behind) => {
                out.events.push((id, event, behind.unwrap_or(true)))
            }
            _ => {}
        }
    }
    Ok(out)
}

pub async fn find<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// What `GET /orders` filters on.
#[derive(Debug, Default)]
pub struct Filter {
    pub status: Option<OrderStatus>,
    pub customer_id: Option<String>,
    pub created_before: Option<DateTime<Utc>>,
    pub created_after: Option<DateTime<Utc>>,
}

/// One page of orders, newest (highest UUIDv7) first, below `after`.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    filter: &Filter,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders
         WHERE ($1::uuid IS NULL OR order_id < $1)
           AND ($2::text IS NULL OR status = $2)
           AND ($3::text IS NULL OR customer_id = $3)
           AND ($4::timestamptz IS NULL OR created_at < $4)
           AND ($5::timestamptz IS NULL OR created_at > $5)
         ORDER BY order_id DESC LIMIT $6"
    ))
    .bind(after)
    .bind(filter.status.map(OrderStatus::as_str))
    .bind(filter.customer_id.as_deref())
    .bind(filter.created_before)
    .bind(filter.created_after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The customer's order placed under `key` (a key is the customer's own:
/// another customer may use the same one).
pub async fn find_by_idempotency_key<'e>(
    db: impl PgExecutor<'e>,
    customer_id: &str,
    key: &str,
) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = $1 AND idempotency_key = $2"
    ))
    .bind(customer_id)
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

/// History rows as the column arrays `unnest` takes.
struct History {
    order_ids: Vec<uuid::Uuid>,
    event_ids: Vec<uuid::Uuid>,
    types: Vec<&'static str>,
    times: Vec<DateTime<Utc>>,
    data: Vec<serde_json::Value>,
}

impl History {
    fn of(events: &[&Envelope]) -> Result<Self, sqlx::Error> {
        let mut h = History {
            order_ids: Vec::with_capacity(events.len()),
            event_ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            times: Vec::with_capacity(events.len()),
            data: Vec::with_capacity(events.len()),
        };
        for e in events {
            h.order_ids.push(e.order_id.as_uuid());
            h.event_ids.push(e.event_id);
            h.types.push(e.event_type());
            h.times.push(e.occurred_at);
            let v =
                serde_json::to_value(&e.event).map_err(|err| sqlx::Error::Encode(Box::new(err)))?;
            let data = match v {
                serde_json::Value::Object(mut fields) => fields.remove("data"),
                _ => None,
            };
            h.data.push(data.unwrap_or(serde_json::Value::Null));
        }
        Ok(h)
    }
}

/// Columns [`OrderState`] is read from.
const STATE_COLUMNS: &str =
    "order_id, status, failure_reason, refunded, stock_released, items, total_minor, correlation_id, created_at";

/// An [`OrderState`] as stored.
#[derive(sqlx::FromRow)]
struct StateRow {
    order_id: Uuid,
    status: String,
    failure_reason: Option<String>,
    refunded: bool,
    stock_released: bool,
    items: Json<Vec<LineItem>>,
    total_minor: i64,
    correlation_id: String,
    created_at: DateTime<Utc>,
}

impl TryFrom<StateRow> for OrderState {
    type Error = sqlx::Error;

    fn try_from(r: StateRow) -> Result<Self, Self::Error> {
        let decode = |e: events::DomainError| sqlx::Error::Decode(Box::new(e));
        Ok(Self {
            order_id: r.order_id,
            status: OrderStatus::try_from(r.status).map_err(decode)?,
            failure_reason: r
                .failure_reason
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(decode)?,
            refunded: r.refunded,
            stock_released: r.stock_released,
            items: r.items.0,
            total: Money::from_minor(r.total_minor),
            correlation_id: r.correlation_id,
            created_at: r.created_at,
            changed: false,
        })
    }
}

fn states(rows: Vec<StateRow>) -> Result<HashMap<Uuid, OrderState>, sqlx::Error> {
    rows.into_iter()
        .map(|r| OrderState::try_from(r).map(|o| (o.order_id, o)))
        .collect()
}

/// Locks the orders `ids` (in ID order, so concurrent batches cannot
/// deadlock) and returns those that exist, by ID.
pub async fn lock(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, OrderState>, sqlx::Error> {
    let rows: Vec<StateRow> = sqlx::query_as(&format!(
        "SELECT {STATE_COLUMNS} FROM orders WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?;
    states(rows)
}

/// Locks PENDING orders created before `cutoff`, oldest first, at most
/// `limit`, skipping those another transaction holds (a replica expiring
/// them, a consumer batch ending them): each expires exactly once.
pub async fn lock_due(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<HashMap<Uuid, OrderState>, sqlx::Error> {
    let rows: Vec<StateRow> = sqlx::query_as(&format!(
        "SELECT {STATE_COLUMNS} FROM orders
         WHERE status = 'PENDING' AND created_at <= $1
         ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(cutoff)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    states(rows)
}

/// The database's clock, as of the transaction's start: deadlines compare
/// it with `created_at`, which the database set, so a skewed application
/// host expires orders neither early nor late.
pub async fn db_now(conn: &mut PgConnection) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT now()").fetch_one(conn).await
}

/// How many orders are PENDING since before `cutoff`.
pub async fn count_pending_since<'e>(
    db: impl PgExecutor<'e>,
    cutoff: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING' AND created_at < $1")
        .bind(cutoff)
        .fetch_one(db)
        .await
}

/// Writes back the `changed` orders and appends `history`, in one
/// statement; an event already in its order's history is not added again.
pub async fn save<'o>(
    conn: &mut PgConnection,
    orders: impl Iterator<Item = &'o OrderState>,
    history: &[&Envelope],
) -> Result<(), sqlx::Error> {
    let mut c = Changed::default();
    for o in orders.filter(|o| o.changed) {
        c.ids.push(o.order_id);
        c.statuses.push(o.status.as_str());
        c.reasons
            .push(o.failure_reason.map(events::FailureReason::as_str));
        c.refunded.push(o.refunded);
        c.released.push(o.stock_released);
    }
    if c.ids.is_empty() && history.is_empty() {
        return Ok(());
    }
    let h = History::of(history)?;
    sqlx::query(
        "WITH changed AS (
             UPDATE orders o SET status = c.status, failure_reason = c.failure_reason,
                                 refunded = c.refunded, stock_released = c.stock_released,
                                 updated_at = now()
             FROM unnest($6::uuid[], $7::text[], $8::text[], $9::bool[], $10::bool[])
                  AS c(order_id, status, failure_reason, refunded, stock_released)
             WHERE o.order_id = c.order_id)
         INSERT INTO order_history (order_id, event_id, event_type, occurred_at, data)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::jsonb[])
         -- Recorded already: an event the inbox had forgotten.
         ON CONFLICT (order_id, event_id) DO NOTHING",
    )
    .bind(&h.order_ids)
    .bind(&h.event_ids)
    .bind(&h.types)
    .bind(&h.times)
    .bind(&h.data)
    .bind(&c.ids)
    .bind(&c.statuses)
    .bind(&c.reasons)
    .bind(&c.refunded)
    .bind(&c.released)
    .execute(conn)
    .await?;
    Ok(())
}

/// Changed orders as the column arrays `unnest` takes.
#[derive(Default)]
struct Changed {
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    reasons: Vec<Option<&'static str>>,
    refunded: Vec<bool>,
    released: Vec<bool>,
}
