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
        let wanted = merge(&paid.items)?;
        let skus: Vec<&str> = wanted.keys().map(String::as_str).collect();
        let qtys: Vec<i64> = wanted.values().copied().collect();
        // One round trip: whether this order went through inventory before,
        // and the stock of its SKUs, locked in SKU order.
        let (already, locked_skus, locked_available): (bool, Vec<String>, Vec<i64>) =
            sqlx::query_as(
                "WITH locked AS (
                     SELECT sku, available FROM products WHERE sku = ANY($1) ORDER BY sku FOR UPDATE)
                 SELECT EXISTS (SELECT 1 FROM reservations WHERE order_id = $2),
                        COALESCE((SELECT array_agg(sku ORDER BY sku) FROM locked), '{}'),
                        COALESCE((SELECT array_agg(available ORDER BY sku) FROM locked), '{}')",
            )
            .bind(&skus)
            .bind(env.order_id.as_uuid())
            .fetch_one(&mut *conn)
            .await?;
        if already {
            tracing::warn!("order already went through inventory; not reserving twice");
            return Ok(Vec::new());
        }
        let on_hand: BTreeMap<String, i64> =
            locked_skus.into_iter().zip(locked_available).collect();
        let (status, event) = match decide(&wanted, &on_hand)? {
            Ok(lines) => (
                "RESERVED",
                Event::InventoryReserved(InventoryReserved { items: lines }),
            ),
            Err(shortages) => (
                "REJECTED",
                Event::InventoryOutOfStock(InventoryOutOfStock { shortages }),
            ),
        };
        // One more: take the stock (only when reserving) and record the decision.
        sqlx::query(
            "WITH taken AS (
                 UPDATE products p SET available = p.available - w.qty, reserved = p.reserved + w.qty, updated_at = now()
                 FROM unnest($5::text[], $6::bigint[]) AS w(sku, qty)
                 WHERE p.sku = w.sku AND $2 = 'RESERVED')
             INSERT INTO reservations (order_id, status, items, correlation_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(env.order_id.as_uuid())
        .bind(status)
        .bind(Json(&paid.items))
        .bind(env.correlation_id.as_str())
        .bind(&skus)
        .bind(&qtys)
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

/// The lines to reserve if all of `wanted` is on hand, else the shortages.
fn decide(
    wanted: &BTreeMap<String, i64>,
    on_hand: &BTreeMap<String, i64>,
) -> Result<Result<Vec<ReservedLine>, Vec<Shortage>>, HandleError> {
    let sku = |s: &str| events::Sku::parse(s).map_err(|e| HandleError::Permanent(e.to_string()));
    let mut shortages = Vec::new();
    for (s, &qty) in wanted {
        let available = on_hand.get(s).copied().unwrap_or(0);
        if available < qty {
            shortages.push(Shortage {
                sku: sku(s)?,
                requested: u32::try_from(qty).unwrap_or(u32::MAX),
                available,
            });
        }
    }
    if !shortages.is_empty() {
        return Ok(Err(shortages));
    }
    let mut lines = Vec::with_capacity(wanted.len());
    for (s, &qty) in wanted {
        lines.push(ReservedLine {
            sku: sku(s)?,
            quantity: u32::try_from(qty).map_err(|e| HandleError::Permanent(e.to_string()))?,
        });
    }
    Ok(Ok(lines))
}
