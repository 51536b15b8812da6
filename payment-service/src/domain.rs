//! The payment rules, as pure functions over the payments a batch knows:
//! charge (or decline) an order once, refund a charged one once, whichever
//! of `InventoryOutOfStock` and `OrderCancelled` asks first, and never
//! charge an order that was cancelled before its charge.

use std::collections::HashMap;

use events::{
    CancelReason, Envelope, Event, Money, PaymentFailed, PaymentRefunded, PaymentSucceeded,
};
use uuid::Uuid;

/// Refund reason when inventory could not serve the order.
pub const REFUND_OUT_OF_STOCK: &str = "out of stock";
/// Refund reason when the order was cancelled (by its customer or its deadline).
pub const REFUND_ORDER_CANCELLED: &str = "order cancelled";

events::named_enum! {
    /// Where a payment stands.
    pub enum PaymentStatus: "payment status" {
        Charged => "CHARGED",
        Declined => "DECLINED",
        Refunded => "REFUNDED",
    }
}

/// A payment as the batch sees it: read (locked) from the table or made by
/// an earlier step of the same batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Payment {
    pub payment_id: Uuid,
    pub amount: Money,
    pub status: PaymentStatus,
    pub decline_reason: Option<String>,
    pub refund_reason: Option<String>,
    pub correlation_id: String,
    /// Not in the table yet (inserted by this batch).
    pub new: bool,
    /// Status changed by this batch.
    pub changed: bool,
}

/// What a batch knows of its orders: their payments, and the orders that
/// were cancelled before any payment (`true`: learnt by this batch).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Book {
    pub payments: HashMap<Uuid, Payment>,
    pub cancelled: HashMap<Uuid, (CancelReason, bool)>,
}

/// Whether the gateway declines a charge, decided by the caller (limit,
/// simulated failures) so the rules stay deterministic.
pub type Decline<'a> = &'a dyn Fn(Money) -> Option<String>;

impl Book {
    /// What `env` does to the book: `Ok(Some(event))` to emit, `Ok(None)`
    /// for nothing to do, `Err` when the event cannot be applied (it is
    /// dead-lettered, and nothing changed).
    pub fn react(&mut self, env: &Envelope, decline: Decline<'_>) -> Result<Option<Event>, String> {
        let id = env.order_id.as_uuid();
        match &env.event {
            Event::OrderCreated(order) => {
                if self.payments.contains_key(&id) {
                    // Charged (or declined) before under another event ID.
                    tracing::warn!("order already has a payment; not charging twice");
                    return Ok(None);
                }
                if let Some((reason, _)) = self.cancelled.get(&id) {
                    tracing::warn!(%reason, "order was cancelled before it was charged; not charging");
                    return Ok(None);
                }
                let amount = order.total;
                let declined = decline(amount);
                let payment_id = Uuid::now_v7();
                let status = if declined.is_some() {
                    PaymentStatus::Declined
                } else {
                    PaymentStatus::Charged
                };
                self.payments.insert(
                    id,
                    Payment {
                        payment_id,
                        amount,
                        status,
                        decline_reason: declined.clone(),
                        refund_reason: None,
                        correlation_id: env.correlation_id.to_string(),
                        new: true,
                        changed: false,
                    },
                );
                Ok(Some(match declined {
                    Some(reason) => {
                        tracing::info!(amount = %amount, reason = %reason, "payment declined");
                        Event::PaymentFailed(PaymentFailed { amount, reason })
                    }
                    None => {
                        tracing::info!(amount = %amount, "payment charged");
                        Event::PaymentSucceeded(PaymentSucceeded {
                            payment_id,
                            amount,
                            items: order.items.clone(),
                        })
                    }
                }))
            }
            Event::InventoryOutOfStock(_) => {
                let Some(p) = self.payments.get_mut(&id) else {
                    return Err(format!("no payment for order {} to refund", env.order_id));
                };
                match p.status {
                    PaymentStatus::Charged => Ok(Some(refund(p, REFUND_OUT_OF_STOCK))),
                    PaymentStatus::Refunded => Ok(None),
                    other => Err(format!(
                        "cannot refund a payment in state {}",
                        other.as_str()
                    )),
                }
            }
            Event::OrderCancelled(c) => match self.payments.get_mut(&id) {
                Some(p) if p.status == PaymentStatus::Charged => {
                    Ok(Some(refund(p, REFUND_ORDER_CANCELLED)))
                }
                // Declined: nothing taken. Refunded: given back already.
                Some(_) => Ok(None),
                None => {
                    self.cancelled.entry(id).or_insert((c.reason, true));
                    tracing::info!(reason = %c.reason, "order cancelled before any charge; it will not be charged");
                    Ok(None)
                }
            },
            _ => Ok(None),
        }
    }
}

