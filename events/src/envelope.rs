//! The JSON envelope every event travels in, and the typed events.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{
    CancelReason, CorrelationId, CustomerId, FailureReason, LineItem, Money, OrderId, Sku,
};

/// Version of the envelope and event payloads this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// One saga event with its metadata. Serialised as the Kafka message value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per event; consumers deduplicate on it.
    pub event_id: Uuid,
    /// The order the event is about; also the Kafka message key.
    pub order_id: OrderId,
    pub correlation_id: CorrelationId,
    /// The event this one was emitted in reaction to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    pub occurred_at: DateTime<Utc>,
    pub schema_version: u32,
    /// `event_type` and `data`.
    #[serde(flatten)]
    pub event: Event,
}

/// Every event of the saga. `event_type` names the variant, `data` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum Event {
    OrderCreated(OrderCreated),
    OrderConfirmed(OrderConfirmed),
    OrderFailed(OrderFailed),
    OrderCancelled(OrderCancelled),
    PaymentSucceeded(PaymentSucceeded),
    PaymentFailed(PaymentFailed),
    PaymentRefunded(PaymentRefunded),
    InventoryReserved(InventoryReserved),
    InventoryOutOfStock(InventoryOutOfStock),
    InventoryReleased(InventoryReleased),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderCreated {
    pub customer_id: CustomerId,
    pub items: Vec<LineItem>,
    pub total: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderConfirmed {
    pub total: Money,
    /// When the order was accepted: the saga's start.
    pub order_created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderFailed {
    pub reason: FailureReason,
    /// Human-readable detail (which SKU ran out, why the card was declined).
    pub detail: String,
    /// When the order was accepted: the saga's start.
    pub order_created_at: DateTime<Utc>,
}

/// The order will not be fulfilled: the customer cancelled it, or its
/// deadline passed while it was still PENDING. Whoever did something for it
/// undoes that (payment refunds, and inventory releases on the refund).
/// Carries the order so that a participant needs nothing else to react.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderCancelled {
    pub reason: CancelReason,
    /// When the order was accepted: the saga's start.
    pub order_created_at: DateTime<Utc>,
    pub items: Vec<LineItem>,
    pub total: Money,
}

/// The order was charged. Carries the items so inventory can reserve them
/// without asking anyone (choreography: events are self-contained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentSucceeded {
    pub payment_id: Uuid,
    pub amount: Money,
    pub items: Vec<LineItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentFailed {
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentRefunded {
    pub payment_id: Uuid,
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InventoryReserved {
    pub items: Vec<ReservedLine>,
}

/// One reserved SKU (an order's lines for the same SKU are merged, so the
/// quantity may exceed one line's limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReservedLine {
    pub sku: Sku,
    pub quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InventoryOutOfStock {
    /// Every SKU that could not be served; nothing was reserved.
    pub shortages: Vec<Shortage>,
}

/// Stock held for an order went back to `available` (its payment was
/// refunded after the reservation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InventoryReleased {
    pub items: Vec<ReservedLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Shortage {
    pub sku: Sku,
    pub requested: u32,
    /// Units on hand when the reservation was tried (0 for an unknown SKU).
    pub available: i64,
}

crate::named_enum! {
    /// The kinds of event, by their `event_type` text: what a consumer
    /// decides on before it reads an event's data.
    pub enum EventType: "event type" {
        OrderCreated => "OrderCreated",
        OrderConfirmed => "OrderConfirmed",
        OrderFailed => "OrderFailed",
        OrderCancelled => "OrderCancelled",
        PaymentSucceeded => "PaymentSucceeded",
        PaymentFailed => "PaymentFailed",
        PaymentRefunded => "PaymentRefunded",
        InventoryReserved => "InventoryReserved",
        InventoryOutOfStock => "InventoryOutOfStock",
        InventoryReleased => "InventoryReleased",
    }
}

impl Event {
    /// Which kind of event this is.
    pub fn kind(&self) -> EventType {
        match self {
            Event::OrderCreated(_) => EventType::OrderCreated,
            Event::OrderConfirmed(_) => EventType::OrderConfirmed,
            Event::OrderFailed(_) => EventType::OrderFailed,
            Event::OrderCancelled(_) => EventType::OrderCancelled,
            Event::PaymentSucceeded(_) => EventType::PaymentSucceeded,
            Event::PaymentFailed(_) => EventType::PaymentFailed,
            Event::PaymentRefunded(_) => EventType::PaymentRefunded,
            Event::InventoryReserved(_) => EventType::InventoryReserved,
            Event::InventoryOutOfStock(_) => EventType::InventoryOutOfStock,
            Event::InventoryReleased(_) => EventType::InventoryReleased,
        }
    }

    /// The `event_type` string, as in the envelope and the Kafka header.
    pub fn event_type(&self) -> &'static str {
        self.kind().as_str()
    }

    /// The (unprefixed) topic this event is published on: each service owns one.
    pub fn topic(&self) -> &'static str {
        self.kind().topic()
    }
}

/// Why a message value is not a saga event this build understands.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message has no value")]
    Empty,
    #[error("not a valid event envelope: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported schema_version {found} (this build reads up to {SCHEMA_VERSION})")]
    UnsupportedSchema { found: u32 },
}

