//! The event contract as an AsyncAPI 3.0 document, generated from this
//! crate: the payload schemas from the Rust types (utoipa derives them, the
//! same way as the services' OpenAPI documents), who sends and who receives
//! each event from [`crate::contract`], an example of each event from real
//! values serialised by serde.
//!
//! The document is committed as `events/asyncapi.json` with a readable
//! table beside it, `docs/events.md`; `cargo run -p events --example
//! asyncapi` writes both, and a test fails when either differs from what
//! the code generates. Every service serves it at `GET /asyncapi.json`.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Map, Value};
use utoipa::openapi::ComponentsBuilder;
use uuid::Uuid;

use crate::contract::Service;
use crate::{
    headers, topics, CancelReason, CorrelationId, CustomerId, Envelope, Event, EventType,
    FailureReason, InventoryOutOfStock, InventoryReleased, InventoryReserved, LineItem, Money,
    OrderCancelled, OrderConfirmed, OrderCreated, OrderFailed, OrderId, PaymentFailed,
    PaymentRefunded, PaymentSucceeded, Quantity, ReservedLine, Shortage, Sku, SCHEMA_VERSION,
};

/// The version of the Kafka bindings used in the document.
const KAFKA_BINDINGS: &str = "0.5.0";

/// The whole document.
pub fn document() -> Value {
    let mut schemas = data_schemas();
    for kind in EventType::ALL {
        schemas.insert(envelope_name(*kind), envelope_schema(*kind));
    }
    let mut messages = Map::new();
    for kind in EventType::ALL {
        messages.insert(kind.as_str().to_owned(), message(*kind));
    }
    messages.insert("DeadLetter".to_owned(), dead_letter());
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Checkout saga events",
            "version": SCHEMA_VERSION.to_string(),
            "description": "The events order-service, payment-service and inventory-service \
                exchange over Kafka (a choreography: no coordinator). Every message is keyed by \
                its order's ID, so one order's events stay in one partition, in the order their \
                producer committed them. The value is a JSON envelope whose `event_type` names \
                the event and whose `data` holds it; consumers read `event_type` and \
                `schema_version` first, skip (and never dead-letter) event types they do not \
                handle, and ignore fields they do not know. Topic names may carry a prefix \
                (`KAFKA_TOPIC_PREFIX`). Generated from the `events` crate.",
            "license": {"name": "MIT OR Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "channels": channels(),
        "operations": operations(),
        "components": {
            "schemas": schemas,
            "messages": messages,
        },
    })
}

/// The document as committed: pretty JSON with a final newline.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

/// The schemas of the events' `data` and of what they are made of.
fn data_schemas() -> Map<String, Value> {
    let components = ComponentsBuilder::new()
        .schema_from::<OrderId>()
        .schema_from::<CorrelationId>()
        .schema_from::<OrderCreated>()
        .schema_from::<OrderConfirmed>()
        .schema_from::<OrderFailed>()
        .schema_from::<OrderCancelled>()
        .schema_from::<PaymentSucceeded>()
        .schema_from::<PaymentFailed>()
        .schema_from::<PaymentRefunded>()
        .schema_from::<InventoryReserved>()
        .schema_from::<InventoryOutOfStock>()
        .schema_from::<InventoryReleased>()
        // What they are made of (utoipa refers to these by name).
        .schema_from::<CustomerId>()
        .schema_from::<LineItem>()
        .schema_from::<Sku>()
        .schema_from::<Quantity>()
        .schema_from::<Money>()
        .schema_from::<FailureReason>()
        .schema_from::<CancelReason>()
        .schema_from::<ReservedLine>()
        .schema_from::<Shortage>()
        .build();
    match serde_json::to_value(components) {
        Ok(Value::Object(mut c)) => match c.remove("schemas") {
            Some(Value::Object(schemas)) => schemas,
            _ => Map::new(),
        },
        _ => Map::new(),
    }
}

fn envelope_name(kind: EventType) -> String {
    format!("{kind}Envelope")
}

