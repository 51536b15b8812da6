//! HTTP API: `POST /orders`, `GET /orders`, `GET /orders/{id}`,
//! `POST /orders/{id}/cancel`.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use events::{CorrelationId, Envelope, Event, Money, OrderCreated, OrderId};
use saga_runtime::listing::{self, ListQuery};
use saga_runtime::telemetry;
use saga_runtime::{ApiError, ApiJson, Outbox};
use serde_json::json;
use sqlx::PgPool;
use tracing::Instrument;

use crate::domain::{CreateOrderRequest, NewOrder, NotCancellable, OrderStatus};
use crate::ending::{self, Cancelled};
use crate::intake::{Intake, Pending};
use crate::store::{self, OrderRow};

pub const CORRELATION_HEADER: &str = "x-correlation-id";
const IDEMPOTENCY_HEADER: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Where cancellations write their events.
    pub outbox: Outbox,
    /// Where new orders are written (group commit).
    pub intake: Intake,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .with_state(state)
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("header {name} must be visible ASCII"))),
    }
}

async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrderRequest>,
) -> Result<Response, ApiError> {
    let correlation_id = match header_str(&headers, CORRELATION_HEADER)? {
        Some(v) => CorrelationId::parse(v.trim())
            .map_err(|e| ApiError::bad_request(format!("header X-Correlation-ID: {e}")))?,
        None => CorrelationId::generate(),
    };
    let idempotency_key = header_str(&headers, IDEMPOTENCY_HEADER)?.map(str::trim);
    if let Some(key) = idempotency_key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(ApiError::bad_request(format!(
                "header Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
            )));
        }
    }
    let order = NewOrder::parse(body).map_err(ApiError::validation)?;

    let span = tracing::Span::current();
    span.record("correlation_id", correlation_id.as_str());
    let trace_id = telemetry::trace_id_of(&span);

    if let Some(key) = idempotency_key {
        if let Some(existing) = store::find_by_idempotency_key(&state.pool, key).await? {
            return replay(existing, &order);
        }
    }

    let order_id = OrderId::new();
    span.record("order_id", tracing::field::display(order_id));
    span.record("event_type", "OrderCreated");
    let created = Envelope::new(
        order_id,
        correlation_id.clone(),
        Event::OrderCreated(OrderCreated {
            customer_id: order.customer_id.clone(),
            items: order.items.clone(),
            total: order.total,
        }),
    );
    let row = store::NewRow::new(
        order_id,
        &order,
        &correlation_id,
        trace_id.as_deref(),
        idempotency_key,
    )
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let options = state.pool.connect_options();
    let database = options.get_database().unwrap_or("postgres");
    // Shared with the other requests of its group commit (count unknown here).
    let db = telemetry::db_span(&span, database, "INSERT", None, &created);
    let inserted = state
        .intake
        .submit(Pending {
            row,
            created,
            traceparent: telemetry::current_traceparent(),
        })
        .instrument(db)
        .await?;
    if !inserted {
        // A concurrent request with the same key won the race.
        let key = idempotency_key.unwrap_or_default();
        let existing = store::find_by_idempotency_key(&state.pool, key)
            .await?
            .ok_or_else(|| {
                ApiError::conflict("idempotency key is being used by a concurrent request; retry")
            })?;
        return replay(existing, &order);
    }
    tracing::info!(order_id = %order_id, total = %order.total, "order accepted");

    let body = json!({
        "order_id": order_id,
        "status": "PENDING",
        "correlation_id": correlation_id,
        "trace_id": trace_id,
    });
    Ok(accepted(order_id, &correlation_id, body, false))
}

/// Answers a retry under an Idempotency-Key: the same order for the same
/// body, an error for a different one.
fn replay(existing: OrderRow, order: &NewOrder) -> Result<Response, ApiError> {
    if existing.request_fingerprint.as_deref() != Some(order.fingerprint().as_str()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body",
        ));
    }
    let order_id = OrderId::from_uuid(existing.order_id);
    let correlation_id = CorrelationId::parse(existing.correlation_id.clone())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let body = json!({
        "order_id": order_id,
        "status": existing.status,
        "correlation_id": correlation_id,
        "trace_id": existing.trace_id,
    });
    Ok(accepted(order_id, &correlation_id, body, true))
}

