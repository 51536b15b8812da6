//! The order's domain: a new order and its rules, the order's status, and the saga's rules as pure functions over an order's
//! state: how it reacts to the other services' events, when it may be
//! cancelled, when its deadline expires it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use events::{
    CancelReason, CustomerId, Envelope, Event, FailureReason, LineItem, Money, OrderCancelled,
    OrderConfirmed, OrderFailed,
};
use serde::Serialize;
use uuid::Uuid;

/// Why the customer of a new order cannot be settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerRefusal {
    /// No token and no `customer_id` in the body.
    Missing,
    /// The body names another customer than the token's subject.
    NotTheCaller,
}

/// Whose order a new order is: the token's subject when there is a token
/// (the body may repeat it, not name another), else the body's
/// `customer_id`.
pub fn customer_for(body: Option<&str>, subject: Option<&str>) -> Result<String, CustomerRefusal> {
    match (body, subject) {
        (None, None) => Err(CustomerRefusal::Missing),
        (Some(b), None) => Ok(b.to_owned()),
        (None, Some(s)) => Ok(s.to_owned()),
        (Some(b), Some(s)) if b == s => Ok(s.to_owned()),
        (Some(_), Some(_)) => Err(CustomerRefusal::NotTheCaller),
    }
}

/// A valid order, ready to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewOrder {
    pub customer_id: CustomerId,
    pub items: Vec<LineItem>,
    pub total: Money,
}

impl NewOrder {
    /// A stable text form of the order, to tell a retry from a different
    /// request under the same idempotency key.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

events::named_enum! {
    /// Where an order's saga stands.
    pub enum OrderStatus: "status" {
        Pending => "PENDING",
        Confirmed => "CONFIRMED",
        Failed => "FAILED",
        Cancelled => "CANCELLED",
    }
}

/// An order as the saga's rules see it: read (and locked) for a batch, a
/// cancellation or an expiry, changed in memory, written back when
/// `changed`.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderState {
    pub order_id: Uuid,
    pub status: OrderStatus,
    pub failure_reason: Option<FailureReason>,
    pub refunded: bool,
    pub stock_released: bool,
    pub items: Vec<LineItem>,
    pub total: Money,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    pub changed: bool,
}

/// Why an order cannot be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCancellable {
    pub status: OrderStatus,
    pub reason: Option<FailureReason>,
}

