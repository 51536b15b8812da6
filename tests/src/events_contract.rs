//! Every message the tests read from a topic is checked against the event
//! contract, the AsyncAPI document the `events` crate generates (and the
//! services serve at `/asyncapi.json`), as every HTTP answer is checked
//! against the services' OpenAPI documents:
//! - a saga event (a message with the `event_type` and `content-type`
//!   headers the outbox sets) against its event type's envelope schema, its
//!   headers against the message's headers schema, and its key against its
//!   `order_id`;
//! - a dead letter's headers against the `DeadLetter` message's.
//!
//! Messages a test wrote by hand without those headers (junk, unknown
//! event types) are what the consumers must survive, not the contract.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::contract::errors;
use crate::TopicMessage;

static DOCUMENT: LazyLock<Value> = LazyLock::new(events::asyncapi::document);
static VALIDATORS: LazyLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A validator for the document's schema at `pointer` (a `$ref`).
fn validator(pointer: &str) -> anyhow::Result<Arc<jsonschema::Validator>> {
    let mut cache = VALIDATORS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(v) = cache.get(pointer) {
        return Ok(v.clone());
    }
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": DOCUMENT["components"],
        "allOf": [{"$ref": pointer}],
    });
    let v = Arc::new(
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .map_err(|e| anyhow::anyhow!("the contract's {pointer} does not compile: {e}"))?,
    );
    cache.insert(pointer.to_owned(), v.clone());
    Ok(v)
}

fn validate(pointer: &str, instance: &Value) -> anyhow::Result<()> {
    let validator = validator(pointer)?;
    if let Some(errors) = errors(&validator, instance) {
        bail!("does not match the event contract's {pointer}: {errors}\n{instance}");
    }
    Ok(())
}

/// Checks `m`, read from `topic`, against the contract (see the module).
pub fn check(topic: &str, m: &TopicMessage) -> anyhow::Result<()> {
    let headers: Map<String, Value> = m
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let headers = Value::Object(headers);
    if topic.ends_with(events::topics::DLQ_SUFFIX) {
        return validate("#/components/messages/DeadLetter/headers", &headers);
    }
    let (Some(event_type), Some(_)) = (
        m.header(events::headers::EVENT_TYPE),
        m.header(events::headers::CONTENT_TYPE),
    ) else {
        return Ok(());
    };
    let Some(kind) = events::EventType::parse(event_type) else {
        bail!("event type {event_type} is not in the event contract");
    };
    let payload: Value =
        serde_json::from_slice(&m.payload).context("a saga event's value is not JSON")?;
    validate(&format!("#/components/schemas/{kind}Envelope"), &payload)?;
    validate(&format!("#/components/messages/{kind}/headers"), &headers)?;
    if m.key.as_deref() != payload["order_id"].as_str() {
        bail!("keyed {:?}, but about order {}", m.key, payload["order_id"]);
    }
    Ok(())
}

/// The AsyncAPI Initiative's schema of AsyncAPI 3.0.0 documents (see
/// `tests/schemas/README.md`).
pub const ASYNCAPI_3_0_SCHEMA: &str = include_str!("../schemas/asyncapi-3.0.0.schema.json");

/// Checks that `doc` is a valid AsyncAPI 3.0 document.
pub fn validate_document(doc: &Value) -> anyhow::Result<()> {
    let schema: Value = serde_json::from_str(ASYNCAPI_3_0_SCHEMA)?;
    let validator = jsonschema::draft7::new(&schema)
        .map_err(|e| anyhow::anyhow!("the AsyncAPI 3.0 schema does not compile: {e}"))?;
    if let Some(errors) = errors(&validator, doc) {
        bail!("not a valid AsyncAPI 3.0 document: {errors}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_contract_is_a_valid_asyncapi_3_0_document() {
        if let Err(e) = validate_document(&DOCUMENT) {
            panic!("{e:#}");
        }
        let mut broken = DOCUMENT.clone();
        broken["operations"]["order-service.sends.order-events"]["action"] = json!("publish");
        assert!(validate_document(&broken).is_err(), "the check bites");
    }

    fn message(kind: events::EventType, edit: impl FnOnce(&mut Value)) -> TopicMessage {
        let mut payload =
            serde_json::to_value(events::asyncapi::example(kind)).unwrap_or_else(|e| panic!("{e}"));
        edit(&mut payload);
        TopicMessage {
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: payload["order_id"].as_str().map(str::to_owned),
            headers: vec![
                ("event_type".into(), kind.as_str().into()),
                (
                    "event_id".into(),
                    payload["event_id"].as_str().unwrap_or("").into(),
                ),
                ("correlation_id".into(), "c-1".into()),
                ("content-type".into(), "application/json".into()),
            ],
            payload: serde_json::to_vec(&payload).unwrap_or_default(),
        }
    }

    #[test]
    fn the_examples_pass_and_a_broken_field_bites() {
        for kind in events::EventType::ALL {
            let ok = message(*kind, |_| {});
            assert!(
                check("order-events", &ok).is_ok(),
                "{kind}: {:?}",
                check("order-events", &ok)
            );
        }
        use events::EventType::*;
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let broken: Vec<(events::EventType, Edit)> = vec![
            (
                OrderCreated,
                Box::new(|p: &mut Value| p["data"]["total"] = json!(59.98)),
            ),
            (
                OrderCreated,
                Box::new(|p: &mut Value| {
                    p["data"].as_object_mut().map(|d| d.remove("items"));
                }),
            ),
            (
                OrderCancelled,
                Box::new(|p: &mut Value| p["data"]["reason"] = json!("bored")),
            ),
            (
                PaymentRefunded,
                Box::new(|p: &mut Value| p["event_type"] = json!("PaymentSucceeded")),
            ),
            (
                InventoryReserved,
                Box::new(|p: &mut Value| p["schema_version"] = json!(2)),
            ),
            (
                InventoryReserved,
                Box::new(|p: &mut Value| p["order_id"] = json!("not-a-uuid")),
            ),
        ];
        for (kind, edit) in broken {
            let m = message(kind, edit);
            assert!(check("order-events", &m).is_err(), "{kind} passed: {:?}", m);
        }
        let mut unkeyed = message(OrderCreated, |_| {});
        unkeyed.key = Some("another-order".into());
        assert!(check("order-events", &unkeyed).is_err());
        // Junk without the outbox's headers is not the contract's business;
        // a dead letter must say where it came from.
        let junk = TopicMessage {
            headers: vec![],
            payload: b"not json".to_vec(),
            ..message(OrderCreated, |_| {})
        };
        assert!(check("order-events", &junk).is_ok());
        assert!(check("order-events.dlq", &junk).is_err());
    }
}