/// The part of an envelope a consumer reads first: which event, in which
/// schema. Everything else (including fields this build does not know) is
/// left unread, so a consumer can skip an event type it does not handle,
/// even one added after it was built, without calling it malformed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Header {
    pub event_type: String,
    pub schema_version: u32,
}

impl Header {
    /// The event type, if this build knows it.
    pub fn kind(&self) -> Option<EventType> {
        EventType::parse(&self.event_type)
    }
}

impl Envelope {
    /// Reads only the header of a message value: an object with a string
    /// `event_type` and a `schema_version` this build can read.
    pub fn peek(bytes: &[u8]) -> Result<Header, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        let header: Header = serde_json::from_slice(bytes)?;
        check_version(header.schema_version)?;
        Ok(header)
    }

    /// A new event about `order_id`, stamped now with a fresh ID.
    pub fn new(order_id: OrderId, correlation_id: CorrelationId, event: Event) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            order_id,
            correlation_id,
            causation_id: None,
            occurred_at: Utc::now(),
            schema_version: SCHEMA_VERSION,
            event,
        }
    }

    /// A new event emitted in reaction to `cause`: same order, same correlation.
    pub fn caused_by(cause: &Envelope, event: Event) -> Self {
        Self {
            causation_id: Some(cause.event_id),
            ..Self::new(cause.order_id, cause.correlation_id.clone(), event)
        }
    }

    pub fn event_type(&self) -> &'static str {
        self.event.event_type()
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        let envelope: Envelope = serde_json::from_slice(bytes)?;
        check_version(envelope.schema_version)?;
        Ok(envelope)
    }
}

