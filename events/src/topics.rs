//! Topic names. Every service can prefix them (`KAFKA_TOPIC_PREFIX`) so that
//! several isolated systems — or test runs — can share one broker.

/// Events emitted by order-service: `OrderCreated`, `OrderConfirmed`, `OrderFailed`,
/// `OrderCancelled`.
pub const ORDER_EVENTS: &str = "order-events";
/// Events emitted by payment-service: `PaymentSucceeded`, `PaymentFailed`, `PaymentRefunded`.
pub const PAYMENT_EVENTS: &str = "payment-events";
/// Events emitted by inventory-service: `InventoryReserved`, `InventoryOutOfStock`,
/// `InventoryReleased`.
pub const INVENTORY_EVENTS: &str = "inventory-events";

/// All saga topics, in the order the saga uses them.
pub const ALL: [&str; 3] = [ORDER_EVENTS, PAYMENT_EVENTS, INVENTORY_EVENTS];

/// Suffix of the dead-letter topic that belongs to each topic.
pub const DLQ_SUFFIX: &str = ".dlq";

/// The dead-letter topic of `topic`.
pub fn dlq(topic: &str) -> String {
    format!("{topic}{DLQ_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_topic_names() {
        assert_eq!(dlq(ORDER_EVENTS), "order-events.dlq");
        assert_eq!(dlq("t1-payment-events"), "t1-payment-events.dlq");
    }
}
