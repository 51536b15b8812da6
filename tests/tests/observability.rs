//! What Jaeger cannot show about the services' trace export, and the
//! metrics that move with the saga. (The traces themselves are checked in a
//! real Jaeger, over all three OTLP transports: `jaeger.rs`.)
//!
//! The collector here is a black hole written for the test: it records the
//! headers of each export request and never answers, as a collector behind
//! a hung proxy does. The exporter sends the headers it is configured with
//! (`OTEL_EXPORTER_OTLP_HEADERS`, how a hosted collector authenticates its
//! clients), and a collector that never answers costs the saga nothing.
//! This file is its own test binary (and process), so the exporter can be
//! pointed at the collector before telemetry starts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::post;
use saga_tests::{poll, System, Which};
use serde_json::json;

type Requests = Arc<Mutex<Vec<HeaderMap>>>;

/// Starts the collector and points the exporter at it.
async fn black_hole() -> anyhow::Result<Requests> {
    let seen = Requests::default();
    let sink = seen.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |headers: HeaderMap| {
            let sink = sink.clone();
            async move {
                sink.lock().expect("requests lock").push(headers);
                std::future::pending::<()>().await;
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    // Edition 2021: set_var is safe; this binary's one test sets it before
    // any service thread reads the environment.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_HEADERS",
        "x-collector-token=s3cret,x-tenant=shop-eu",
    );
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    Ok(seen)
}

/// The value of the first sample of `metrics` that starts with `needle`.
fn value_of(metrics: &str, needle: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_never_answers_costs_the_saga_nothing_and_metrics_follow_it(
) -> anyhow::Result<()> {
    let requests = black_hole().await?;
    let sys = System::start().await?;

    let mut ids = Vec::new();
    for (sku, quantity) in [("SKU-1", 1), ("SKU-RARE", 6)] {
        let (status, _, body) = sys
            .post_order(
                &json!({"customer_id": "c-t", "items": [{"sku": sku, "quantity": quantity, "unit_price": "5.00"}]}),
                &[],
            )
            .await?;
        anyhow::ensure!(status == 202, "{body}");
        ids.push(body["order_id"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(sys.wait_terminal(&ids[0]).await?["status"], "CONFIRMED");
    let failed = sys.wait_order(&ids[1], |o| o["refunded"] == true).await?;
    assert_eq!(failed["failure_reason"], "out_of_stock", "{failed}");

    // The spans went out, with the configured headers, and were never
    // answered.
    let headers = poll(
        Duration::from_millis(50),
        || async {
            let seen = requests.lock().expect("requests lock").clone();
            Ok(if seen.is_empty() { Err(()) } else { Ok(seen) })
        },
        |_| anyhow::anyhow!("no export request reached the collector"),
    )
    .await?;
    for h in &headers {
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(get("x-collector-token"), Some("s3cret"), "{h:?}");
        assert_eq!(get("x-tenant"), Some("shop-eu"), "{h:?}");
        assert_eq!(get("content-type"), Some("application/x-protobuf"), "{h:?}");
    }

    // Metrics moved with the two sagas, once the last of order-service's
    // four events (two created, one confirmed, one failed) is acknowledged:
    // an order's status changes when its event commits, before the relay
    // has it published.
    let published = r#"saga_outbox_published_total{service="order-service"}"#;
    let metrics = poll(
        Duration::from_millis(50),
        || async {
            let metrics = sys.metrics(Which::Order).await?;
            Ok(if value_of(&metrics, published) >= 4.0 {
                Ok(metrics)
            } else {
                Err(metrics)
            })
        },
        |metrics| anyhow::anyhow!("order-service did not publish its 4 events: {metrics}"),
    )
    .await?;
    let value = |needle: &str| value_of(&metrics, needle);
    assert_eq!(
        value(r#"saga_orders_finished_total{status="CONFIRMED",reason=""}"#),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        value(r#"saga_orders_finished_total{status="FAILED",reason="out_of_stock"}"#),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        value(r#"saga_saga_duration_seconds_count{status="CONFIRMED",reason=""}"#),
        1.0,
        "{metrics}"
    );
    assert!(
        value(
            r#"saga_events_handled_total{service="payment-service",event_type="OrderCreated",outcome="applied"}"#
        ) >= 2.0,
        "{metrics}"
    );
    assert!(
        value(r#"saga_outbox_published_total{service="order-service"}"#) >= 4.0,
        "{metrics}"
    );
    for family in [
        "saga_handler_duration_seconds_bucket",
        "saga_outbox_publish_latency_seconds_bucket",
        "saga_outbox_backlog",
    ] {
        assert!(metrics.contains(family), "no {family}: {metrics}");
    }
    sys.shutdown().await
}
