//! Metrics of how sagas end, counted once the event that ends them has
//! committed (by the consumer, a cancellation or a deadline).

use events::{Envelope, Event, FailureReason};
use saga_runtime::metrics::{self, CancelLabels, OutcomeLabels};

use crate::domain::OrderStatus;

/// Counts the orders `emitted` ended and observes their saga durations.
pub fn record(emitted: &[Envelope]) {
    let m = metrics::global();
    for e in emitted {
        let (status, reason, started) = match &e.event {
            Event::OrderConfirmed(c) => (OrderStatus::Confirmed, None, c.order_created_at),
            Event::OrderFailed(f) => (OrderStatus::Failed, Some(f.reason), f.order_created_at),
            Event::OrderCancelled(c) => {
                m.orders_cancelled
                    .get_or_create(&CancelLabels {
                        reason: c.reason.as_str().to_owned(),
                    })
                    .inc();
                match c.reason {
                    events::CancelReason::Customer => (
                        OrderStatus::Cancelled,
                        Some(FailureReason::Cancelled),
                        c.order_created_at,
                    ),
                    events::CancelReason::Deadline => (
                        OrderStatus::Failed,
                        Some(FailureReason::DeadlineExceeded),
                        c.order_created_at,
                    ),
                }
            }
            _ => continue,
        };
        let labels = OutcomeLabels {
            status: status.as_str().to_owned(),
            reason: reason.map(FailureReason::as_str).unwrap_or("").to_owned(),
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
