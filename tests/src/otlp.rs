//! What an OTLP receiver inside a test collects, and the checks that one
//! order is one connected trace. Shared by the HTTP and gRPC export tests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;

use crate::System;

/// One exported span, flattened to what the checks need.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub attributes: HashMap<String, String>,
}

/// Spans received so far.
pub type Spans = Arc<Mutex<Vec<SpanRecord>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds the spans of one export request to `sink`.
pub fn record(sink: &Spans, req: ExportTraceServiceRequest) {
    let mut out = sink.lock().expect("spans lock");
    for rs in req.resource_spans {
        for ss in rs.scope_spans {
            for s in ss.spans {
                let attributes = s
                    .attributes
                    .iter()
                    .filter_map(|kv| {
                        let v = match kv.value.as_ref()?.value.as_ref()? {
                            AnyValue::StringValue(v) => v.clone(),
                            AnyValue::IntValue(v) => v.to_string(),
                            AnyValue::BoolValue(v) => v.to_string(),
                            AnyValue::DoubleValue(v) => v.to_string(),
                            _ => return None,
                        };
                        Some((kv.key.clone(), v))
                    })
                    .collect();
                out.push(SpanRecord {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    attributes,
                });
            }
        }
    }
}

/// Points this process's exporter at `endpoint` over `protocol`. Call before
/// the first `System::start` (telemetry starts once per process).
pub fn export_to(endpoint: &str, protocol: &str) {
    // Edition 2021: set_var is safe; the test binaries that call this run
    // one test each, before any service thread reads the environment.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", protocol);
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
}

/// Waits until the spans of `correlation_id` satisfy `done`.
pub async fn spans_of(
    spans: &Spans,
    correlation_id: &str,
    done: impl Fn(&[SpanRecord]) -> bool,
) -> anyhow::Result<Vec<SpanRecord>> {
    let done = &done;
    crate::poll(
        Duration::from_millis(50),
        || async move {
            let mine: Vec<SpanRecord> = spans
                .lock()
                .expect("spans lock")
                .iter()
                .filter(|s| {
                    s.attributes.get("correlation_id").map(String::as_str) == Some(correlation_id)
                })
                // Reads (the test polling GET /orders/{id}) are traces of their own.
                .filter(|s| !s.name.starts_with("GET "))
                .cloned()
                .collect();
            Ok(if done(&mine) { Ok(mine) } else { Err(mine) })
        },
        |mine| anyhow::anyhow!("spans for {correlation_id} incomplete: {mine:#?}"),
    )
    .await
}

pub fn consume_span<'a>(
    spans: &'a [SpanRecord],
    service: &str,
    event_type: &str,
) -> Option<&'a SpanRecord> {
    spans.iter().find(|s| {
        s.attributes.get("messaging.operation").map(String::as_str) == Some("process")
            && s.attributes.get("service").map(String::as_str) == Some(service)
            && s.attributes.get("event_type").map(String::as_str) == Some(event_type)
    })
}

fn is_ancestor<'a>(
    by_id: &HashMap<&'a str, &'a SpanRecord>,
    ancestor: &str,
    mut span: &'a SpanRecord,
) -> bool {
    while let Some(parent) = by_id.get(span.parent_span_id.as_str()) {
        if parent.span_id == ancestor {
            return true;
        }
        span = parent;
    }
    false
}