fn accepted(
    order_id: OrderId,
    correlation_id: &CorrelationId,
    body: serde_json::Value,
    replayed: bool,
) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/orders/{order_id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(correlation_id.as_str()) {
        h.insert(HeaderName::from_static(CORRELATION_HEADER), v);
    }
    if replayed {
        h.insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
    }
    response
}

async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let Some(order) = store::find(&state.pool, order_id.as_uuid()).await? else {
        return Err(ApiError::not_found(format!(
            "order {order_id} does not exist"
        )));
    };
    let history = store::history(&state.pool, order_id.as_uuid()).await?;
    let span = tracing::Span::current();
    span.record("order_id", tracing::field::display(order_id));
    span.record("correlation_id", order.correlation_id.as_str());
    let mut body = order_json(&order);
    body["history"] = history
        .iter()
        .map(|h| {
            json!({
                "event_type": h.event_type,
                "event_id": h.event_id,
                "occurred_at": h.occurred_at,
                "recorded_at": h.recorded_at,
                "data": h.data,
            })
        })
        .collect();
    let mut response = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&order.correlation_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(CORRELATION_HEADER), v);
    }
    Ok(response)
}

/// `POST /orders/{id}/cancel`: 202 with the order, CANCELLED (at once, or
/// already); 409 `order_not_cancellable` for a FAILED order.
async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let span = tracing::Span::current();
    span.record("order_id", tracing::field::display(order_id));
    span.record("event_type", "OrderCancelled");
    let traceparent = telemetry::current_traceparent();
    match ending::cancel(&state.pool, &state.outbox, order_id, traceparent.as_deref()).await? {
        Cancelled::NotFound => Err(ApiError::not_found(format!(
            "order {order_id} does not exist"
        ))),
        Cancelled::NotCancellable(NotCancellable { status, reason }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "order_not_cancellable",
            format!(
                "order {order_id} is {status}{} and can no longer be cancelled",
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ),
        )),
        Cancelled::Done => {
            let order = store::find(&state.pool, order_id.as_uuid())
                .await?
                .ok_or_else(|| ApiError::not_found(format!("order {order_id} does not exist")))?;
            span.record("correlation_id", order.correlation_id.as_str());
            let mut response = (StatusCode::ACCEPTED, Json(order_json(&order))).into_response();
            if let Ok(v) = HeaderValue::from_str(&order.correlation_id) {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(CORRELATION_HEADER), v);
            }
            Ok(response)
        }
    }
}

/// `GET /orders`: newest first, filtered by `status`, `customer_id`,
/// `created_before` and `created_after`, paginated (see
/// [`saga_runtime::listing`]).
async fn list_orders(
    State(state): State<AppState>,
    query: ListQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page = query.page(&["status", "customer_id", "created_before", "created_after"])?;
    let status = query
        .get("status")
        .map(|s| {
            OrderStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "status must be one of {}, got {s:?}",
                    OrderStatus::names()
                ))
            })
        })
        .transpose()?;
    let filter = store::Filter {
        status,
        customer_id: query.get("customer_id").map(str::to_owned),
        created_before: query.time("created_before")?,
        created_after: query.time("created_after")?,
    };
    let rows = store::list(&state.pool, &filter, page.after, page.limit).await?;
    let rows = rows.iter().map(|o| (o.order_id, order_json(o))).collect();
    Ok(Json(listing::page_body("orders", page, rows)))
}

/// An order as the API shows it (without its history).
fn order_json(order: &OrderRow) -> serde_json::Value {
    json!({
        "order_id": order.order_id,
        "status": order.status,
        "failure_reason": order.failure_reason,
        "customer_id": order.customer_id,
        "items": order.items.0,
        "total": Money::from_minor(order.total_minor),
        "refunded": order.refunded,
        "stock_released": order.stock_released,
        "correlation_id": order.correlation_id,
        "trace_id": order.trace_id,
        "created_at": order.created_at,
        "updated_at": order.updated_at,
    })
}
