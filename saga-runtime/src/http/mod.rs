//! HTTP building blocks: the one JSON error type, a JSON extractor whose
//! rejections are JSON too, probes and the fallbacks; authentication
//! ([`auth`]), listings ([`listing`]) and the API document ([`api`]).

pub mod api;
pub mod auth;
pub mod listing;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::kafka::EventProducer;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Every 4xx/5xx body: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// `WWW-Authenticate` for 401 and scope-related 403 answers.
    pub challenge: Option<&'static str>,
}

/// The JSON body of every error answer, as documented.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"error": {"code": "validation_failed", "message": "items: an order needs at least one item"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable machine-readable `code` and a message for
/// people.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case: `validation_failed`, `bad_request`, `not_found`,
    /// `conflict`, `invalid_token`, `forbidden`, `insufficient_scope`,
    /// `unavailable`, …
    #[schema(example = "validation_failed")]
    pub code: String,
    /// For people; its wording may change.
    pub message: String,
}

/// `WWW-Authenticate` of every 401 (RFC 6750).
pub const INVALID_TOKEN_CHALLENGE: &str = r#"Bearer error="invalid_token""#;
/// `WWW-Authenticate` of a 403 for want of the admin scope (RFC 6750).
pub const INSUFFICIENT_SCOPE_CHALLENGE: &str =
    r#"Bearer error="insufficient_scope", scope="saga:admin""#;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            challenge: None,
        }
    }

    /// 401 `invalid_token`: the bearer token is missing or not acceptable.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            challenge: Some(INVALID_TOKEN_CHALLENGE),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
        }
    }

    /// 403 `forbidden`: the caller is known but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 403 `insufficient_scope`: only an operator (scope `saga:admin`) may.
    pub fn insufficient_scope(message: impl Into<String>) -> Self {
        Self {
            challenge: Some(INSUFFICIENT_SCOPE_CHALLENGE),
            ..Self::new(StatusCode::FORBIDDEN, "insufficient_scope", message)
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl ApiError {
    /// What a client is told about database error `e`: 503 when the
    /// database is away, read-only or overloaded (retrying helps, see
    /// [`crate::db::is_transient`]), 500 otherwise. Does not log it;
    /// `From<sqlx::Error>` does.
    pub fn from_db(e: &sqlx::Error) -> Self {
        if crate::db::is_transient(e) {
            Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unavailable; try again",
            )
        } else {
            Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error while serving a request");
        Self::from_db(&e)
    }
}

/// `Json<T>` whose rejections (bad content type, malformed JSON, wrong
/// fields, body too large) are [`ApiError`]s.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let code = match &r {
        JsonRejection::JsonDataError(_) => "invalid_body",
        JsonRejection::JsonSyntaxError(_) => "malformed_json",
        JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        _ => "bad_request",
    };
    let message = match &r {
        JsonRejection::JsonDataError(e) => {
            // Serde's message names the field and the rule ("items[0].quantity: …").
            use std::error::Error;
            let detail = e
                .source()
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.body_text());
            format!("request body does not match the expected shape: {detail}")
        }
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
            format!("request body is larger than {MAX_BODY_BYTES} bytes")
        }
        other => other.body_text(),
    };
    ApiError::new(status, code, message)
}

/// What the probes check.
#[derive(Clone)]
pub struct Probes {
    pub pool: PgPool,
    pub producer: EventProducer,
    pub health: crate::health::Health,
}

/// `/health` (the process answers), `/ready` (database and broker
/// reachable) and `/metrics`: open to all, with or without authentication
/// (they are for the platform).
pub fn probe_routes(probes: Probes) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .with_state(probes)
}

/// `/health`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

/// `/ready`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    #[schema(example = "ready")]
    pub status: String,
    /// `"ok"` or what is wrong, per component: `database`, `kafka`, and
    /// any background work waiting out an outage (`consumer`, `relay`, …).
    #[schema(value_type = std::collections::HashMap<String, String>, example = json!({"database": "ok", "kafka": "ok"}))]
    pub checks: serde_json::Value,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "probes", security(()),
    responses((status = 200, description = "The process answers", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "probes", security(()),
    responses((status = 200, description = "OpenMetrics text exposition",
        content_type = "application/openmetrics-text", body = String)))]
async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::global().render(),
    )
        .into_response()
}

/// Readiness: the database takes writes, the broker answers, and no
/// background work is waiting out an outage.
#[utoipa::path(get, path = "/ready", tag = "probes", security(()),
    responses(
        (status = 200, description = "Ready to take work", body = Readiness),
        (status = 503, description = "Not ready; `checks` says why", body = Readiness)))]
async fn ready(State(p): State<Probes>) -> Response {
    // A read-only database (a standby, or a primary mid-failover) answers
    // `SELECT 1` but takes no work.
    let db = sqlx::query_scalar::<_, String>("SELECT current_setting('transaction_read_only')")
        .fetch_one(&p.pool)
        .await
        .map_err(|e| e.to_string())
        .and_then(|ro| {
            if ro == "on" {
                Err("the database is read-only".to_owned())
            } else {
                Ok(())
            }
        });
    let producer = p.producer.clone();
    let kafka = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let degraded = p.health.degraded();
    let status = if db.is_ok() && kafka.is_ok() && degraded.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let show = |r: &Result<(), String>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    };
    let mut checks = json!({ "database": show(&db), "kafka": show(&kafka) });
    for (component, why) in degraded {
        checks[component] = json!(why);
    }
    let body = json!({
        "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
        "checks": checks,
    });
    (status, Json(body)).into_response()
}

/// An order ID taken from a path, or a JSON 400 that names it.
pub fn parse_order_id(raw: &str) -> Result<events::OrderId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("{raw:?} is not an order ID (a UUID)")))
}

/// JSON 404 for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// JSON 405 for a known route with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Middleware: one server span per request, continuing the caller's trace
/// when it sends a W3C `traceparent`, with the HTTP semantic-convention
/// attributes. Handlers may fill in `correlation_id` and `order_id`.
pub async fn trace_request(req: Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!(
        "http",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        url.path = req.uri().path(),
        http.response.status_code = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
        order_id = tracing::field::Empty,
        event_type = tracing::field::Empty,
        enduser.id = tracing::field::Empty,
    );
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    crate::telemetry::set_remote_parent(&span, traceparent.as_deref());
    let response = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        crate::telemetry::mark_error(&span, status.canonical_reason().unwrap_or("server error"));
    }
    response
}
