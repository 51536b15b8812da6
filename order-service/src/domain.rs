//! The order's domain: the `POST /orders` body parsed at the edge, the
//! order's status, and the saga's rules as pure functions over an order's
//! state: how it reacts to the other services' events, when it may be
//! cancelled, when its deadline expires it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use events::{
    CancelReason, CustomerId, DomainError, Envelope, Event, FailureReason, LineItem, Money,
    OrderCancelled, OrderConfirmed, OrderFailed, Quantity, Sku, MAX_ITEMS_PER_ORDER,
    MAX_UNIT_PRICE_MINOR,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The body of `POST /orders` as it arrives. Field types are loose on
/// purpose so that every rule is checked here and reported with the field
/// that broke it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"customer_id": "c-42", "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "29.99"}]}))]
pub struct CreateOrderRequest {
    /// Who orders: 1 to 128 letters, digits, `-`, `_`, `.`, `@`, `:`.
    /// Required when authentication is off; with it on, the token's `sub`
    /// is the customer and this may be left out (if given, it must equal
    /// `sub`, else 403).
    #[serde(default)]
    #[schema(example = "c-42")]
    pub customer_id: Option<String>,
    /// 1 to 100 lines.
    pub items: Vec<ItemRequest>,
}

/// One line of `POST /orders`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    /// 1 to 64 letters, digits, `-`, `_`, `.`.
    #[schema(example = "SKU-1")]
    pub sku: String,
    /// 1 to 1000.
    #[schema(example = 2)]
    pub quantity: i64,
    /// A decimal string, more than 0, at most two decimals.
    #[schema(example = "29.99")]
    pub unit_price: String,
}

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
    /// Checks every rule; the error names the offending field.
    pub fn parse(req: CreateOrderRequest) -> Result<Self, String> {
        let field = |name: String| move |e: DomainError| format!("{name}: {e}");
        let customer_id = req
            .customer_id
            .ok_or_else(|| "customer_id: required".to_owned())
            .and_then(|c| CustomerId::parse(c).map_err(field("customer_id".into())))?;
        if req.items.is_empty() {
            return Err("items: an order needs at least one item".into());
        }
        if req.items.len() > MAX_ITEMS_PER_ORDER {
            return Err(format!(
                "items: at most {MAX_ITEMS_PER_ORDER} items per order, got {}",
                req.items.len()
            ));
        }
        let mut items = Vec::with_capacity(req.items.len());
        let mut total = Money::ZERO;
        for (i, item) in req.items.into_iter().enumerate() {
            let sku = Sku::parse(item.sku).map_err(field(format!("items[{i}].sku")))?;
            let quantity =
                Quantity::new(item.quantity).map_err(field(format!("items[{i}].quantity")))?;
            let unit_price = Money::parse_decimal(&item.unit_price)
                .map_err(field(format!("items[{i}].unit_price")))?;
            if unit_price.minor() <= 0 {
                return Err(format!("items[{i}].unit_price: must be greater than 0"));
            }
            if unit_price.minor() > MAX_UNIT_PRICE_MINOR {
                return Err(format!(
                    "items[{i}].unit_price: at most {}",
                    Money::from_minor(MAX_UNIT_PRICE_MINOR)
                ));
            }
            let line = LineItem {
                sku,
                quantity,
                unit_price,
            };
            total = line
                .line_total()
                .and_then(|t| total.checked_add(t))
                .ok_or_else(|| "items: order total is too large".to_owned())?;
            items.push(line);
        }
        Ok(Self {
            customer_id,
            items,
            total,
        })
    }

    /// A stable text form of the order, to tell a retry from a different
    /// request under the same idempotency key.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_customer_is_the_tokens_subject() {
        use super::{customer_for, CustomerRefusal};
        assert_eq!(customer_for(Some("c-1"), None), Ok("c-1".to_owned()));
        assert_eq!(customer_for(None, Some("c-1")), Ok("c-1".to_owned()));
        assert_eq!(customer_for(Some("c-1"), Some("c-1")), Ok("c-1".to_owned()));
        assert_eq!(
            customer_for(Some("c-2"), Some("c-1")),
            Err(CustomerRefusal::NotTheCaller)
        );
        assert_eq!(customer_for(None, None), Err(CustomerRefusal::Missing));
    }

    use super::*;

    fn req(json: serde_json::Value) -> CreateOrderRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn valid_order_totals_in_minor_units() {
        let order = NewOrder::parse(req(serde_json::json!({
            "customer_id": "c-42",
            "items": [
                {"sku": "SKU-1", "quantity": 2, "unit_price": "29.99"},
                {"sku": "SKU-2", "quantity": 1, "unit_price": "0.5"}
            ]
        })))
        .unwrap();
        assert_eq!(order.total, Money::from_minor(6048));
        assert_eq!(order.items.len(), 2);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases = [
            (
                serde_json::json!({"customer_id": "", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}),
                "customer_id",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": []}),
                "items",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "", "quantity": 1, "unit_price": "1"}]}),
                "items[0].sku",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 0, "unit_price": "1"}]}),
                "items[0].quantity",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1000000, "unit_price": "1"}]}),
                "items[0].quantity",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "0"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "-1.00"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1.001"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}, {"sku": "B", "quantity": -2, "unit_price": "1"}]}),
                "items[1].quantity",
            ),
        ];
        for (body, field) in cases {
            let err = NewOrder::parse(req(body.clone())).unwrap_err();
            assert!(err.starts_with(field), "{body} → {err}");
        }
    }

    #[test]
    fn too_many_items_are_refused() {
        let items: Vec<_> = (0..=MAX_ITEMS_PER_ORDER)
            .map(|i| serde_json::json!({"sku": format!("S{i}"), "quantity": 1, "unit_price": "1"}))
            .collect();
        let err = NewOrder::parse(req(serde_json::json!({"customer_id": "c", "items": items})))
            .unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn fingerprint_tells_bodies_apart() {
        let a = NewOrder::parse(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}))).unwrap();
        let b = NewOrder::parse(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 2, "unit_price": "1"}]}))).unwrap();
        let a2 = NewOrder::parse(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1.00"}]}))).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a2.fingerprint());
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
mod rule_tests {
    use super::*;
    use events::{
        CorrelationId, InventoryOutOfStock, InventoryReleased, InventoryReserved, OrderId,
        PaymentFailed, PaymentRefunded, Shortage,
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
}
