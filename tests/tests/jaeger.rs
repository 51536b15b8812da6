//! The saga's traces in a real Jaeger v2, found the way the README says a
//! user finds them: Jaeger's query API, by the order's `correlation_id`.
//! The three services run as processes exporting OTLP over HTTP to a Jaeger
//! of the test's own (`scripts/infra.sh` builds it once per machine;
//! `scripts/test.sh` does that before the tests run).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use saga_tests::procs::{Cluster, ClusterOptions, Jaeger};
use saga_tests::{poll, Which};
use serde_json::{json, Value};

/// `(span ID, parent span ID, operation, service, tags)`.
type Span = (
    String,
    Option<String>,
    String,
    String,
    HashMap<String, String>,
);

/// One order's saga trace as Jaeger's `/api/traces` returns it.
struct Trace {
    spans: Vec<Span>,
}

impl Trace {
    fn from_json(trace: &Value) -> anyhow::Result<Self> {
        let processes = trace["processes"]
            .as_object()
            .context("a trace without processes")?;
        let mut spans = Vec::new();
        for span in trace["spans"].as_array().context("a trace without spans")? {
            let id = span["spanID"].as_str().context("spanID")?.to_owned();
            let parent = span["references"].as_array().and_then(|refs| {
                refs.iter()
                    .find(|r| r["refType"] == "CHILD_OF")
                    .and_then(|r| r["spanID"].as_str())
                    .map(str::to_owned)
            });
            let operation = span["operationName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
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
            spans.push((id, parent, operation, service, tags));
        }
        Ok(Self { spans })
    }

    fn services(&self) -> HashSet<&str> {
        self.spans.iter().map(|s| s.3.as_str()).collect()
    }

    /// A consumer span of `service` that handled `event_type`.
    fn handled(&self, service: &str, event_type: &str) -> bool {
        self.spans.iter().any(|(_, _, op, svc, tags)| {
            svc == service
                && op.ends_with(" process")
                && tags.get("event_type").map(String::as_str) == Some(event_type)
        })
    }

    /// A producer span of `service` that published `event_type`.
    fn published(&self, service: &str, event_type: &str) -> bool {
        self.spans.iter().any(|(_, _, op, svc, tags)| {
            svc == service
                && op.ends_with(" publish")
                && tags.get("event_type").map(String::as_str) == Some(event_type)
        })
    }

    /// One root, `POST /orders`, and every other span's parent in the trace.
    fn connected(&self) -> Result<(), String> {
        let ids: HashSet<&str> = self.spans.iter().map(|s| s.0.as_str()).collect();
        let roots: Vec<&str> = self
            .spans
            .iter()
            .filter(|s| s.1.is_none())
            .map(|s| s.2.as_str())
            .collect();
        if roots != ["POST /orders"] {
            return Err(format!("roots {roots:?}, not one POST /orders"));
        }
        for (_, parent, op, svc, _) in &self.spans {
            if let Some(p) = parent {
                if !ids.contains(p.as_str()) {
                    return Err(format!("{svc} {op}'s parent {p} is not in the trace"));
                }
            }
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
            let trace = Trace::from_json(&traces[0])?;
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
    let cluster = Cluster::start(ClusterOptions {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), jaeger.otlp_endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        ..ClusterOptions::default()
    })
    .await?;
    cluster.stock("TRACE-1", 100).await?;
    cluster.stock("TRACE-RARE", 1).await?;
    let confirmed = cluster
        .place(
            "trace-confirmed",
            &json!({"customer_id": "c-trace", "items": [{"sku": "TRACE-1", "quantity": 1, "unit_price": "3.00"}]}),
        )
        .await?;
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
    let trace = saga_trace(&http, &jaeger, &cid, |t| {
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
    let trace = saga_trace(&http, &jaeger, &cid, |t| {
        t.connected()?;
        if !(t.handled("inventory-service", "PaymentSucceeded")
            && t.handled("order-service", "InventoryOutOfStock")
            && t.handled("payment-service", "InventoryOutOfStock")
            && t.published("payment-service", "PaymentRefunded"))
        {
            return Err("the out-of-stock path and its refund are not all there yet".into());
        }
        Ok(())
    })
    .await?;
    println!(
        "jaeger: the out-of-stock order's trace, refund included, has {} spans",
        trace.spans.len()
    );
    Ok(())
}