/// The message value of one event type: the envelope with its `data`.
fn envelope_schema(kind: EventType) -> Value {
    json!({
        "type": "object",
        "description": format!("The envelope of `{kind}`. Fields a consumer does not know are ignored."),
        "required": ["event_id", "event_type", "order_id", "correlation_id", "occurred_at", "schema_version", "data"],
        "properties": {
            "event_id": {"type": "string", "format": "uuid", "description": "Unique per event; consumers deduplicate on it."},
            "event_type": {"type": "string", "const": kind.as_str()},
            "order_id": {"$ref": "#/components/schemas/OrderId"},
            "correlation_id": {"$ref": "#/components/schemas/CorrelationId"},
            "causation_id": {"type": ["string", "null"], "format": "uuid", "description": "The event this one was emitted in reaction to, if any."},
            "occurred_at": {"type": "string", "format": "date-time", "description": "When the producer decided it."},
            "schema_version": {
                "type": "integer",
                "const": SCHEMA_VERSION,
                "description": "The envelope's version. A consumer dead-letters a version newer than it reads (reason `unsupported schema_version N`), to be redriven after its upgrade.",
            },
            "data": {"$ref": format!("#/components/schemas/{kind}")},
        },
    })
}

/// The headers of an event message.
fn event_headers(kind: EventType) -> Value {
    let text = |description: &str| json!({"type": "string", "description": description});
    json!({
        "type": "object",
        "required": [headers::EVENT_TYPE, headers::EVENT_ID, headers::CORRELATION_ID, headers::CONTENT_TYPE],
        "properties": {
            headers::EVENT_TYPE: {"type": "string", "const": kind.as_str()},
            headers::EVENT_ID: {"type": "string", "format": "uuid"},
            headers::CORRELATION_ID: {"$ref": "#/components/schemas/CorrelationId"},
            headers::CONTENT_TYPE: {"type": "string", "const": "application/json"},
            headers::TRACEPARENT: text("W3C trace context of the span that published the event (absent when tracing is off)."),
            headers::REDRIVEN_FROM: text("On a message redriven from a dead-letter topic: `<dlq topic>/<partition>@<offset>`."),
            headers::REDRIVEN_AT: text("On a redriven message: when (RFC 3339)."),
            headers::PARKED_FROM: text("On an event published again by a consumer whose earlier build did not know its type: where it was first read, `<topic>/<partition>@<offset>`."),
        },
    })
}

/// The Kafka message key: the order's ID.
fn key_binding() -> Value {
    json!({
        "kafka": {
            "key": {"type": "string", "format": "uuid", "description": "The order's ID (the envelope's `order_id`)."},
            "bindingVersion": KAFKA_BINDINGS,
        }
    })
}

fn message(kind: EventType) -> Value {
    let consumers: Vec<&str> = kind.consumers().iter().map(|s| s.as_str()).collect();
    let summary = if consumers.is_empty() {
        format!(
            "Sent by {}; ends the saga (for the world outside it).",
            kind.producer()
        )
    } else {
        format!(
            "Sent by {}; received by {}.",
            kind.producer(),
            consumers.join(" and ")
        )
    };
    let example = example(kind);
    json!({
        "name": kind.as_str(),
        "title": kind.as_str(),
        "summary": summary,
        "contentType": "application/json",
        "headers": event_headers(kind),
        "payload": {"$ref": format!("#/components/schemas/{}", envelope_name(kind))},
        "correlationId": {"location": "$message.payload#/correlation_id"},
        "bindings": key_binding(),
        "examples": [{
            "name": kind.as_str(),
            "headers": {
                headers::EVENT_TYPE: kind.as_str(),
                headers::EVENT_ID: example.event_id.to_string(),
                headers::CORRELATION_ID: example.correlation_id.as_str(),
                headers::CONTENT_TYPE: "application/json",
                headers::TRACEPARENT: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            },
            "payload": serde_json::to_value(&example).unwrap_or(Value::Null),
        }],
    })
}

