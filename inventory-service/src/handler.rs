//! inventory-service as a saga participant: reserve on `PaymentSucceeded`,
//! release on `PaymentRefunded`. Read and lock what a batch touches,
//! decide in arrival order with the rules of [`crate::domain::Stock`],
//! write once.

use std::collections::{BTreeSet, HashMap};

use events::{Event, EventType};
use saga_runtime::{Handler, Step};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store;

#[derive(Debug, Clone, Copy, Default)]
pub struct Reserver;

impl Handler for Reserver {
    fn accepts(&self, kind: EventType) -> bool {
        kind.consumed_by(events::Service::Inventory)
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        steps: &mut [Step<'_>],
    ) -> Result<(), sqlx::Error> {
        let mut skus: BTreeSet<&str> = BTreeSet::new();
        let mut refunds = false;
        for step in steps.iter() {
            match &step.envelope().event {
                Event::PaymentSucceeded(paid) => {
                    skus.extend(paid.items.iter().map(|i| i.sku.as_str()))
                }
                Event::PaymentRefunded(_) => refunds = true,
                _ => {}
            }
        }
        let skus: Vec<&str> = skus.into_iter().collect();
        let order_ids = Step::order_ids(steps);
        let mut stock = store::lock(conn, &order_ids, &skus, refunds).await?;
        // Decide in arrival order, each step seeing the stock the earlier
        // ones left.
        let mut correlations: HashMap<Uuid, &str> = HashMap::new();
        for step in steps.iter_mut() {
            let span = step.span().clone();
            let _entered = span.enter();
            let env = step.envelope();
            let order_id = env.order_id.as_uuid();
            let decided = match &env.event {
                Event::PaymentSucceeded(paid) => stock.reserve(order_id, &paid.items),
                Event::PaymentRefunded(_) => stock.release(order_id),
                _ => Ok(None),
            };
            correlations
                .entry(order_id)
                .or_insert(env.correlation_id.as_str());
            match decided {
                Ok(Some(event)) => {
                    tracing::info!(outcome = event.event_type(), "inventory decided");
                    step.emit(event);
                }
                Ok(None) => {}
                Err(why) => step.refuse(why),
            }
        }
        store::save(conn, &stock, &correlations).await
    }
}
