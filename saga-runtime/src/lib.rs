//! Machinery shared by the three saga services, written once:
//!
//! - [`config`]: environment variables, one clear line per mistake;
//! - [`db`]: create-if-missing, connect, migrate (shared + service tables);
//! - [`group`]: a consumer's lag, stalled partitions and rebalances, as metrics;
//! - [`outbox`]: transactional outbox and its relay to Kafka;
//! - [`consumer`]: the idempotent, batched consumer loop with dead letters;
//! - [`parked`]: events of a type the build does not know, kept for its upgrade;
//! - [`health`]: what background work reports to `/ready`;
//! - [`retention`]: purges old inbox ids and parked events off the hot path;
//! - [`listing`]: paginated listings (`limit`, `after`), alike everywhere;
//! - [`http`]: the JSON error type, JSON extractor, probes;
//! - [`auth`]: optional bearer-token (JWT/JWK) authentication, the caller;
//! - [`api`]: the OpenAPI document and Swagger UI;
//! - [`telemetry`]: logs, tracing and W3C trace-context propagation;
//! - [`app`]: start-up, run, graceful shutdown.
//!
//! Start-up glue returns `anyhow::Result` (its callers only report); the error
//! types callers act on ([`config::ConfigError`], [`http::ApiError`]) are
//! enums.

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod consumer;
pub mod db;
pub mod group;
pub mod health;
pub mod http;
pub mod kafka;
pub mod listing;
pub mod metrics;
pub mod outbox;
pub mod parked;
pub mod retention;
pub mod retry;
pub mod telemetry;

pub use app::{run_service, App, Infra};
pub use auth::Caller;
pub use config::{ConfigError, KafkaConfig, ServiceConfig};
pub use consumer::{Handler, Step};
pub use http::{ApiError, ApiJson};
pub use outbox::Outbox;
pub use tokio_util::sync::CancellationToken;
