//! How order-service reacts to the other services' events.

use events::{Envelope, Event, FailureReason, Money, OrderConfirmed, OrderFailed};
use saga_runtime::metrics::OutcomeLabels;
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
        let missing = || HandleError::Permanent(format!("order {} does not exist", env.order_id));
        // Payment news is recorded whatever the order's status: one statement.
        // The rest end the saga: no failure (confirm) or a reason and detail.
        let failure = match &env.event {
            Event::PaymentSucceeded(_) | Event::PaymentRefunded(_) => {
                let refunded = matches!(env.event, Event::PaymentRefunded(_));
                if !store::record_payment(conn, env, refunded).await? {
                    return Err(missing());
                }
                return Ok(Vec::new());
            }
            Event::InventoryReserved(_) => None,
            Event::PaymentFailed(e) => Some((FailureReason::PaymentDeclined, e.reason.clone())),
            Event::InventoryOutOfStock(e) => {
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
                Some((
                    FailureReason::OutOfStock,
                    format!("not enough stock: {}", skus.join(", ")),
                ))
            }
            _ => return Ok(Vec::new()),
        };
        let reason = failure.as_ref().map(|(reason, _)| *reason);
        let outcome = match store::finish(conn, env.order_id, reason).await? {
            store::Finish::Missing => return Err(missing()),
            store::Finish::AlreadyFinal(status) => {
                // A terminal order hearing a late or contradicting event: keep
                // the record, change nothing.
                tracing::warn!(status = %status, event_type = env.event_type(), "event for a finished order recorded only");
                None
            }
            store::Finish::Finished {
                total_minor,
                created_at,
            } => Some(match failure {
                None => Event::OrderConfirmed(OrderConfirmed {
                    total: Money::from_minor(total_minor),
                    order_created_at: created_at,
                }),
                Some((reason, detail)) => Event::OrderFailed(OrderFailed {
                    reason,
                    detail,
                    order_created_at: created_at,
                }),
            }),
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

    fn after_commit(&self, emitted: &[Envelope]) {
        let m = saga_runtime::metrics::global();
        for e in emitted {
            let (labels, started) = match &e.event {
                Event::OrderConfirmed(c) => (("CONFIRMED", ""), c.order_created_at),
                Event::OrderFailed(f) => (("FAILED", f.reason.as_str()), f.order_created_at),
                _ => continue,
            };
            let labels = OutcomeLabels {
                status: labels.0.to_owned(),
                reason: labels.1.to_owned(),
            };
            m.orders_finished.get_or_create(&labels).inc();
            let took = (e.occurred_at - started)
                .num_microseconds()
                .unwrap_or(0)
                .max(0);
            m.saga_seconds
                .get_or_create(&labels)
                .observe(took as f64 / 1e6);
        }
    }
}