impl OrderState {
    /// What `env` does to this order: refund and release news set their
    /// flags; a reservation confirms a PENDING order and a decline or a
    /// shortage fails it, returning the final event. An order that already
    /// ended (CONFIRMED, FAILED, CANCELLED) keeps its status: the event is
    /// only recorded, and a compensation already under way returns whatever
    /// was taken.
    pub fn react(&mut self, env: &Envelope) -> Option<Event> {
        // No failure (confirm), or a reason and detail.
        let failure = match &env.event {
            Event::PaymentRefunded(_) => {
                self.flag(|o| &mut o.refunded);
                return None;
            }
            Event::InventoryReleased(_) => {
                self.flag(|o| &mut o.stock_released);
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
        if self.status != OrderStatus::Pending {
            // An order that ended hearing a late or contradicting event:
            // keep the record, change nothing.
            tracing::warn!(status = %self.status, event_type = env.event_type(), "event for a finished order recorded only");
            return None;
        }
        self.changed = true;
        let order_created_at = self.created_at;
        Some(match failure {
            None => {
                self.status = OrderStatus::Confirmed;
                Event::OrderConfirmed(OrderConfirmed {
                    total: self.total,
                    order_created_at,
                })
            }
            Some((reason, detail)) => {
                self.status = OrderStatus::Failed;
                self.failure_reason = Some(reason);
                Event::OrderFailed(OrderFailed {
                    reason,
                    detail,
                    order_created_at,
                })
            }
        })
    }

    /// The customer cancels: a PENDING or CONFIRMED order becomes CANCELLED
    /// and `OrderCancelled` goes out; cancelling a CANCELLED order again
    /// changes nothing (`Ok(None)`); a FAILED order cannot be cancelled.
    pub fn cancel(&mut self) -> Result<Option<Event>, NotCancellable> {
        match self.status {
            OrderStatus::Pending | OrderStatus::Confirmed => Ok(Some(
                self.end(OrderStatus::Cancelled, CancelReason::Customer),
            )),
            OrderStatus::Cancelled => Ok(None),
            OrderStatus::Failed => Err(NotCancellable {
                status: self.status,
                reason: self.failure_reason,
            }),
        }
    }

    /// The creation time before which an order is `deadline` old at `now`
    /// (the earliest time there is, when `deadline` reaches beyond it).
    pub fn due_cutoff(now: DateTime<Utc>, deadline: Duration) -> DateTime<Utc> {
        chrono::Duration::from_std(deadline)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The deadline: an order still PENDING `deadline` after its creation
    /// becomes FAILED with `deadline_exceeded` and `OrderCancelled` goes
    /// out. Any other order, or one not yet due, is left alone.
    pub fn expire(&mut self, now: DateTime<Utc>, deadline: Duration) -> Option<Event> {
        let due = self
            .created_at
            .checked_add_signed(chrono::Duration::from_std(deadline).ok()?)?;
        (self.status == OrderStatus::Pending && now >= due)
            .then(|| self.end(OrderStatus::Failed, CancelReason::Deadline))
    }

    fn end(&mut self, status: OrderStatus, reason: CancelReason) -> Event {
        self.status = status;
        self.failure_reason = Some(match reason {
            CancelReason::Customer => FailureReason::Cancelled,
            CancelReason::Deadline => FailureReason::DeadlineExceeded,
        });
        self.changed = true;
        Event::OrderCancelled(OrderCancelled {
            reason,
            order_created_at: self.created_at,
            items: self.items.clone(),
            total: self.total,
        })
    }

    fn flag(&mut self, field: impl FnOnce(&mut Self) -> &mut bool) {
        let f = field(self);
        if !*f {
            *f = true;
            self.changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{
        CorrelationId, InventoryOutOfStock, InventoryReleased, InventoryReserved, OrderId,
        PaymentFailed, PaymentRefunded, Quantity, Shortage, Sku,
    };

    fn pending() -> OrderState {
        OrderState {
            order_id: Uuid::now_v7(),
            status: OrderStatus::Pending,
            failure_reason: None,
            refunded: false,
            stock_released: false,
            items: vec![LineItem {
                sku: Sku::parse("SKU-1").unwrap(),
                quantity: Quantity::new(1).unwrap(),
                unit_price: Money::from_minor(2_999),
            }],
            total: Money::from_minor(2_999),
            correlation_id: "c".into(),
            created_at: Utc::now(),
            changed: false,
        }
    }

    fn envelope(order: &OrderState, event: Event) -> Envelope {
        Envelope::new(
            OrderId::from_uuid(order.order_id),
            CorrelationId::generate(),
            event,
        )
    }

    fn reserved() -> Event {
        Event::InventoryReserved(InventoryReserved { items: vec![] })
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

    fn refunded() -> Event {
        Event::PaymentRefunded(PaymentRefunded {
            payment_id: Uuid::now_v7(),
            amount: Money::from_minor(2_999),
            reason: "order cancelled".into(),
        })
    }

    fn released() -> Event {
        Event::InventoryReleased(InventoryReleased { items: vec![] })
    }

    #[test]
    fn statuses_round_trip_and_nothing_else_parses() {
        for &st in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(st.as_str()), Some(st));
            assert_eq!(OrderStatus::try_from(st.as_str().to_owned()), Ok(st));
        }
        assert_eq!(OrderStatus::parse("pending"), None);
        assert!(OrderStatus::try_from("DONE".to_owned()).is_err());
    }

    #[test]
    fn reserved_confirms_once_and_later_news_changes_nothing() {
        let mut order = pending();
        let Some(Event::OrderConfirmed(c)) = order.react(&envelope(&order, reserved())) else {
            panic!("expected OrderConfirmed");
        };
        assert_eq!(c.total.minor(), 2_999);
        assert_eq!(
            (order.status, order.changed),
            (OrderStatus::Confirmed, true)
        );
        order.changed = false;
        assert!(order.react(&envelope(&order, reserved())).is_none());
        assert!(order.react(&envelope(&order, out_of_stock())).is_none());
        assert_eq!(
            (order.status, order.changed),
            (OrderStatus::Confirmed, false)
        );
    }

    #[test]
    fn out_of_stock_fails_with_the_shortages_and_a_refund_is_recorded() {
        let mut order = pending();
        let Some(Event::OrderFailed(f)) = order.react(&envelope(&order, out_of_stock())) else {
            panic!("expected OrderFailed");
        };
        assert_eq!(f.reason, FailureReason::OutOfStock);
        assert!(
            f.detail.contains("SKU-RARE (requested 6, available 5)"),
            "{}",
            f.detail
        );
        assert_eq!(order.failure_reason, Some(FailureReason::OutOfStock));
        assert!(order.react(&envelope(&order, refunded())).is_none());
        assert!(order.refunded);
        assert_eq!(order.status, OrderStatus::Failed);
    }

    #[test]
    fn declined_payment_fails_the_order() {
        let mut order = pending();
        let declined = Event::PaymentFailed(PaymentFailed {
            amount: Money::from_minor(2_999),
            reason: "over the limit".into(),
        });
        let Some(Event::OrderFailed(f)) = order.react(&envelope(&order, declined)) else {
            panic!("expected OrderFailed");
        };
        assert_eq!(
            (f.reason, f.detail.as_str()),
            (FailureReason::PaymentDeclined, "over the limit")
        );
    }

    #[test]
    fn pending_and_confirmed_orders_cancel_once() {
        for confirmed in [false, true] {
            let mut order = pending();
            if confirmed {
                order.react(&envelope(&order, reserved()));
            }
            let Ok(Some(Event::OrderCancelled(c))) = order.cancel() else {
                panic!("expected OrderCancelled");
            };
            assert_eq!(c.reason, CancelReason::Customer);
            assert_eq!((c.total, c.items.len()), (Money::from_minor(2_999), 1));
            assert_eq!(c.order_created_at, order.created_at);
            assert_eq!(
                (order.status, order.failure_reason),
                (OrderStatus::Cancelled, Some(FailureReason::Cancelled))
            );
            order.changed = false;
            assert_eq!(order.cancel(), Ok(None), "a second cancel emits nothing");
            assert!(!order.changed);
        }
    }

    #[test]
    fn a_failed_order_cannot_be_cancelled() {
        let mut order = pending();
        order.react(&envelope(&order, out_of_stock()));
        let before = order.clone();
        assert_eq!(
            order.cancel(),
            Err(NotCancellable {
                status: OrderStatus::Failed,
                reason: Some(FailureReason::OutOfStock)
            })
        );
        assert_eq!(order, before);
    }

    #[test]
    fn news_after_a_cancellation_is_recorded_only_and_compensation_sets_flags() {
        let mut order = pending();
        order.cancel().unwrap();
        order.changed = false;
        for late in [
            reserved(),
            out_of_stock(),
            Event::PaymentFailed(PaymentFailed {
                amount: Money::from_minor(1),
                reason: "x".into(),
            }),
        ] {
            assert!(order.react(&envelope(&order, late)).is_none());
        }
        assert_eq!(
            (order.status, order.changed),
            (OrderStatus::Cancelled, false)
        );
        order.react(&envelope(&order, refunded()));
        order.react(&envelope(&order, released()));
        assert!(order.refunded && order.stock_released && order.changed);
    }

    #[test]
    fn the_deadline_expires_only_pending_orders_that_are_due() {
        let deadline = Duration::from_secs(60);
        let mut order = pending();
        let created = order.created_at;
        assert!(order
            .expire(created + chrono::Duration::seconds(59), deadline)
            .is_none());
        assert!(!order.changed);
        let Some(Event::OrderCancelled(c)) =
            order.expire(created + chrono::Duration::seconds(60), deadline)
        else {
            panic!("expected OrderCancelled");
        };
        assert_eq!(c.reason, CancelReason::Deadline);
        assert_eq!(
            (order.status, order.failure_reason),
            (OrderStatus::Failed, Some(FailureReason::DeadlineExceeded))
        );
        // Once: it is no longer PENDING.
        assert!(order
            .expire(created + chrono::Duration::seconds(120), deadline)
            .is_none());
        let mut confirmed = pending();
        confirmed.react(&envelope(&confirmed, reserved()));
        assert!(confirmed
            .expire(created + chrono::Duration::hours(1), deadline)
            .is_none());
        // An expired order is FAILED: the customer can no longer cancel it.
        assert!(order.cancel().is_err());
    }

    #[test]
    fn a_deadline_beyond_any_date_never_falls_due() {
        let mut order = pending();
        let forever = Duration::from_secs(u64::MAX);
        assert!(order.expire(Utc::now(), forever).is_none());
        assert_eq!(
            OrderState::due_cutoff(Utc::now(), forever),
            DateTime::<Utc>::MIN_UTC
        );
        let now = Utc::now();
        assert_eq!(
            OrderState::due_cutoff(now, Duration::from_secs(60)),
            now - chrono::Duration::seconds(60)
        );
    }

    #[test]
    fn the_customer_is_the_tokens_subject() {
        assert_eq!(customer_for(Some("c-1"), None), Ok("c-1".to_owned()));
        assert_eq!(customer_for(None, Some("c-1")), Ok("c-1".to_owned()));
        assert_eq!(customer_for(Some("c-1"), Some("c-1")), Ok("c-1".to_owned()));
        assert_eq!(
            customer_for(Some("c-2"), Some("c-1")),
            Err(CustomerRefusal::NotTheCaller)
        );
        assert_eq!(customer_for(None, None), Err(CustomerRefusal::Missing));
    }
}
