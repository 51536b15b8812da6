//! Logging and tracing set-up, and W3C trace-context propagation.
//!
//! Every span goes through `tracing-opentelemetry`, so each has a real trace
//! and span ID even when no exporter is configured; that is what lets the
//! `traceparent` written into an outbox row continue the trace of the HTTP
//! request or Kafka message that caused it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

use crate::env::{var, ConfigError};
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
///
/// Spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, over HTTP/protobuf unless
/// `OTEL_EXPORTER_OTLP_PROTOCOL` says `grpc` or `http/json`; the service name is `OTEL_SERVICE_NAME` or the service's own, and the
/// SDK reads `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` and
/// `OTEL_BSP_*`. Unset: nothing is exported and nothing is logged about it.
/// Safe to call more than once (tests); only the first call installs.
pub fn init(service_name: &'static str) -> Result<TelemetryGuard, ConfigError> {
    let provider = match PROVIDER.get() {
        Some(p) => p.clone(),
        None => {
            let built = build_provider(service_name)?;
            PROVIDER.get_or_init(|| built).clone()
        }
    };
    let tracer = provider.tracer("saga");
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = var("LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"));
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
    Ok(TelemetryGuard { provider })
}

fn build_provider(service_name: &'static str) -> Result<SdkTracerProvider, ConfigError> {
    let name = var("OTEL_SERVICE_NAME").unwrap_or_else(|| service_name.to_owned());
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(name).build());
    if var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return Ok(builder.build());
    }
    let endpoint_error = |e: &dyn std::fmt::Display| ConfigError::Invalid {
        var: "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
        value: var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_default(),
        reason: e.to_string(),
    };
    match otlp_protocol()? {
        Protocol::Grpc => {
            let exporter = OwnRuntime::build(|| {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
            })
            .map_err(|e| endpoint_error(&e))?;
            builder = builder.with_batch_exporter(exporter);
        }
        protocol => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(protocol)
                .build()
                .map_err(|e| endpoint_error(&e))?;
            builder = builder.with_batch_exporter(exporter);
        }
    }
    Ok(builder.build())
}

/// The OTLP transport from `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or
/// `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (the default), `http/json`
/// or `grpc`. Anything else is a configuration error, not a silent fallback.
fn otlp_protocol() -> Result<Protocol, ConfigError> {
    let (name, value) = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v),
        None => match var("OTEL_EXPORTER_OTLP_PROTOCOL") {
            Some(v) => ("OTEL_EXPORTER_OTLP_PROTOCOL", v),
            None => return Ok(Protocol::HttpBinary),
        },
    };
    match value.to_ascii_lowercase().as_str() {
        "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Ok(Protocol::HttpJson),
        "grpc" => Ok(Protocol::Grpc),
        _ => Err(ConfigError::Invalid {
            var: name.to_owned(),
            value,
            reason: "expected grpc, http/protobuf or http/json".to_owned(),
        }),
    }
}

/// Runs an exporter that needs a Tokio reactor (the tonic gRPC client) on a
/// small runtime of its own.
///
/// The SDK's batch processor calls `export` from a plain OS thread and blocks
/// on the future there; tonic's channel panics without a reactor. Building the
/// exporter inside this runtime and spawning each export onto it keeps gRPC
/// export independent of whichever runtime (if any) the service runs on.
#[derive(Debug)]
struct OwnRuntime<E> {
    inner: Arc<E>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl<E: SpanExporter + 'static> OwnRuntime<E> {
    fn build<B: std::fmt::Display>(
        make: impl FnOnce() -> Result<E, B>,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        let inner = {
            let _entered = runtime.enter();
            make().map_err(|e| e.to_string())?
        };
        Ok(Self {
            inner: Arc::new(inner),
            runtime: Some(runtime),
        })
    }
}

impl<E: SpanExporter + 'static> SpanExporter for OwnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = Arc::clone(&self.inner);
        let task = self
            .runtime
            .as_ref()
            .map(|rt| rt.spawn(async move { inner.export(batch).await }));
        async move {
            match task {
                Some(task) => task
                    .await
                    .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string()))),
                None => Err(OTelSdkError::AlreadyShutdown),
            }
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called while the provider is built, before any export holds a clone.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

impl<E> Drop for OwnRuntime<E> {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
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
/// or malformed value leaves the span as the root of a new trace. Records the
/// resulting `trace_id` on the span (declare it as an empty field) so every
/// log line inside carries it.
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let mut carrier = HashMap::new();
        carrier.insert("traceparent".to_owned(), tp.to_owned());
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
    if let Some(id) = trace_id_of(span) {
        span.record("trace_id", id.as_str());
    }
}

/// The trace ID (32 hex digits) of `span`, if any.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The span of one database step taken for `event`: a child of `parent`,
/// with the OpenTelemetry database attributes and the saga's own keys, so
/// the step shows in the event's trace. `operation` names what is done
/// (`transaction` for a consumer batch, `INSERT` for a new order) and
/// `batch`, when known, how many events shared it.
pub fn db_span(
    parent: &tracing::Span,
    database: &str,
    operation: &str,
    batch: Option<usize>,
    event: &events::Envelope,
) -> tracing::Span {
    let span = tracing::info_span!(
        parent: parent,
        "db",
        otel.name = format!("{operation} {database}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
        db.system = "postgresql",
        db.namespace = database,
        db.operation.name = operation,
        db.operation.batch.size = tracing::field::Empty,
        order_id = %event.order_id,
        event_type = event.event_type(),
        correlation_id = %event.correlation_id,
    );
    if let Some(n) = batch {
        span.record("db.operation.batch.size", n);
    }
    span
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
        let _guard = init("telemetry-test").unwrap();
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
