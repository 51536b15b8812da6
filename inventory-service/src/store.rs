//! SQL for the saga handler: read and lock what a batch touches, write
//! what it decided.

use std::collections::{BTreeMap, HashMap};

use events::LineItem;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{Reservation, ReservationStatus, Stock};

/// Reads, in one round trip: the reservations of `order_ids` (locked),
/// and the stock of `skus` plus, with `with_held`, of every SKU those
/// reservations hold, locked in SKU order (so concurrent batches cannot
/// deadlock).
pub async fn lock(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
    skus: &[&str],
    with_held: bool,
) -> Result<Stock, sqlx::Error> {
    type Read = (
        Vec<Uuid>,
        Vec<String>,
        Vec<serde_json::Value>,
        Vec<String>,
        Vec<i64>,
    );
    let (ids, statuses, items, locked_skus, available): Read = sqlx::query_as(
        "WITH r AS (
             SELECT order_id, status, items FROM reservations
             WHERE order_id = ANY($2) ORDER BY order_id FOR UPDATE),
         locked AS (
             SELECT sku, available FROM products
             WHERE sku = ANY($1)
                OR ($3 AND sku IN (SELECT i ->> 'sku' FROM r, jsonb_array_elements(r.items) i
                                   WHERE r.status = 'RESERVED'))
             ORDER BY sku FOR UPDATE)
         SELECT COALESCE((SELECT array_agg(order_id) FROM r), '{}'),
                COALESCE((SELECT array_agg(status) FROM r), '{}'),
                COALESCE((SELECT array_agg(items) FROM r), '{}'),
                COALESCE((SELECT array_agg(sku ORDER BY sku) FROM locked), '{}'),
                COALESCE((SELECT array_agg(available ORDER BY sku) FROM locked), '{}')",
    )
    .bind(skus)
    .bind(order_ids)
    .bind(with_held)
    .fetch_one(&mut *conn)
    .await?;
    let mut reservations = HashMap::with_capacity(ids.len());
    for ((id, status), items) in ids.into_iter().zip(statuses).zip(items) {
        let items: Vec<LineItem> =
            serde_json::from_value(items).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        let status =
            ReservationStatus::try_from(status).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        reservations.insert(
            id,
            Reservation {
                status,
                items,
                new: false,
                changed: false,
            },
        );
    }
    Ok(Stock {
        on_hand: locked_skus.into_iter().zip(available).collect(),
        reservations,
        moved: BTreeMap::new(),
    })
}

/// Writes what a batch decided, in one statement: the units moved between
/// `available` and `reserved`, new reservations and changed ones.
/// `correlations` names each new reservation's correlation ID.
pub async fn save(
    conn: &mut PgConnection,
    stock: &Stock,
    correlations: &HashMap<Uuid, &str>,
) -> Result<(), sqlx::Error> {
    let mut new = NewRows::default();
    let (mut changed_ids, mut changed_statuses) = (Vec::new(), Vec::new());
    for (id, r) in &stock.reservations {
        if r.new {
            new.ids.push(*id);
            new.statuses.push(r.status.as_str());
            new.items.push(
                serde_json::to_value(&r.items).map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
            );
            new.correlations
                .push(correlations.get(id).copied().unwrap_or_default());
        } else if r.changed {
            changed_ids.push(*id);
            changed_statuses.push(r.status.as_str());
        }
    }
    let (moved_skus, moved_qtys): (Vec<&str>, Vec<i64>) = stock
        .moved
        .iter()
        .filter(|(_, q)| **q != 0)
        .map(|(s, q)| (s.as_str(), *q))
        .unzip();
    if new.ids.is_empty() && changed_ids.is_empty() && moved_skus.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH moved AS (
             UPDATE products p SET available = p.available + m.qty, reserved = p.reserved - m.qty,
                 version = p.version + 1, updated_at = now()
             FROM unnest($5::text[], $6::bigint[]) AS m(sku, qty)
             WHERE p.sku = m.sku),
         changed AS (
             UPDATE reservations r SET status = c.status, updated_at = now()
             FROM unnest($7::uuid[], $8::text[]) AS c(order_id, status)
             WHERE r.order_id = c.order_id)
         INSERT INTO reservations (order_id, status, items, correlation_id)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[])",
    )
    .bind(&new.ids)
    .bind(&new.statuses)
    .bind(&new.items)
    .bind(&new.correlations)
    .bind(&moved_skus)
    .bind(&moved_qtys)
    .bind(&changed_ids)
    .bind(&changed_statuses)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// New reservations as the column arrays `unnest` takes.
#[derive(Default)]
struct NewRows<'a> {
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    items: Vec<serde_json::Value>,
    correlations: Vec<&'a str>,
}
