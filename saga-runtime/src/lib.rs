//! Machinery shared by the three saga services, written once, grouped by
//! concern:
//!
//! - [`messaging`]: Kafka clients and their settings ([`kafka`]), the
//!   transactional outbox and its relay ([`outbox`]), the idempotent,
//!   batched consumer loop with its inbox and dead letters ([`consumer`]),
//!   events of a type the build does not know ([`parked`]), group
//!   membership and progress ([`group`]), purging old inbox rows
//!   ([`retention`]), backoff ([`retry`]);
//! - [`http`]: the JSON error type and extractor, probes, fallbacks;
//!   bearer-token authentication ([`auth`]), paginated listings
//!   ([`listing`]), the OpenAPI document and Swagger UI ([`api`]);
//! - [`ops`]: logs and traces ([`telemetry`]), Prometheus metrics
//!   ([`metrics`]), what background work reports to `/ready` ([`health`]);
//! - at the top: start-up, run and graceful shutdown ([`app`]), the
//!   configuration gathered ([`config`]) from the environment ([`env`]),
//!   the database ([`db`]).
//!
//! Start-up glue returns `anyhow::Result` (its callers only report); the error
//! types callers act on ([`config::ConfigError`], [`http::ApiError`]) are
//! enums.

pub mod app;
pub mod config;
pub mod db;
pub mod env;
pub mod http;
pub mod messaging;
pub mod ops;

// The concerns' modules by their short names, as the services use them.
pub use http::{api, auth, listing};
pub use messaging::{consumer, group, kafka, outbox, parked, retention, retry};
pub use ops::{health, metrics, telemetry};

pub use app::{run_service, App, Infra};
pub use auth::Caller;
pub use config::{ConfigError, KafkaConfig, ServiceConfig};
pub use consumer::{Handler, Step};
pub use http::{ApiError, ApiJson};
pub use outbox::Outbox;
pub use tokio_util::sync::CancellationToken;

/// Every program built on this crate (the three services, `saga-admin`, the
/// tests) allocates with jemalloc. In a closed-loop profile glibc's malloc
/// and free (with its fastbin consolidation) were about 30% of the services'
/// worker threads' CPU; jemalloc took 10-15% off their CPU per saga, peak
/// RSS unchanged (mimalloc saved less and held 20-40 MiB more).
/// See docs/performance.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