fn dead_letter() -> Value {
    let text = |description: &str| json!({"type": "string", "description": description});
    json!({
        "name": "DeadLetter",
        "title": "Dead letter",
        "summary": "A message a consumer could not take: not an envelope, a schema_version newer than it reads, an event its rules refuse, or one whose handling kept failing. Redrive it with `saga-admin dlq redrive`.",
        "headers": {
            "type": "object",
            "description": "The original message's headers, and these.",
            "required": [headers::DLQ_CONSUMER, headers::DLQ_REASON, headers::DLQ_TOPIC, headers::DLQ_PARTITION, headers::DLQ_OFFSET, headers::DLQ_FAILED_AT],
            "properties": {
                headers::DLQ_CONSUMER: text("The service whose consumer gave up on it."),
                headers::DLQ_REASON: text("Why: `malformed message: …` (with `unsupported schema_version N` for a newer envelope), the rule that refused it, or the error that kept recurring."),
                headers::DLQ_TOPIC: text("The topic it was read from."),
                headers::DLQ_PARTITION: text("Its partition there."),
                headers::DLQ_OFFSET: text("Its offset there."),
                headers::DLQ_FAILED_AT: text("When (RFC 3339)."),
                headers::DLQ_TRUNCATED: {"type": "string", "const": "true", "description": "Set on a copy sent without its value (too large for the dead-letter topic); the original stays at its offset."},
                headers::DLQ_ORIGINAL_SIZE: text("On a truncated copy: the value's size in bytes."),
            },
        },
        "payload": {"description": "The original value, unchanged (possibly not JSON at all), or none on a truncated copy."},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": "The original key (an order's ID for the services' own messages)."},
                "bindingVersion": KAFKA_BINDINGS,
            }
        },
    })
}

fn channels() -> Value {
    let mut channels = Map::new();
    for topic in topics::ALL {
        let kinds: Vec<EventType> = EventType::ALL
            .iter()
            .copied()
            .filter(|k| k.topic() == topic)
            .collect();
        let producer = kinds.first().map(|k| k.producer().as_str()).unwrap_or("?");
        let messages: Map<String, Value> = kinds
            .iter()
            .map(|k| {
                (
                    k.as_str().to_owned(),
                    json!({"$ref": format!("#/components/messages/{k}")}),
                )
            })
            .collect();
        channels.insert(
            topic.to_owned(),
            json!({
                "address": topic,
                "title": topic,
                "description": format!("The events {producer} emits, keyed by order ID. Published through {producer}'s transactional outbox: once each, in commit order per order."),
                "messages": messages,
                "bindings": {"kafka": {"bindingVersion": KAFKA_BINDINGS}},
            }),
        );
        let dlq = topics::dlq(topic);
        channels.insert(
            dlq.clone(),
            json!({
                "address": dlq,
                "title": dlq,
                "description": format!("Dead letters of {topic}: what a consumer of {topic} could not take."),
                "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
                "bindings": {"kafka": {"bindingVersion": KAFKA_BINDINGS}},
            }),
        );
    }
    Value::Object(channels)
}

/// `<service>.sends.<topic>`, `<service>.receives.<topic>` and
/// `<service>.dead-letters.<topic>`.
fn operations() -> Value {
    let mut ops = Map::new();
    let refs = |topic: &str, kinds: &[EventType]| -> Vec<Value> {
        kinds
            .iter()
            .map(|k| json!({"$ref": format!("#/channels/{topic}/messages/{k}")}))
            .collect()
    };
    for service in Service::ALL {
        for topic in topics::ALL {
            let sent: Vec<EventType> = EventType::ALL
                .iter()
                .copied()
                .filter(|k| k.topic() == topic && k.producer() == *service)
                .collect();
            if !sent.is_empty() {
                ops.insert(
                    format!("{service}.sends.{topic}"),
                    json!({
                        "action": "send",
                        "title": format!("{service} sends"),
                        "summary": format!("{service} publishes {}.", names(&sent)),
                        "channel": {"$ref": format!("#/channels/{topic}")},
                        "messages": refs(topic, &sent),
                    }),
                );
            }
            let received: Vec<EventType> = EventType::ALL
                .iter()
                .copied()
                .filter(|k| k.topic() == topic && k.consumed_by(*service))
                .collect();
            if !received.is_empty() {
                ops.insert(
                    format!("{service}.receives.{topic}"),
                    json!({
                        "action": "receive",
                        "title": format!("{service} receives"),
                        "summary": format!("{service} acts on {}; it skips every other event on {topic} (unread, never dead-lettered).", names(&received)),
                        "channel": {"$ref": format!("#/channels/{topic}")},
                        "messages": refs(topic, &received),
                        "bindings": {"kafka": {"groupId": {"type": "string", "const": service.as_str(), "description": "Prefixed like the topics."}, "bindingVersion": KAFKA_BINDINGS}},
                    }),
                );
                let dlq = topics::dlq(topic);
                ops.insert(
                    format!("{service}.dead-letters.{topic}"),
                    json!({
                        "action": "send",
                        "title": format!("{service} dead-letters"),
                        "summary": format!("{service} sends what it could not take from {topic} to {dlq}."),
                        "channel": {"$ref": format!("#/channels/{dlq}")},
                        "messages": [{"$ref": format!("#/channels/{dlq}/messages/DeadLetter")}],
                    }),
                );
            }
        }
    }
    Value::Object(ops)
}

