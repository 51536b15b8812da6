//! The saga's shared language: domain newtypes (parsed once, at the edge),
//! the typed events the three services exchange and the JSON envelope they
//! travel in.
//!
//! Wire format of one Kafka message value (key = order ID):
//!
//! ```json
//! {
//!   "event_id": "0190…",
//!   "event_type": "OrderCreated",
//!   "order_id": "0190…",
//!   "correlation_id": "c0ffee…",
//!   "causation_id": null,
//!   "occurred_at": "2026-11-21T12:00:00.123456Z",
//!   "schema_version": 1,
//!   "data": { "customer_id": "c-42", "items": [ … ], "total": "59.98" }
//! }
//! ```

pub mod asyncapi;
pub mod compat;
pub mod contract;
mod domain;
mod envelope;
pub mod headers;
mod named;
pub mod topics;

pub use contract::Service;
pub use domain::{
    CancelReason, CorrelationId, CustomerId, DomainError, FailureReason, LineItem, Money, OrderId,
    Quantity, Sku, MAX_ITEMS_PER_ORDER, MAX_QUANTITY, MAX_UNIT_PRICE_MINOR,
};
pub use envelope::{
    DecodeError, Envelope, Event, EventType, Header, InventoryOutOfStock, InventoryReleased,
    InventoryReserved, OrderCancelled, OrderConfirmed, OrderCreated, OrderFailed, PaymentFailed,
    PaymentRefunded, PaymentSucceeded, ReservedLine, Shortage, SCHEMA_VERSION,
};

#[doc(hidden)]
pub use serde as __serde;
#[doc(hidden)]
pub use utoipa as __utoipa;