/// Versions 1 to [`SCHEMA_VERSION`] are readable; a newer one comes from a
/// producer upgraded before this consumer.
fn check_version(found: u32) -> Result<(), DecodeError> {
    if found == 0 || found > SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedSchema { found });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Quantity;

    fn item(sku: &str, qty: i64, price: &str) -> LineItem {
        LineItem {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::new(qty).unwrap(),
            unit_price: Money::parse_decimal(price).unwrap(),
        }
    }

    fn all_events() -> Vec<Event> {
        let items = vec![item("SKU-1", 2, "29.99"), item("SKU-2", 1, "5.00")];
        vec![
            Event::OrderCreated(OrderCreated {
                customer_id: CustomerId::parse("c-42").unwrap(),
                items: items.clone(),
                total: Money::from_minor(6498),
            }),
            Event::OrderConfirmed(OrderConfirmed {
                total: Money::from_minor(6498),
                order_created_at: Utc::now(),
            }),
            Event::OrderFailed(OrderFailed {
                reason: FailureReason::OutOfStock,
                detail: "SKU-2".into(),
                order_created_at: Utc::now(),
            }),
            Event::OrderCancelled(OrderCancelled {
                reason: CancelReason::Customer,
                order_created_at: Utc::now(),
                items: items.clone(),
                total: Money::from_minor(6498),
            }),
            Event::PaymentSucceeded(PaymentSucceeded {
                payment_id: Uuid::new_v4(),
                amount: Money::from_minor(6498),
                items,
            }),
            Event::PaymentFailed(PaymentFailed {
                amount: Money::from_minor(200_000),
                reason: "over limit".into(),
            }),
            Event::PaymentRefunded(PaymentRefunded {
                payment_id: Uuid::new_v4(),
                amount: Money::from_minor(6498),
                reason: "out of stock".into(),
            }),
            Event::InventoryReserved(InventoryReserved {
                items: vec![ReservedLine {
                    sku: Sku::parse("SKU-1").unwrap(),
                    quantity: 2,
                }],
            }),
            Event::InventoryOutOfStock(InventoryOutOfStock {
                shortages: vec![Shortage {
                    sku: Sku::parse("SKU-2").unwrap(),
                    requested: 1,
                    available: 0,
                }],
            }),
            Event::InventoryReleased(InventoryReleased {
                items: vec![ReservedLine {
                    sku: Sku::parse("SKU-1").unwrap(),
                    quantity: 2,
                }],
            }),
        ]
    }

    #[test]
    fn every_event_round_trips_through_the_envelope() {
        for event in all_events() {
            let env = Envelope::new(OrderId::new(), CorrelationId::generate(), event);
            let bytes = env.to_json().unwrap();
            let back = Envelope::from_json(&bytes).unwrap();
            assert_eq!(back, env);
        }
    }

    #[test]
    fn every_event_kind_is_its_event_type_and_the_header_names_it() {
        let events = all_events();
        assert_eq!(events.len(), EventType::ALL.len());
        for event in events {
            let env = Envelope::new(OrderId::new(), CorrelationId::generate(), event);
            let header = Envelope::peek(&env.to_json().unwrap()).unwrap();
            assert_eq!(header.event_type, env.event_type());
            assert_eq!(header.kind(), Some(env.event.kind()));
        }
    }

    #[test]
    fn the_header_reads_what_the_full_decoder_cannot() {
        // A newer producer's event type, with fields nobody here knows.
        let newer = br#"{"event_id":"not even a uuid","event_type":"LoyaltyPointsAwarded",
                         "schema_version":1,"data":{"points":10},"shiny":true}"#;
        let header = Envelope::peek(newer).unwrap();
        assert_eq!(header.event_type, "LoyaltyPointsAwarded");
        assert_eq!(header.kind(), None);
        assert!(Envelope::from_json(newer).is_err());
        // A newer schema version is not readable.
        let v2 = br#"{"event_type":"OrderCreated","schema_version":2,"data":{}}"#;
        let err = Envelope::peek(v2).unwrap_err();
        assert!(
            err.to_string().starts_with("unsupported schema_version 2"),
            "{err}"
        );
        // Not an envelope at all.
        for bad in [
            &b""[..],
            b"[]",
            b"{}",
            br#"{"event_type":7,"schema_version":1}"#,
        ] {
            assert!(
                Envelope::peek(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn envelope_has_the_documented_flat_fields() {
        let env = Envelope::new(
            OrderId::new(),
            CorrelationId::parse("corr-1").unwrap(),
            all_events().remove(0),
        );
        let v: serde_json::Value = serde_json::from_slice(&env.to_json().unwrap()).unwrap();
        assert_eq!(v["event_type"], "OrderCreated");
        assert_eq!(v["correlation_id"], "corr-1");
        assert_eq!(v["order_id"], env.order_id.to_string());
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["data"]["total"], "64.98");
        assert_eq!(v["data"]["items"][0]["unit_price"], "29.99");
        assert!(v["event_id"].as_str().unwrap().parse::<Uuid>().is_ok());
        assert!(chrono::DateTime::parse_from_rfc3339(v["occurred_at"].as_str().unwrap()).is_ok());
        assert!(v.get("causation_id").is_none());
    }

    #[test]
    fn order_cancelled_carries_its_reason_and_the_order() {
        let cancelled = all_events().remove(3);
        let env = Envelope::new(OrderId::new(), CorrelationId::generate(), cancelled);
        let v: serde_json::Value = serde_json::from_slice(&env.to_json().unwrap()).unwrap();
        assert_eq!(v["event_type"], "OrderCancelled");
        assert_eq!(v["data"]["reason"], "customer");
        assert_eq!(v["data"]["total"], "64.98");
        assert_eq!(v["data"]["items"][1]["sku"], "SKU-2");
        assert!(v["data"]["order_created_at"].is_string());
    }

    #[test]
    fn caused_by_keeps_order_and_correlation() {
        let cause = Envelope::new(
            OrderId::new(),
            CorrelationId::generate(),
            all_events().remove(0),
        );
        let effect = Envelope::caused_by(&cause, all_events().remove(1));
        assert_eq!(effect.order_id, cause.order_id);
        assert_eq!(effect.correlation_id, cause.correlation_id);
        assert_eq!(effect.causation_id, Some(cause.event_id));
        assert_ne!(effect.event_id, cause.event_id);
    }

    #[test]
    fn each_event_lives_on_its_owners_topic() {
        let owners: Vec<_> = all_events()
            .iter()
            .map(|e| (e.event_type(), e.topic()))
            .collect();
        assert_eq!(
            owners,
            vec![
                ("OrderCreated", "order-events"),
                ("OrderConfirmed", "order-events"),
                ("OrderFailed", "order-events"),
                ("OrderCancelled", "order-events"),
                ("PaymentSucceeded", "payment-events"),
                ("PaymentFailed", "payment-events"),
                ("PaymentRefunded", "payment-events"),
                ("InventoryReserved", "inventory-events"),
                ("InventoryOutOfStock", "inventory-events"),
                ("InventoryReleased", "inventory-events"),
            ]
        );
    }

    #[test]
    fn malformed_values_are_rejected_with_a_reason() {
        assert!(matches!(Envelope::from_json(b""), Err(DecodeError::Empty)));
        assert!(matches!(
            Envelope::from_json(b"{not json"),
            Err(DecodeError::Json(_))
        ));
        let unknown = br#"{"event_id":"00000000-0000-0000-0000-000000000001","order_id":"00000000-0000-0000-0000-000000000002","correlation_id":"c","occurred_at":"2026-01-01T00:00:00Z","schema_version":1,"event_type":"Teleported","data":{}}"#;
        assert!(matches!(
            Envelope::from_json(unknown),
            Err(DecodeError::Json(_))
        ));
        let mut env = Envelope::new(
            OrderId::new(),
            CorrelationId::generate(),
            all_events().remove(1),
        );
        env.schema_version = 99;
        let bytes = env.to_json().unwrap();
        assert!(matches!(
            Envelope::from_json(&bytes),
            Err(DecodeError::UnsupportedSchema { found: 99 })
        ));
        // A valid envelope whose payload breaks a domain rule is malformed too.
        let bad_qty = String::from_utf8(
            Envelope::new(
                OrderId::new(),
                CorrelationId::generate(),
                all_events().remove(0),
            )
            .to_json()
            .unwrap(),
        )
        .unwrap()
        .replace("\"quantity\":2", "\"quantity\":0");
        assert!(Envelope::from_json(bad_qty.as_bytes()).is_err());
    }
}
