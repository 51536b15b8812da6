//! How order-service reacts to the other services' events.

use events::{Envelope, Event, FailureReason, Money, OrderConfirmed, OrderFailed};
use saga_runtime::{HandleError, Handler};
use sqlx::PgConnection;

use crate::store;

/// Ends the saga: CONFIRMED on `InventoryReserved`, FAILED on `PaymentFailed`
/// or `InventoryOutOfStock`; records every payment event in the history.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderSaga;

impl Handler for OrderSaga {
    fn accepts(&self, event: &Event) -> bool {
        matches!(
            event,
            Event::PaymentSucceeded(_)
                | Event::PaymentFailed(_)
                | Event::PaymentRefunded(_)
                | Event::InventoryReserved(_)
                | Event::InventoryOutOfStock(_)
        )
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        env: &Envelope,
    ) -> Result<Vec<Envelope>, HandleError> {
        let Some((status, total_minor)) = store::lock(conn, env.order_id).await? else {
            return Err(HandleError::Permanent(format!(
                "order {} does not exist",
                env.order_id
            )));
        };
        let pending = status == "PENDING";
        let outcome = match &env.event {
            Event::InventoryReserved(_) if pending => {
                store::confirm(conn, env.order_id).await?;
                Some(Event::OrderConfirmed(OrderConfirmed {
                    total: Money::from_minor(total_minor),
                }))
            }
            Event::PaymentFailed(e) if pending => {
                store::fail(conn, env.order_id, FailureReason::PaymentDeclined).await?;
                Some(Event::OrderFailed(OrderFailed {
                    reason: FailureReason::PaymentDeclined,
                    detail: e.reason.clone(),
                }))
            }
            Event::InventoryOutOfStock(e) if pending => {
                store::fail(conn, env.order_id, FailureReason::OutOfStock).await?;
                let skus: Vec<String> = e
                    .shortages
                    .iter()
                    .map(|s| {
                        format!(
                            "{} (requested {}, available {})",
                            s.sku, s.requested, s.available
                        )
                    })
                    .collect();
                Some(Event::OrderFailed(OrderFailed {
                    reason: FailureReason::OutOfStock,
                    detail: format!("not enough stock: {}", skus.join(", ")),
                }))
            }
            Event::PaymentRefunded(_) => {
                store::touch(conn, env.order_id, true).await?;
                None
            }
            Event::PaymentSucceeded(_) => {
                store::touch(conn, env.order_id, false).await?;
                None
            }
            other => {
                // A terminal order hearing a late or contradicting event: keep
                // the record, change nothing.
                tracing::warn!(status = %status, event_type = other.event_type(), "event for a finished order recorded only");
                None
            }
        };
        let emitted: Vec<Envelope> = outcome
            .map(|e| Envelope::caused_by(env, e))
            .into_iter()
            .collect();
        let mut touched: Vec<&Envelope> = vec![env];
        touched.extend(emitted.iter());
        store::record_history(conn, &touched).await?;
        if let Some(done) = emitted.first() {
            tracing::info!(outcome = done.event_type(), "saga finished");
        }
        Ok(emitted)
    }
}
