//! The saga's traces in a real Jaeger v2, found the way the README says a
//! user finds them: Jaeger's query API, by the order's `correlation_id`.
//! The three services run as processes, each exporting over another of the
//! three OTLP transports (order-service HTTP/protobuf, payment-service gRPC,
//! inventory-service HTTP/JSON), to a Jaeger of the test's own
//! (`scripts/infra.sh` builds it once per machine; `scripts/test.sh` does
//! that before the tests run). What Jaeger cannot show (the headers the
//! exporter sends, a collector that never answers) is in `observability.rs`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use saga_tests::procs::{Cluster, ClusterOptions, Jaeger};
use saga_tests::{poll, Which};
use serde_json::{json, Value};

/// One span as Jaeger's query API returns it.
struct Span {
    trace_id: String,
    id: String,
    parent: Option<String>,
    operation: String,
    service: String,
    tags: HashMap<String, String>,
}

impl Span {
    fn from_json(span: &Value, processes: &serde_json::Map<String, Value>) -> anyhow::Result<Self> {
        let parent = span["references"].as_array().and_then(|refs| {
            refs.iter()
                .find(|r| r["refType"] == "CHILD_OF")
                .and_then(|r| r["spanID"].as_str())
                .map(str::to_owned)
        });
        let service = span["processID"]
            .as_str()
            .and_then(|p| processes.get(p))
            .and_then(|p| p["serviceName"].as_str())
            .unwrap_or_default()
            .to_owned();
        let tags = span["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| {
                let value = match &t["value"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some((t["key"].as_str()?.to_owned(), value))
            })
            .collect();
        Ok(Self {
            trace_id: span["traceID"].as_str().context("traceID")?.to_owned(),
            id: span["spanID"].as_str().context("spanID")?.to_owned(),
            parent,
            operation: span["operationName"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            service,
            tags,
        })
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// One order's saga trace as Jaeger's `/api/traces` returns it.
struct Trace {
    spans: Vec<Span>,
    /// The span ID of the caller's `traceparent`, if the order had one: the
    /// parent of `POST /orders`, in the caller's own system.
    caller: Option<String>,
}

impl Trace {
    fn from_json(trace: &Value, caller: Option<&str>) -> anyhow::Result<Self> {
        let processes = trace["processes"]
            .as_object()
            .context("a trace without processes")?;
        let spans = trace["spans"]
            .as_array()
            .context("a trace without spans")?
            .iter()
            .map(|s| Span::from_json(s, processes))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            spans,
            caller: caller.map(str::to_owned),
        })
    }

    fn services(&self) -> HashSet<&str> {
        self.spans.iter().map(|s| s.service.as_str()).collect()
    }

    /// The consumer span of `service` that handled `event_type`.
    fn handling(&self, service: &str, event_type: &str) -> Option<&Span> {
        self.spans.iter().find(|s| {
            s.service == service
                && s.operation.ends_with(" process")
                && s.tag("event_type") == Some(event_type)
        })
    }

    fn handled(&self, service: &str, event_type: &str) -> bool {
        self.handling(service, event_type).is_some()
    }

    /// A producer span of `service` that published `event_type`.
    fn published(&self, service: &str, event_type: &str) -> bool {
        self.spans.iter().any(|s| {
            s.service == service
                && s.operation.ends_with(" publish")
                && s.tag("event_type") == Some(event_type)
        })
    }

    fn span(&self, id: &str) -> Option<&Span> {
        self.spans.iter().find(|s| s.id == id)
    }

    /// A span with no parent, or whose parent is the caller's.
    fn is_root(&self, span: &Span) -> bool {
        span.parent.is_none() || span.parent == self.caller
    }

    fn parent(&self, span: &Span) -> Option<&Span> {
        span.parent.as_deref().and_then(|p| self.span(p))
    }

    /// One root, `POST /orders`, and every other span's parent in the trace.
    fn connected(&self) -> Result<(), String> {
        let roots: Vec<&str> = self
            .spans
            .iter()
            .filter(|s| self.is_root(s))
            .map(|s| s.operation.as_str())
            .collect();
        if roots != ["POST /orders"] {
            return Err(format!("roots {roots:?}, not one POST /orders"));
        }
        for s in &self.spans {
            if let Some(p) = s.parent.as_ref().filter(|_| !self.is_root(s)) {
                if self.span(p).is_none() {
                    let (svc, op) = (&s.service, &s.operation);
                    return Err(format!("{svc} {op}'s parent {p} is not in the trace"));
                }
            }
        }
        Ok(())
    }

    /// `ancestor` is on the path from `span` up to the root.
    fn descends(&self, span: &Span, ancestor: &Span) -> bool {
        let mut at = span;
        while let Some(parent) = self.parent(at) {
            if parent.id == ancestor.id {
                return true;
            }
            at = parent;
        }
        false
    }

    /// A PostgreSQL span directly under `parent`: its database work.
    fn has_db_child(&self, parent: &Span) -> bool {
        self.spans.iter().any(|d| {
            d.parent.as_deref() == Some(parent.id.as_str())
                && d.tag("db.system") == Some("postgresql")
        })
    }

    /// Each of `steps` (a service handling an event) hangs off the publish
    /// span of the message it handled, below the step before it (the first
    /// below `POST /orders`), with its database work under it and the
    /// attributes of a Kafka consumer span.
    fn check_path(&self, steps: &[(&str, &str)]) -> anyhow::Result<()> {
        let root = self
            .spans
            .iter()
            .find(|s| self.is_root(s))
            .context("no root span")?;
        anyhow::ensure!(
            self.has_db_child(root),
            "no database span under POST /orders"
        );
        let mut previous = root;
        for (service, event_type) in steps {
            let step = format!("{service} handling {event_type}");
            let span = self
                .handling(service, event_type)
                .with_context(|| format!("no span of {step}"))?;
            anyhow::ensure!(
                span.tag("messaging.system") == Some("kafka"),
                "{step}: {:?}",
                span.tags
            );
            for tag in [
                "messaging.destination.name",
                "messaging.kafka.message.offset",
            ] {
                anyhow::ensure!(
                    span.tags.contains_key(tag),
                    "{step}: no {tag}: {:?}",
                    span.tags
                );
            }
            let parent = self
                .parent(span)
                .with_context(|| format!("{step}: no parent"))?;
            anyhow::ensure!(
                parent.tag("messaging.operation") == Some("publish"),
                "{step}: its parent is {} {}, not a publish",
                parent.service,
                parent.operation
            );
            anyhow::ensure!(
                self.descends(span, previous),
                "{step} does not descend from {} {}",
                previous.service,
                previous.operation
            );
            anyhow::ensure!(self.has_db_child(span), "{step}: no database span under it");
            previous = span;
        }
        Ok(())
    }
}

/// Polls Jaeger for the saga trace of `correlation_id` until `complete`
/// says it holds everything (spans arrive in batches, service by service).
async fn saga_trace(
    http: &reqwest::Client,
    jaeger: &Jaeger,
    correlation_id: &str,
    caller: Option<&str>,
    complete: impl Fn(&Trace) -> Result<(), String>,
) -> anyhow::Result<Trace> {
    let tags = json!({ "correlation_id": correlation_id }).to_string();
    let complete = &complete;
    let tags = &tags;
    let found = poll(
        Duration::from_millis(250),
        || async move {
            // The README's recipe: the saga's trace (rooted at POST /orders),
            // not those of later GET /orders/{id} calls for the same order.
            let found: Value = http
                .get(jaeger.url("/api/traces"))
                .query(&[
                    ("service", "order-service"),
                    ("operation", "POST /orders"),
                    ("tags", tags.as_str()),
                ])
                .send()
                .await?
                .json()
                .await?;
            let traces = found["data"].as_array().cloned().unwrap_or_default();
            if traces.len() != 1 {
                return Ok(Err(format!("{} traces", traces.len())));
            }
            let trace = Trace::from_json(&traces[0], caller)?;
            Ok(match complete(&trace) {
                Ok(()) => Ok(trace),
                Err(why) => Err(format!("{why} ({} spans)", trace.spans.len())),
            })
        },
        |why| anyhow::anyhow!("no complete saga trace for {correlation_id} in Jaeger: {why}"),
    )
    .await;
    if found.is_err() {
        // What Jaeger has, to explain the failure.
        for path in ["/api/services", "/api/services/order-service/operations"] {
            let got = match http.get(jaeger.url(path)).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            eprintln!("jaeger {path}: {got}");
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jaeger_shows_each_saga_as_one_trace_across_the_three_services() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("saga-jaeger-").tempdir()?;
    let jaeger = Jaeger::start(dir.path())?;
    let protocol = "OTEL_EXPORTER_OTLP_PROTOCOL".to_owned();
    let cluster = Cluster::start(ClusterOptions {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), jaeger.otlp_endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        service_env: vec![
            (Which::Order, protocol.clone(), "http/protobuf".into()),
            (
                Which::Payment,
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                jaeger.otlp_grpc_endpoint(),
            ),
            (Which::Payment, protocol.clone(), "grpc".into()),
            (Which::Inventory, protocol, "http/json".into()),
        ],
        ..ClusterOptions::default()
    })
    .await?;
    cluster.stock("TRACE-1", 100).await?;
    cluster.stock("TRACE-RARE", 1).await?;

    // The confirmed order continues a caller's trace.
    let (caller_trace, caller_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let req = cluster
        .http
        .post(cluster.url(Which::Order, "/orders"))
        .header("Idempotency-Key", "trace-confirmed")
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&json!({"customer_id": "c-trace", "items": [{"sku": "TRACE-1", "quantity": 1, "unit_price": "3.00"}]}));
    let answer = cluster.send(Which::Order, req).await?;
    anyhow::ensure!(answer.status == 202, "{}", answer.body);
    anyhow::ensure!(
        answer.body["trace_id"] == caller_trace,
        "the caller's traceparent was not continued: {}",
        answer.body
    );
    let confirmed = answer.body["order_id"]
        .as_str()
        .context("order_id")?
        .to_owned();
    let out_of_stock = cluster
        .place(
            "trace-out-of-stock",
            &json!({"customer_id": "c-trace", "items": [{"sku": "TRACE-RARE", "quantity": 5, "unit_price": "3.00"}]}),
        )
        .await?;
    cluster
        .wait_all_terminal(
            &[confirmed.clone(), out_of_stock.clone()],
            Duration::from_secs(60),
        )
        .await?;
    let http = reqwest::Client::new();
    let correlation = |id: String| {
        let cluster = &cluster;
        async move {
            let req = cluster
                .http
                .get(cluster.url(Which::Order, &format!("/orders/{id}")));
            let order = cluster.send(Which::Order, req).await?.body;
            anyhow::ensure!(
                order["status"] != "PENDING",
                "order {id} still PENDING: {order}"
            );
            Ok::<(String, Value), anyhow::Error>((
                order["correlation_id"]
                    .as_str()
                    .context("correlation_id")?
                    .to_owned(),
                order,
            ))
        }
    };

    let (cid, order) = correlation(confirmed).await?;
    anyhow::ensure!(order["status"] == "CONFIRMED", "{order}");
    let trace = saga_trace(&http, &jaeger, &cid, Some(caller_span), |t| {
        t.connected()?;
        let services = t.services();
        for s in ["order-service", "payment-service", "inventory-service"] {
            if !services.contains(s) {
                return Err(format!("no span of {s}"));
            }
        }
        if !(t.handled("payment-service", "OrderCreated")
            && t.handled("inventory-service", "PaymentSucceeded")
            && t.handled("order-service", "InventoryReserved")
            && t.published("order-service", "OrderConfirmed"))
        {
            return Err("the path to OrderConfirmed is not all there yet".into());
        }
        Ok(())
    })
    .await?;
    trace.check_path(&[
        ("payment-service", "OrderCreated"),
        ("inventory-service", "PaymentSucceeded"),
        ("order-service", "InventoryReserved"),
    ])?;
    let foreign: Vec<&str> = trace
        .spans
        .iter()
        .filter(|s| s.trace_id != caller_trace)
        .map(|s| s.operation.as_str())
        .collect();
    anyhow::ensure!(
        foreign.is_empty(),
        "spans outside the caller's trace: {foreign:?}"
    );
    println!(
        "jaeger: the confirmed order's trace has {} spans across {:?}",
        trace.spans.len(),
        trace.services()
    );

    let (cid, order) = correlation(out_of_stock).await?;
    anyhow::ensure!(
        order["status"] == "FAILED" && order["failure_reason"] == "out_of_stock",
        "{order}"
    );
    let trace = saga_trace(&http, &jaeger, &cid, None, |t| {
        t.connected()?;
        if !(t.handled("inventory-service", "PaymentSucceeded")
            && t.handled("order-service", "InventoryOutOfStock")
            && t.handled("payment-service", "InventoryOutOfStock")
            && t.handled("order-service", "PaymentRefunded"))
        {
            return Err("the out-of-stock path and its refund are not all there yet".into());
        }
        Ok(())
    })
    .await?;
    trace.check_path(&[
        ("payment-service", "OrderCreated"),
        ("inventory-service", "PaymentSucceeded"),
        ("payment-service", "InventoryOutOfStock"),
        ("order-service", "PaymentRefunded"),
    ])?;
    trace.check_path(&[
        ("payment-service", "OrderCreated"),
        ("inventory-service", "PaymentSucceeded"),
        ("order-service", "InventoryOutOfStock"),
    ])?;
    println!(
        "jaeger: the out-of-stock order's trace, refund included, has {} spans",
        trace.spans.len()
    );
    Ok(())
}
