//! How order-service reacts to the other services' events: read and lock
//! the batch's orders, decide in arrival order with the rules of
//! [`crate::domain::OrderState`], write once.

use events::{Envelope, EventType};
use saga_runtime::{Handler, Step};
use sqlx::PgConnection;

use crate::store;

/// Ends the saga: CONFIRMED on `InventoryReserved`, FAILED on `PaymentFailed`
/// or `InventoryOutOfStock`; records every payment and inventory event in
/// the history, with the compensation's refund and release flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderSaga;

impl Handler for OrderSaga {
    fn accepts(&self, kind: EventType) -> bool {
        kind.consumed_by(events::Service::Order)
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        steps: &mut [Step<'_>],
    ) -> Result<(), sqlx::Error> {
        // Read: the batch's orders, locked. Decide: in arrival order, in
        // memory. Write: changed orders and all history in one statement.
        let ids = Step::order_ids(steps);
        let mut orders = store::lock(conn, &ids).await?;
        for step in steps.iter_mut() {
            let span = step.span().clone();
            let _entered = span.enter();
            let env = step.envelope();
            let Some(order) = orders.get_mut(&env.order_id.as_uuid()) else {
                step.refuse(format!("order {} does not exist", env.order_id));
                continue;
            };
            if let Some(event) = order.react(env) {
                tracing::info!(outcome = event.event_type(), "saga finished");
                step.emit(event);
            }
        }
        // Every applied event is recorded, and after it what it caused.
        let history: Vec<&Envelope> = steps
            .iter()
            .filter_map(|s| {
                let out = s.verdict().ok()?;
                Some(std::iter::once(s.envelope()).chain(out))
            })
            .flatten()
            .collect();
        store::save(conn, orders.values(), &history).await
    }

    fn after_commit(&self, emitted: &[Envelope]) {
        crate::outcomes::record(emitted);
    }
}
