//! How order-service reacts to the other services' events.

use events::{Envelope, Event, FailureReason, Money, OrderConfirmed, OrderFailed};
use saga_runtime::metrics::OutcomeLabels;
use saga_runtime::{Handler, Step};
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
            if let Some(event) = react(order, env) {
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

/// What `env` does to `order`: payment news updates the refund flag; the
/// rest end a PENDING saga and return the final event. An order already
/// CONFIRMED or FAILED keeps its status (the event is only recorded).
pub fn react(order: &mut store::Locked, env: &Envelope) -> Option<Event> {
    // No failure (confirm), or a reason and detail.
    let failure = match &env.event {
        Event::PaymentSucceeded(_) => return None,
        Event::PaymentRefunded(_) => {
            if !order.refunded {
                order.refunded = true;
                order.changed = true;
            }
            return None;
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
        _ => return None,
    };
    if order.status != "PENDING" {
        // A terminal order hearing a late or contradicting event: keep the
        // record, change nothing.
        tracing::warn!(status = %order.status, event_type = env.event_type(), "event for a finished order recorded only");
        return None;
    }
    order.changed = true;
    let order_created_at = order.created_at;
    Some(match failure {
        None => {
            order.status = "CONFIRMED".to_owned();
            Event::OrderConfirmed(OrderConfirmed {
                total: Money::from_minor(order.total_minor),
                order_created_at,
            })
        }
        Some((reason, detail)) => {
            order.status = "FAILED".to_owned();
            order.failure_reason = Some(reason.as_str().to_owned());
            Event::OrderFailed(OrderFailed {
                reason,
                detail,
                order_created_at,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{
        CorrelationId, InventoryOutOfStock, InventoryReserved, OrderId, PaymentFailed,
        PaymentRefunded, Shortage, Sku,
    };
    use uuid::Uuid;

    fn pending() -> store::Locked {
        store::Locked {
            order_id: Uuid::now_v7(),
            status: "PENDING".into(),
            failure_reason: None,
            refunded: false,
            total_minor: 2_999,
            created_at: chrono::Utc::now(),
            changed: false,
        }
    }

    fn envelope(order: &store::Locked, event: Event) -> Envelope {
        Envelope::new(
            OrderId::from_uuid(order.order_id),
            CorrelationId::generate(),
            event,
        )
    }

    fn out_of_stock() -> Event {
        Event::InventoryOutOfStock(InventoryOutOfStock {
            shortages: vec![Shortage {
                sku: Sku::parse("SKU-RARE").unwrap(),
                requested: 6,
                available: 5,
            }],
        })
    }

    #[test]
    fn reserved_confirms_once_and_later_news_changes_nothing() {
        let mut order = pending();
        let reserved = envelope(
            &order,
            Event::InventoryReserved(InventoryReserved { items: vec![] }),
        );
        let Some(Event::OrderConfirmed(c)) = react(&mut order, &reserved) else {
            panic!("expected OrderConfirmed");
        };
        assert_eq!(c.total.minor(), 2_999);
        assert_eq!((order.status.as_str(), order.changed), ("CONFIRMED", true));
        order.changed = false;
        assert!(react(&mut order, &reserved).is_none());
        let late = envelope(&order, out_of_stock());
        assert!(react(&mut order, &late).is_none());
        assert_eq!((order.status.as_str(), order.changed), ("CONFIRMED", false));
    }

    #[test]
    fn out_of_stock_fails_with_the_shortages_and_a_refund_is_recorded() {
        let mut order = pending();
        let event = envelope(&order, out_of_stock());
        let Some(Event::OrderFailed(f)) = react(&mut order, &event) else {
            panic!("expected OrderFailed");
        };
        assert_eq!(f.reason, FailureReason::OutOfStock);
        assert!(
            f.detail.contains("SKU-RARE (requested 6, available 5)"),
            "{}",
            f.detail
        );
        assert_eq!(order.failure_reason.as_deref(), Some("out_of_stock"));
        let refund = Event::PaymentRefunded(PaymentRefunded {
            payment_id: Uuid::now_v7(),
            amount: Money::from_minor(2_999),
            reason: "out of stock".into(),
        });
        let refund = envelope(&order, refund);
        assert!(react(&mut order, &refund).is_none());
        assert!(order.refunded);
        assert_eq!(order.status, "FAILED");
    }

    #[test]
    fn declined_payment_fails_the_order() {
        let mut order = pending();
        let declined = Event::PaymentFailed(PaymentFailed {
            amount: Money::from_minor(2_999),
            reason: "over the limit".into(),
        });
        let declined = envelope(&order, declined);
        let Some(Event::OrderFailed(f)) = react(&mut order, &declined) else {
            panic!("expected OrderFailed");
        };
        assert_eq!(
            (f.reason, f.detail.as_str()),
            (FailureReason::PaymentDeclined, "over the limit")
        );
    }
}