fn refund(p: &mut Payment, reason: &str) -> Event {
    p.status = PaymentStatus::Refunded;
    p.refund_reason = Some(reason.to_owned());
    p.changed = true;
    tracing::info!(amount = %p.amount, reason, "payment refunded");
    Event::PaymentRefunded(PaymentRefunded {
        payment_id: p.payment_id,
        amount: p.amount,
        reason: reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{CorrelationId, InventoryOutOfStock, OrderCancelled, OrderCreated, OrderId};

    fn never(_: Money) -> Option<String> {
        None
    }

    fn over_1000(m: Money) -> Option<String> {
        (m.minor() > 100_000).then(|| "over the limit".to_owned())
    }

    fn created(total_minor: i64) -> Envelope {
        let order = OrderCreated {
            customer_id: events::CustomerId::parse("c-1").unwrap(),
            items: vec![],
            total: Money::from_minor(total_minor),
        };
        Envelope::new(
            OrderId::new(),
            CorrelationId::generate(),
            Event::OrderCreated(order),
        )
    }

    fn out_of_stock(of: &Envelope) -> Envelope {
        Envelope::caused_by(
            of,
            Event::InventoryOutOfStock(InventoryOutOfStock { shortages: vec![] }),
        )
    }

    fn cancelled(of: &Envelope) -> Envelope {
        Envelope::caused_by(
            of,
            Event::OrderCancelled(OrderCancelled {
                reason: CancelReason::Customer,
                order_created_at: chrono::Utc::now(),
                items: vec![],
                total: Money::from_minor(1),
            }),
        )
    }

    fn refunds(event: &Result<Option<Event>, String>) -> Option<&str> {
        match event {
            Ok(Some(Event::PaymentRefunded(r))) => Some(r.reason.as_str()),
            _ => None,
        }
    }

    #[test]
    fn charges_once_and_refunds_once_within_one_batch() {
        let mut book = Book::default();
        let order = created(2_999);
        assert!(matches!(
            book.react(&order, &never),
            Ok(Some(Event::PaymentSucceeded(_)))
        ));
        // The same order again (another event ID): not charged twice.
        assert_eq!(book.react(&order, &never), Ok(None));
        let oos = out_of_stock(&order);
        assert_eq!(refunds(&book.react(&oos, &never)), Some("out of stock"));
        assert_eq!(book.react(&oos, &never), Ok(None));
        let p = &book.payments[&order.order_id.as_uuid()];
        assert_eq!((p.status, p.new), (PaymentStatus::Refunded, true));
    }

    #[test]
    fn refusing_a_refund_changes_nothing() {
        let mut book = Book::default();
        let unknown = out_of_stock(&created(100));
        let why = book.react(&unknown, &never).unwrap_err();
        assert!(why.contains("no payment for order"), "{why}");
        assert_eq!(book, Book::default());
        let declined = created(100_001);
        assert!(matches!(
            book.react(&declined, &over_1000),
            Ok(Some(Event::PaymentFailed(_)))
        ));
        let why = book.react(&out_of_stock(&declined), &never).unwrap_err();
        assert!(why.contains("DECLINED"), "{why}");
        let p = &book.payments[&declined.order_id.as_uuid()];
        assert_eq!((p.status, p.changed), (PaymentStatus::Declined, false));
    }

    #[test]
    fn a_cancellation_refunds_a_charge_once_whichever_refund_comes_first() {
        for cancel_first in [true, false] {
            let mut book = Book::default();
            let order = created(2_999);
            book.react(&order, &never).unwrap();
            let (first, second) = if cancel_first {
                (cancelled(&order), out_of_stock(&order))
            } else {
                (out_of_stock(&order), cancelled(&order))
            };
            assert!(refunds(&book.react(&first, &never)).is_some());
            assert_eq!(book.react(&second, &never), Ok(None), "refunded twice");
            assert_eq!(book.react(&first, &never), Ok(None));
            let p = &book.payments[&order.order_id.as_uuid()];
            let want = if cancel_first {
                "order cancelled"
            } else {
                "out of stock"
            };
            assert_eq!(p.refund_reason.as_deref(), Some(want));
        }
    }

    #[test]
    fn a_cancellation_of_a_declined_payment_changes_nothing() {
        let mut book = Book::default();
        let order = created(100_001);
        book.react(&order, &over_1000).unwrap();
        let before = book.clone();
        assert_eq!(book.react(&cancelled(&order), &never), Ok(None));
        assert_eq!(book, before);
    }

    #[test]
    fn an_order_cancelled_before_its_charge_is_never_charged() {
        let mut book = Book::default();
        let order = created(2_999);
        assert_eq!(book.react(&cancelled(&order), &never), Ok(None));
        assert_eq!(
            book.cancelled.get(&order.order_id.as_uuid()),
            Some(&(CancelReason::Customer, true))
        );
        // The OrderCreated comes later (replayed from a dead-letter topic).
        assert_eq!(book.react(&order, &never), Ok(None));
        assert!(book.payments.is_empty());
    }

    #[test]
    fn statuses_round_trip() {
        for &st in PaymentStatus::ALL {
            assert_eq!(PaymentStatus::try_from(st.as_str().to_owned()), Ok(st));
        }
        assert!(PaymentStatus::try_from("VOID".to_owned()).is_err());
    }
}