fn names(kinds: &[EventType]) -> String {
    kinds
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A realistic event of each type, the same every time.
pub fn example(kind: EventType) -> Envelope {
    let at = |s: u32| -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, s)
            .single()
            .unwrap_or_default()
    };
    let id = |n: u128| Uuid::from_u128(0x0193_9b2e_7c4a_7000_8000_0000_0000_0000 + n);
    let sku = |s: &str| Sku::parse(s).unwrap_or_else(|_| unreachable!("a valid SKU"));
    let line = |s: &str, q: i64, minor: i64| LineItem {
        sku: sku(s),
        quantity: Quantity::new(q).unwrap_or_else(|_| unreachable!("a valid quantity")),
        unit_price: Money::from_minor(minor),
    };
    let items = vec![line("SKU-1", 2, 2999)];
    let total = Money::from_minor(5998);
    let reserved = vec![ReservedLine {
        sku: sku("SKU-1"),
        quantity: 2,
    }];
    let event = match kind {
        EventType::OrderCreated => Event::OrderCreated(OrderCreated {
            customer_id: CustomerId::parse("c-42").unwrap_or_else(|_| unreachable!("valid")),
            items,
            total,
        }),
        EventType::OrderConfirmed => Event::OrderConfirmed(OrderConfirmed {
            total,
            order_created_at: at(0),
        }),
        EventType::OrderFailed => Event::OrderFailed(OrderFailed {
            reason: FailureReason::OutOfStock,
            detail: "SKU-1: 2 requested, 1 available".to_owned(),
            order_created_at: at(0),
        }),
        EventType::OrderCancelled => Event::OrderCancelled(OrderCancelled {
            reason: CancelReason::Customer,
            order_created_at: at(0),
            items,
            total,
        }),
        EventType::PaymentSucceeded => Event::PaymentSucceeded(PaymentSucceeded {
            payment_id: id(2),
            amount: total,
            items,
        }),
        EventType::PaymentFailed => Event::PaymentFailed(PaymentFailed {
            amount: total,
            reason: "amount over the limit".to_owned(),
        }),
        EventType::PaymentRefunded => Event::PaymentRefunded(PaymentRefunded {
            payment_id: id(2),
            amount: total,
            reason: "order cancelled".to_owned(),
        }),
        EventType::InventoryReserved => {
            Event::InventoryReserved(InventoryReserved { items: reserved })
        }
        EventType::InventoryOutOfStock => Event::InventoryOutOfStock(InventoryOutOfStock {
            shortages: vec![Shortage {
                sku: sku("SKU-1"),
                requested: 2,
                available: 1,
            }],
        }),
        EventType::InventoryReleased => {
            Event::InventoryReleased(InventoryReleased { items: reserved })
        }
    };
    Envelope {
        event_id: id(10 + EventType::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u128),
        order_id: OrderId::from_uuid(id(1)),
        correlation_id: CorrelationId::parse("0f6a2c1e-5b7d-4e3a-9c8b-2d1f0e9a7b6c")
            .unwrap_or_else(|_| unreachable!("valid")),
        causation_id: (kind != EventType::OrderCreated).then(|| id(9)),
        occurred_at: at(1),
        schema_version: SCHEMA_VERSION,
        event,
    }
}

