//! One trace per order, exported over OTLP/HTTP (protobuf); metrics that
//! move with the saga.
//!
//! A small OTLP/HTTP receiver runs inside the test and decodes what the
//! exporter sends. This file is its own test binary (and process), so the
//! exporter can be pointed at the receiver before telemetry starts.

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use saga_tests::otlp::{self, Spans};
use saga_tests::{System, Which};

/// Starts the receiver and points the exporter at it.
async fn receiver() -> anyhow::Result<Spans> {
    let spans: Spans = Spans::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(req) => {
                        otlp::record(&sink, req);
                        axum::http::StatusCode::OK
                    }
                    Err(_) => axum::http::StatusCode::BAD_REQUEST,
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    otlp::export_to(&format!("http://{addr}"), "http/protobuf");
    Ok(spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_order_is_one_connected_trace_and_metrics_follow_the_saga() -> anyhow::Result<()> {
    let spans = receiver().await?;
    let sys = System::start().await?;

    otlp::check_order_traces(&sys, &spans).await?;

    // Metrics moved with the two sagas.
    let metrics = sys.metrics(Which::Order).await?;
    let value = |needle: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
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
    assert!(
        metrics.contains("saga_handler_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("saga_outbox_publish_latency_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("saga_outbox_backlog"), "{metrics}");
    sys.shutdown().await
}