/// Checks one order's trace: one trace ID, every span tagged, and the chain
/// `steps` of (service, consumed event type), each consume span a descendant
/// of the one before through a publish span.
pub fn check_trace(spans: &[SpanRecord], order_id: &str, steps: &[(&str, &str)]) {
    let trace_ids: HashSet<_> = spans.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(trace_ids.len(), 1, "one trace per order: {spans:#?}");
    for s in spans {
        assert_eq!(
            s.attributes.get("order_id").map(String::as_str),
            Some(order_id),
            "{s:?}"
        );
        assert!(s.attributes.contains_key("event_type"), "{s:?}");
    }
    let by_id: HashMap<&str, &SpanRecord> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let root = spans
        .iter()
        .find(|s| s.name == "POST /orders")
        .expect("the HTTP request span");
    assert_eq!(
        root.attributes
            .get("http.request.method")
            .map(String::as_str),
        Some("POST")
    );
    assert_eq!(
        root.attributes.get("http.route").map(String::as_str),
        Some("/orders")
    );
    assert_eq!(
        root.attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("202")
    );
    // Every step's database work shows as a child of its span.
    let has_db_child = |parent: &SpanRecord| {
        spans.iter().any(|d| {
            d.parent_span_id == parent.span_id
                && d.attributes.get("db.system").map(String::as_str) == Some("postgresql")
        })
    };
    assert!(
        has_db_child(root),
        "no database span under the request: {spans:#?}"
    );
    let mut previous = root;
    for (service, event_type) in steps {
        let span = consume_span(spans, service, event_type)
            .unwrap_or_else(|| panic!("no span for {service} consuming {event_type}: {spans:#?}"));
        assert_eq!(
            span.attributes.get("messaging.system").map(String::as_str),
            Some("kafka")
        );
        assert!(span.attributes.contains_key("messaging.destination.name"));
        assert!(span
            .attributes
            .contains_key("messaging.kafka.message.offset"));
        let parent = by_id
            .get(span.parent_span_id.as_str())
            .expect("consume span has a parent in the trace");
        assert_eq!(
            parent
                .attributes
                .get("messaging.operation")
                .map(String::as_str),
            Some("publish"),
            "{parent:?}"
        );
        assert!(
            is_ancestor(&by_id, &previous.span_id, span),
            "{service}/{event_type} descends from the step before"
        );
        assert!(
            has_db_child(span),
            "no database span under {service}/{event_type}: {spans:#?}"
        );
        previous = span;
    }
}

/// Places a happy-path order (continuing a caller's `traceparent`) and an
/// out-of-stock order, and checks each is one connected trace from the HTTP
/// request through every service, tagged with its correlation ID.
pub async fn check_order_traces(sys: &System, spans: &Spans) -> anyhow::Result<()> {
    // Happy path, continuing a caller's trace.
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, _, body) = sys
        .post_order(
            &json!({"customer_id": "c-t", "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "5.00"}]}),
            &[("X-Correlation-ID", "trace-happy"), ("traceparent", caller)],
        )
        .await?;
    assert_eq!(status, 202);
    assert_eq!(
        body["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "incoming traceparent honoured"
    );
    let happy = body["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(sys.wait_terminal(&happy).await?["status"], "CONFIRMED");
    let steps = [
        ("payment-service", "OrderCreated"),
        ("inventory-service", "PaymentSucceeded"),
        ("order-service", "InventoryReserved"),
    ];
    let got = spans_of(spans, "trace-happy", |s| {
        steps
            .iter()
            .all(|(svc, ev)| consume_span(s, svc, ev).is_some())
            && s.iter().any(|x| x.name == "POST /orders")
    })
    .await?;
    check_trace(&got, &happy, &steps);
    assert!(got
        .iter()
        .all(|s| s.trace_id == "0af7651916cd43dd8448eb211c80319c"));

    // Out of stock: the refund branch hangs off the same trace.
    let (_, _, body) = sys
        .post_order(
            &json!({"customer_id": "c-t", "items": [{"sku": "SKU-RARE", "quantity": 6, "unit_price": "5.00"}]}),
            &[("X-Correlation-ID", "trace-oos")],
        )
        .await?;
    let oos = body["order_id"].as_str().expect("order_id").to_owned();
    sys.wait_order(&oos, |o| o["refunded"] == true).await?;
    let got = spans_of(spans, "trace-oos", |s| {
        consume_span(s, "order-service", "PaymentRefunded").is_some()
            && consume_span(s, "order-service", "InventoryOutOfStock").is_some()
            && consume_span(s, "payment-service", "InventoryOutOfStock").is_some()
    })
    .await?;
    check_trace(
        &got,
        &oos,
        &[
            ("payment-service", "OrderCreated"),
            ("inventory-service", "PaymentSucceeded"),
            ("payment-service", "InventoryOutOfStock"),
            ("order-service", "PaymentRefunded"),
        ],
    );
    check_trace(
        &got,
        &oos,
        &[
            ("payment-service", "OrderCreated"),
            ("inventory-service", "PaymentSucceeded"),
            ("order-service", "InventoryOutOfStock"),
        ],
    );

    Ok(())
}
