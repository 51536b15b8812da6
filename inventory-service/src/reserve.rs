//! Reserving an order's stock: every item or none.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use events::{
    Event, InventoryOutOfStock, InventoryReserved, LineItem, PaymentSucceeded, ReservedLine,
    Shortage,
};
use saga_runtime::{Handler, Step};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, Default)]
pub struct Reserver;

impl Handler for Reserver {
    fn accepts(&self, event: &Event) -> bool {
        matches!(event, Event::PaymentSucceeded(_))
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        steps: &mut [Step<'_>],
    ) -> Result<(), sqlx::Error> {
        // Each payment and what it wants, by SKU; a payment without items
        // is refused, anything else has nothing to reserve.
        let mut wanted: Vec<Option<(&PaymentSucceeded, BTreeMap<String, i64>)>> =
            Vec::with_capacity(steps.len());
        for step in steps.iter_mut() {
            let Event::PaymentSucceeded(paid) = &step.envelope().event else {
                wanted.push(None);
                continue;
            };
            wanted.push(match merge(&paid.items) {
                Ok(w) => Some((paid, w)),
                Err(why) => {
                    step.refuse(why);
                    None
                }
            });
        }
        let skus: Vec<&str> = wanted
            .iter()
            .flatten()
            .flat_map(|(_, w)| w.keys().map(String::as_str))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let order_ids = Step::order_ids(steps);
        // Read, in one round trip: which orders went through inventory
        // before, and the stock of every SKU the batch touches, locked in
        // SKU order (so concurrent batches cannot deadlock).
        let (done, locked_skus, locked_available): (Vec<Uuid>, Vec<String>, Vec<i64>) =
            sqlx::query_as(
                "WITH locked AS (
                     SELECT sku, available FROM products WHERE sku = ANY($1) ORDER BY sku FOR UPDATE)
                 SELECT COALESCE((SELECT array_agg(order_id) FROM reservations WHERE order_id = ANY($2)), '{}'),
                        COALESCE((SELECT array_agg(sku ORDER BY sku) FROM locked), '{}'),
                        COALESCE((SELECT array_agg(available ORDER BY sku) FROM locked), '{}')",
            )
            .bind(&skus)
            .bind(&order_ids)
            .fetch_one(&mut *conn)
            .await?;
        let mut done: HashSet<Uuid> = done.into_iter().collect();
        let mut on_hand: BTreeMap<String, i64> =
            locked_skus.into_iter().zip(locked_available).collect();
        // Decide in arrival order, each step seeing the stock the earlier
        // ones left.
        let mut decided = Decided::default();
        for (step, wanted) in steps.iter_mut().zip(&wanted) {
            let Some((paid, wanted)) = wanted else {
                continue;
            };
            let span = step.span().clone();
            let _entered = span.enter();
            let order_id = step.envelope().order_id.as_uuid();
            if done.contains(&order_id) {
                tracing::warn!("order already went through inventory; not reserving twice");
                continue;
            }
            let (status, event) = match decide(wanted, &on_hand) {
                Err(why) => {
                    step.refuse(why);
                    continue;
                }
                Ok(Ok(lines)) => {
                    for (sku, qty) in wanted {
                        *on_hand.entry(sku.clone()).or_default() -= qty;
                        *decided.taken.entry(sku.as_str()).or_default() += qty;
                    }
                    (
                        "RESERVED",
                        Event::InventoryReserved(InventoryReserved { items: lines }),
                    )
                }
                Ok(Err(shortages)) => (
                    "REJECTED",
                    Event::InventoryOutOfStock(InventoryOutOfStock { shortages }),
                ),
            };
            let items =
                serde_json::to_value(&paid.items).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            done.insert(order_id);
            decided.order_ids.push(order_id);
            decided.statuses.push(status);
            decided.items.push(items);
            decided
                .correlations
                .push(step.envelope().correlation_id.as_str());
            tracing::info!(outcome = event.event_type(), "inventory decided");
            step.emit(event);
        }
        if decided.order_ids.is_empty() {
            return Ok(());
        }
        // Write, in one more: take the stock and record every decision.
        let (taken_skus, taken_qtys): (Vec<&str>, Vec<i64>) = decided.taken.into_iter().unzip();
        sqlx::query(
            "WITH taken AS (
                 UPDATE products p SET available = p.available - w.qty, reserved = p.reserved + w.qty,
                     version = p.version + 1, updated_at = now()
                 FROM unnest($5::text[], $6::bigint[]) AS w(sku, qty)
                 WHERE p.sku = w.sku)
             INSERT INTO reservations (order_id, status, items, correlation_id)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[])",
        )
        .bind(&decided.order_ids)
        .bind(&decided.statuses)
        .bind(&decided.items)
        .bind(&decided.correlations)
        .bind(&taken_skus)
        .bind(&taken_qtys)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// A batch's decisions, as the column arrays `unnest` takes, and the units
/// taken per SKU.
#[derive(Default)]
struct Decided<'a> {
    order_ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    items: Vec<serde_json::Value>,
    correlations: Vec<&'a str>,
    taken: BTreeMap<&'a str, i64>,
}

/// Sums the lines of each SKU, in SKU order (the lock order).
fn merge(items: &[LineItem]) -> Result<BTreeMap<String, i64>, String> {
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for item in items {
        *wanted.entry(item.sku.to_string()).or_default() += i64::from(item.quantity.get());
    }
    if wanted.is_empty() {
        return Err("payment carries no items".into());
    }
    Ok(wanted)
}

/// The lines to reserve if all of `wanted` is on hand, else the shortages.
fn decide(
    wanted: &BTreeMap<String, i64>,
    on_hand: &BTreeMap<String, i64>,
) -> Result<Result<Vec<ReservedLine>, Vec<Shortage>>, String> {
    let sku = |s: &str| events::Sku::parse(s).map_err(|e| e.to_string());
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
            quantity: u32::try_from(qty).map_err(|e| e.to_string())?,
        });
    }
    Ok(Ok(lines))
}