/// The document as a Markdown table for people: `docs/events.md`.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Events\n\n\
         Generated from the `events` crate by `cargo run -p events --example asyncapi`, with\n\
         the AsyncAPI 3.0 document [`events/asyncapi.json`](../events/asyncapi.json) (also\n\
         served by every service at `GET /asyncapi.json`; open it in any AsyncAPI viewer).\n\
         Every message is keyed by its order's ID; its value is the JSON envelope below\n\
         with the event in `data`; its headers repeat `event_type`, `event_id` and\n\
         `correlation_id`, with `content-type` and, when tracing is on, `traceparent`.\n\n\
         | event | topic | sent by | received by | `data` fields |\n|---|---|---|---|---|\n",
    );
    let schemas = data_schemas();
    for kind in EventType::ALL {
        let consumers: Vec<&str> = kind.consumers().iter().map(|s| s.as_str()).collect();
        let fields = schemas
            .get(kind.as_str())
            .map(field_list)
            .unwrap_or_default();
        out.push_str(&format!(
            "| `{kind}` | `{}` | {} | {} | {fields} |\n",
            kind.topic(),
            kind.producer(),
            if consumers.is_empty() {
                "(ends the saga)".to_owned()
            } else {
                consumers.join(", ")
            },
        ));
    }
    out.push_str(
        "\nEach topic has a dead-letter topic, `<topic>.dlq`: the original message with\n\
         the headers `dlq.consumer`, `dlq.reason`, `dlq.original.topic`,\n\
         `dlq.original.partition`, `dlq.original.offset` and `dlq.failed_at`.\n\n\
         An example of each event, as a consumer reads it:\n\n",
    );
    for kind in EventType::ALL {
        let json = serde_json::to_string(&example(*kind)).unwrap_or_default();
        out.push_str(&format!("- `{kind}`: `{json}`\n"));
    }
    out
}

/// `name` (required) and `name?` (optional) of an object schema.
fn field_list(schema: &Value) -> String {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    schema["properties"]
        .as_object()
        .map(|props| {
            props
                .keys()
                .map(|k| {
                    if required.contains(&k.as_str()) {
                        format!("`{k}`")
                    } else {
                        format!("`{k}`?")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo run -p events --example asyncapi` regenerates both files.
    #[test]
    fn the_committed_document_and_table_are_what_the_code_generates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let read = |path: &str| std::fs::read_to_string(dir.join(path)).unwrap_or_default();
        let committed = read("asyncapi.json");
        assert!(
            committed == document_text(),
            "events/asyncapi.json differs from what the events crate generates: run `cargo run -p events --example asyncapi`"
        );
        let table = read("../docs/events.md");
        assert!(
            table == markdown(),
            "docs/events.md differs from what the events crate generates: run `cargo run -p events --example asyncapi`"
        );
    }

    /// Every `$ref` in `v`.
    fn refs<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 50, "{}", all.len());
        for r in all {
            let pointer = r.strip_prefix('#').unwrap_or(r);
            assert!(doc.pointer(pointer).is_some(), "dangling {r}");
        }
    }

    #[test]
    fn every_event_type_has_a_message_on_its_topic_and_its_data_schema() {
        let doc = document();
        for kind in EventType::ALL {
            let k = kind.as_str();
            assert!(doc["components"]["messages"][k].is_object(), "{k}");
            assert!(doc["components"]["schemas"][k].is_object(), "{k}");
            assert!(
                doc["channels"][kind.topic()]["messages"][k].is_object(),
                "{k} on {}",
                kind.topic()
            );
            let example = &doc["components"]["messages"][k]["examples"][0]["payload"];
            let back: Envelope = serde_json::from_value(example.clone())
                .unwrap_or_else(|e| panic!("the {k} example does not read back: {e}"));
            assert_eq!(back.event.kind(), *kind);
        }
        for service in Service::ALL {
            for topic in service.subscribes() {
                assert!(
                    doc["operations"][format!("{service}.receives.{topic}")].is_object(),
                    "{service} receives {topic}"
                );
            }
        }
    }
}
