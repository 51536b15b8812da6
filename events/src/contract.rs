//! Who sends and who receives each event: the choreography in one table.
//!
//! The services' consumers accept exactly what [`EventType::consumers`]
//! names for them, and the AsyncAPI document ([`crate::asyncapi`]) is
//! generated from the same table, so the two cannot drift apart.

use crate::{topics, EventType};

crate::named_enum! {
    /// The three services of the saga.
    pub enum Service: "service" {
        Order => "order-service",
        Payment => "payment-service",
        Inventory => "inventory-service",
    }
}

impl EventType {
    /// The (unprefixed) topic events of this type are published on: the
    /// one their producer owns.
    pub fn topic(self) -> &'static str {
        match self.producer() {
            Service::Order => topics::ORDER_EVENTS,
            Service::Payment => topics::PAYMENT_EVENTS,
            Service::Inventory => topics::INVENTORY_EVENTS,
        }
    }

    /// The service that emits events of this type.
    pub fn producer(self) -> Service {
        use EventType::*;
        match self {
            OrderCreated | OrderConfirmed | OrderFailed | OrderCancelled => Service::Order,
            PaymentSucceeded | PaymentFailed | PaymentRefunded => Service::Payment,
            InventoryReserved | InventoryOutOfStock | InventoryReleased => Service::Inventory,
        }
    }

    /// The services that act on events of this type. `OrderConfirmed` and
    /// `OrderFailed` end the saga: they are for the world outside it.
    pub fn consumers(self) -> &'static [Service] {
        use EventType::*;
        match self {
            OrderCreated | OrderCancelled => &[Service::Payment],
            OrderConfirmed | OrderFailed => &[],
            PaymentSucceeded | PaymentRefunded => &[Service::Order, Service::Inventory],
            PaymentFailed | InventoryReserved | InventoryReleased => &[Service::Order],
            InventoryOutOfStock => &[Service::Order, Service::Payment],
        }
    }

    /// Whether `service` acts on events of this type.
    pub fn consumed_by(self, service: Service) -> bool {
        self.consumers().contains(&service)
    }
}

impl Service {
    /// The topics this service reads: those of the event types it consumes.
    pub fn subscribes(self) -> Vec<&'static str> {
        topics::ALL
            .into_iter()
            .filter(|t| {
                EventType::ALL
                    .iter()
                    .any(|k| k.topic() == *t && k.consumed_by(self))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_event_goes_back_to_its_producer() {
        for kind in EventType::ALL {
            assert!(!kind.consumed_by(kind.producer()), "{kind}");
        }
    }

    #[test]
    fn subscriptions_follow_from_what_each_service_consumes() {
        assert_eq!(
            Service::Order.subscribes(),
            [topics::PAYMENT_EVENTS, topics::INVENTORY_EVENTS]
        );
        assert_eq!(
            Service::Payment.subscribes(),
            [topics::ORDER_EVENTS, topics::INVENTORY_EVENTS]
        );
        assert_eq!(Service::Inventory.subscribes(), [topics::PAYMENT_EVENTS]);
    }
}
