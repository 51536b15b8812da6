//! Reserving an order's stock: every item or none.

use std::collections::BTreeMap;

use events::{
    Envelope, Event, InventoryOutOfStock, InventoryReserved, LineItem, ReservedLine, Shortage,
};
use saga_runtime::{HandleError, Handler};
use sqlx::types::Json;
use sqlx::PgConnection;

#[derive(Debug, Clone, Copy, Default)]
pub struct Reserver;

impl Handler for Reserver {
    fn accepts(&self, event: &Event) -> bool {
        matches!(event, Event::PaymentSucceeded(_))
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        env: &Envelope,
    ) -> Result<Vec<Envelope>, HandleError> {
        let Event::PaymentSucceeded(paid) = &env.event else {
            return Ok(Vec::new());
        };
        let already: Option<(String,)> =
            sqlx::query_as("SELECT status FROM reservations WHERE order_id = $1")
                .bind(env.order_id.as_uuid())
                .fetch_optional(&mut *conn)
                .await?;
        if already.is_some() {
            tracing::warn!("order already went through inventory; not reserving twice");
            return Ok(Vec::new());
        }
        let wanted = merge(&paid.items)?;
        let outcome = reserve(conn, &wanted).await?;
        let (status, event) = match outcome {
            Ok(lines) => (
                "RESERVED",
                Event::InventoryReserved(InventoryReserved { items: lines }),
            ),
            Err(shortages) => (
                "REJECTED",
                Event::InventoryOutOfStock(InventoryOutOfStock { shortages }),
            ),
        };
        sqlx::query("INSERT INTO reservations (order_id, status, items, correlation_id) VALUES ($1, $2, $3, $4)")
            .bind(env.order_id.as_uuid())
            .bind(status)
            .bind(Json(&paid.items))
            .bind(env.correlation_id.as_str())
            .execute(&mut *conn)
            .await?;
        tracing::info!(outcome = event.event_type(), "inventory decided");
        Ok(vec![Envelope::caused_by(env, event)])
    }
}

/// Sums the lines of each SKU, in SKU order (the lock order).
fn merge(items: &[LineItem]) -> Result<BTreeMap<String, i64>, HandleError> {
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for item in items {
        *wanted.entry(item.sku.to_string()).or_default() += i64::from(item.quantity.get());
    }
    if wanted.is_empty() {
        return Err(HandleError::Permanent("payment carries no items".into()));
    }
    Ok(wanted)
}

/// Locks the products in SKU order and takes the stock if all of it is there.
async fn reserve(
    conn: &mut PgConnection,
    wanted: &BTreeMap<String, i64>,
) -> Result<Result<Vec<ReservedLine>, Vec<Shortage>>, HandleError> {
    let skus: Vec<&str> = wanted.keys().map(String::as_str).collect();
    let qtys: Vec<i64> = wanted.values().copied().collect();
    let on_hand: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sku, available FROM products WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
    )
    .bind(&skus)
    .fetch_all(&mut *conn)
    .await?;
    let on_hand: BTreeMap<String, i64> = on_hand.into_iter().collect();
    let mut shortages = Vec::new();
    for (sku, &qty) in wanted {
        let available = on_hand.get(sku).copied().unwrap_or(0);
        if available < qty {
            shortages.push(Shortage {
                sku: events::Sku::parse(sku.as_str())
                    .map_err(|e| HandleError::Permanent(e.to_string()))?,
                requested: u32::try_from(qty).unwrap_or(u32::MAX),
                available,
            });
        }
    }
    if !shortages.is_empty() {
        return Ok(Err(shortages));
    }
    sqlx::query(
        "UPDATE products p SET available = p.available - w.qty, reserved = p.reserved + w.qty, updated_at = now()
         FROM unnest($1::text[], $2::bigint[]) AS w(sku, qty) WHERE p.sku = w.sku",
    )
    .bind(&skus)
    .bind(&qtys)
    .execute(&mut *conn)
    .await?;
    let mut lines = Vec::with_capacity(wanted.len());
    for (sku, &qty) in wanted {
        lines.push(ReservedLine {
            sku: events::Sku::parse(sku.as_str())
                .map_err(|e| HandleError::Permanent(e.to_string()))?,
            quantity: u32::try_from(qty).map_err(|e| HandleError::Permanent(e.to_string()))?,
        });
    }
    Ok(Ok(lines))
}
