//! Logging and tracing set-up, and W3C trace-context propagation.
//!
//! Every span goes through `tracing-opentelemetry`, so each has a real trace
//! and span ID even when no exporter is configured; that is what lets the
//! `traceparent` written into an outbox row continue the trace of the HTTP
//! request or Kafka message that caused it.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the tracer provider alive; flushes spans when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("telemetry: flushing spans on shutdown failed: {e}");
        }
    }
}

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber: `RUST_LOG` filter (default `info`),
/// readable text or JSON (`LOG_FORMAT=json`), and the OpenTelemetry layer.
/// Safe to call more than once (tests); only the first call installs.
pub fn init(service_name: &'static str) -> TelemetryGuard {
    let provider = PROVIDER
        .get_or_init(|| build_provider(service_name))
        .clone();
    let tracer = provider.tracer("saga");
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = crate::config::var("LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let fmt_layer = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_target(false).boxed()
    };
    // RUST_LOG decides what is printed, not which spans exist: the trace
    // context must survive `RUST_LOG=warn`.
    let otel_filter = tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO);
    let _ = tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(otel_filter),
        )
        .try_init();
    TelemetryGuard { provider }
}

fn build_provider(_service_name: &'static str) -> SdkTracerProvider {
    SdkTracerProvider::builder().build()
}

/// The W3C `traceparent` of the current span, if it belongs to a trace.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` of `span`.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span named by `traceparent`. A missing
/// or malformed value leaves the span as the root of a new trace.
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_owned(), tp.to_owned());
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace ID (32 hex digits) of `span`, if any.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Marks `span` as failed with `reason` (OpenTelemetry status ERROR).
pub fn mark_error(span: &tracing::Span, reason: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_message", reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_get_a_traceparent_and_children_continue_it() {
        let _guard = init("telemetry-test");
        let root = tracing::info_span!("root");
        let tp = traceparent_of(&root).expect("root span has a trace context");
        assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");

        let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = tracing::info_span!("child");
        set_remote_parent(&child, Some(remote));
        let child_tp = traceparent_of(&child).expect("child has a trace context");
        assert!(
            child_tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{child_tp}"
        );
        assert!(
            !child_tp.contains("00f067aa0ba902b7"),
            "child has its own span id"
        );
        assert_eq!(
            trace_id_of(&child).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );

        // A malformed parent leaves a fresh root.
        let orphan = tracing::info_span!("orphan");
        set_remote_parent(&orphan, Some("garbage"));
        assert!(traceparent_of(&orphan).is_some());
    }
}
