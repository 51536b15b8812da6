//! HTTP API: `POST /orders`, `GET /orders`, `GET /orders/{id}`,
//! `POST /orders/{id}/cancel`, each described in the OpenAPI document.
//!
//! With authentication on, a customer (a token without the admin scope)
//! places orders as the token's `sub`, and sees and cancels only its own:
//! another customer's order answers 404, as if it did not exist.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use events::{
    CorrelationId, CustomerId, DomainError, Envelope, Event, FailureReason, LineItem, Money,
    OrderCreated, OrderId, Quantity, Sku, MAX_ITEMS_PER_ORDER, MAX_UNIT_PRICE_MINOR,
};
use saga_runtime::http::ErrorBody;
use saga_runtime::listing::{self, ListQuery, PageParams};
use saga_runtime::telemetry;
use saga_runtime::{ApiError, ApiJson, Caller, Outbox};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tracing::Instrument;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::{customer_for, CustomerRefusal, NewOrder, NotCancellable, OrderStatus};
use crate::ending::{self, Cancelled};
use crate::intake::{Intake, Pending};
use crate::store::{self, OrderRow};

/// The body of `POST /orders` as it arrives. Field types are loose on
/// purpose so that every rule is checked here and reported with the field
/// that broke it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"customer_id": "c-42", "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "29.99"}]}))]
pub struct CreateOrderRequest {
    /// Who orders: 1 to 128 letters, digits, `-`, `_`, `.`, `@`, `:`.
    /// Required when authentication is off; with it on, the token's `sub`
    /// is the customer and this may be left out (if given, it must equal
    /// `sub`, else 403).
    #[serde(default)]
    #[schema(example = "c-42")]
    pub customer_id: Option<String>,
    /// 1 to 100 lines.
    pub items: Vec<ItemRequest>,
}

/// One line of `POST /orders`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    /// 1 to 64 letters, digits, `-`, `_`, `.`.
    #[schema(example = "SKU-1")]
    pub sku: String,
    /// 1 to 1000.
    #[schema(example = 2)]
    pub quantity: i64,
    /// A decimal string, more than 0, at most two decimals.
    #[schema(example = "29.99")]
    pub unit_price: String,
}

/// Parses the body at the edge: checks every rule of a new order; the
/// error names the offending field.
impl TryFrom<CreateOrderRequest> for NewOrder {
    type Error = String;

    fn try_from(req: CreateOrderRequest) -> Result<Self, String> {
        let field = |name: String| move |e: DomainError| format!("{name}: {e}");
        let customer_id = req
            .customer_id
            .ok_or_else(|| "customer_id: required".to_owned())
            .and_then(|c| CustomerId::parse(c).map_err(field("customer_id".into())))?;
        if req.items.is_empty() {
            return Err("items: an order needs at least one item".into());
        }
        if req.items.len() > MAX_ITEMS_PER_ORDER {
            return Err(format!(
                "items: at most {MAX_ITEMS_PER_ORDER} items per order, got {}",
                req.items.len()
            ));
        }
        let mut items = Vec::with_capacity(req.items.len());
        let mut total = Money::ZERO;
        for (i, item) in req.items.into_iter().enumerate() {
            let sku = Sku::parse(item.sku).map_err(field(format!("items[{i}].sku")))?;
            let quantity =
                Quantity::new(item.quantity).map_err(field(format!("items[{i}].quantity")))?;
            let unit_price = Money::parse_decimal(&item.unit_price)
                .map_err(field(format!("items[{i}].unit_price")))?;
            if unit_price.minor() <= 0 {
                return Err(format!("items[{i}].unit_price: must be greater than 0"));
            }
            if unit_price.minor() > MAX_UNIT_PRICE_MINOR {
                return Err(format!(
                    "items[{i}].unit_price: at most {}",
                    Money::from_minor(MAX_UNIT_PRICE_MINOR)
                ));
            }
            let line = LineItem {
                sku,
                quantity,
                unit_price,
            };
            total = line
                .line_total()
                .and_then(|t| total.checked_add(t))
                .ok_or_else(|| "items: order total is too large".to_owned())?;
            items.push(line);
        }
        Ok(NewOrder {
            customer_id,
            items,
            total,
        })
    }
}

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

pub fn router(state: AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(create_order, list_orders))
        .routes(routes!(get_order))
        .routes(routes!(cancel_order))
        .with_state(state)
}

/// `POST /orders`'s answer: the order is taken, its saga has started.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderAccepted {
    pub order_id: OrderId,
    /// `PENDING` when new; a retry under the same `Idempotency-Key` shows
    /// the order's status now.
    pub status: OrderStatus,
    /// Search Jaeger and the logs for this.
    pub correlation_id: CorrelationId,
    /// The OpenTelemetry trace ID, when tracing is on.
    #[schema(example = "4bf92f3577b34da6a3ce929d0e0e4736")]
    pub trace_id: Option<String>,
}

/// An order as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Order {
    pub order_id: OrderId,
    pub status: OrderStatus,
    /// Why a FAILED or CANCELLED order ended so; `null` otherwise.
    #[schema(value_type = Option<FailureReason>)]
    pub failure_reason: Option<String>,
    #[schema(value_type = CustomerId)]
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub total: Money,
    /// The payment was refunded (after a cancel, deadline or out-of-stock).
    pub refunded: bool,
    /// Reserved stock was given back (after a cancel or deadline).
    pub stock_released: bool,
    #[schema(value_type = CorrelationId)]
    pub correlation_id: String,
    pub trace_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One event the order recorded.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryEntry {
    #[schema(example = "PaymentSucceeded")]
    pub event_type: String,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    /// The event's payload.
    pub data: serde_json::Value,
}

/// `GET /orders/{id}`'s answer: the order and what happened to it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderWithHistory {
    #[serde(flatten)]
    pub order: Order,
    /// Oldest first.
    pub history: Vec<HistoryEntry>,
}

/// A page of `GET /orders`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderPage {
    /// Newest first.
    pub orders: Vec<Order>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
}

/// `GET /orders`'s filters, as documented ([`ListQuery`] reads them).
#[allow(dead_code)]
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OrderFilters {
    /// Only orders in this status.
    pub status: Option<OrderStatus>,
    /// Only this customer's orders. With authentication on, a customer
    /// sees only its own orders whatever this says (another customer's ID
    /// is 403).
    pub customer_id: Option<String>,
    /// Only orders created before this RFC 3339 time.
    pub created_before: Option<DateTime<Utc>>,
    /// Only orders created after this RFC 3339 time.
    pub created_after: Option<DateTime<Utc>>,
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

/// Place an order.
///
/// Stores the order PENDING with its `OrderCreated` event in one
/// transaction and answers at once; follow it with `GET /orders/{id}`.
/// With an `Idempotency-Key`, a retry answers the same order.
#[utoipa::path(post, path = "/orders", tag = "orders",
    request_body = CreateOrderRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "1 to 255 characters, the customer's own (another customer may use the same key): a retry with the same key and body answers the first order (and `Idempotent-Replayed: true`); the same key with another body is 422"),
        ("X-Correlation-ID" = Option<String>, Header,
            description = "Follows the order through every service and trace; generated when absent"),
    ),
    responses(
        (status = 202, description = "Accepted: the order is PENDING", body = OrderAccepted,
            headers(
                ("Location" = String, description = "`/orders/{order_id}`"),
                ("X-Correlation-ID" = String, description = "The order's correlation ID"),
                ("Idempotent-Replayed" = Option<String>, description = "`true` on a retry answered from the first request"),
            )),
        (status = 400, description = "Malformed JSON or header", body = ErrorBody),
        (status = 403, description = "With authentication on: `customer_id` is not the token's subject", body = ErrorBody),
        (status = 413, description = "Body larger than 1 MiB", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "A rule is broken (the message names the field), or the `Idempotency-Key` was used with another body", body = ErrorBody),
    ))]
async fn create_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<CreateOrderRequest>,
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
    body.customer_id = Some(
        customer_for(body.customer_id.as_deref(), caller.subject()).map_err(|r| match r {
            CustomerRefusal::Missing => ApiError::validation("customer_id: required"),
            CustomerRefusal::NotTheCaller => ApiError::forbidden(
                "customer_id must be the token's subject (or left out): orders are placed as the caller",
            ),
        })?,
    );
    let order = NewOrder::try_from(body).map_err(ApiError::validation)?;

    let span = tracing::Span::current();
    span.record("correlation_id", correlation_id.as_str());
    let trace_id = telemetry::trace_id_of(&span);

    if let Some(key) = idempotency_key {
        if let Some(existing) =
            store::find_by_idempotency_key(&state.pool, order.customer_id.as_str(), key).await?
        {
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
        let existing = store::find_by_idempotency_key(&state.pool, order.customer_id.as_str(), key)
            .await?
            .ok_or_else(|| {
                ApiError::conflict("idempotency key is being used by a concurrent request; retry")
            })?;
        return replay(existing, &order);
    }
    tracing::info!(order_id = %order_id, total = %order.total, "order accepted");

    let body = OrderAccepted {
        order_id,
        status: OrderStatus::Pending,
        correlation_id: correlation_id.clone(),
        trace_id,
    };
    Ok(accepted(&body, false))
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
    let body = OrderAccepted {
        order_id,
        status: existing.status,
        correlation_id,
        trace_id: existing.trace_id,
    };
    Ok(accepted(&body, true))
}

fn accepted(body: &OrderAccepted, replayed: bool) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/orders/{}", body.order_id)) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(body.correlation_id.as_str()) {
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

/// An order and its history.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders",
    params(("id" = OrderId, Path, description = "The order ID")),
    responses(
        (status = 200, description = "The order", body = OrderWithHistory,
            headers(("X-Correlation-ID" = String, description = "The order's correlation ID"))),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such order (or, with authentication on, another customer's)", body = ErrorBody),
    ))]
async fn get_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let order = visible(store::find(&state.pool, order_id.as_uuid()).await?, &caller)
        .ok_or_else(|| no_such_order(order_id))?;
    let history = store::history(&state.pool, order_id.as_uuid()).await?;
    let span = tracing::Span::current();
    span.record("order_id", tracing::field::display(order_id));
    span.record("correlation_id", order.correlation_id.as_str());
    let body = OrderWithHistory {
        order: Order::from(&order),
        history: history
            .into_iter()
            .map(|h| HistoryEntry {
                event_type: h.event_type,
                event_id: h.event_id,
                occurred_at: h.occurred_at,
                recorded_at: h.recorded_at,
                data: h.data,
            })
            .collect(),
    };
    let mut response = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&order.correlation_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(CORRELATION_HEADER), v);
    }
    Ok(response)
}

/// Cancel an order.
///
/// A PENDING or CONFIRMED order becomes CANCELLED at once, and
/// `OrderCancelled` makes payment refund and inventory release what they
/// did. Cancelling again answers the same.
#[utoipa::path(post, path = "/orders/{id}/cancel", tag = "orders",
    params(("id" = OrderId, Path, description = "The order ID")),
    responses(
        (status = 202, description = "The order, CANCELLED (now or already)", body = Order,
            headers(("X-Correlation-ID" = String, description = "The order's correlation ID"))),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such order (or, with authentication on, another customer's)", body = ErrorBody),
        (status = 409, description = "`order_not_cancellable`: the order already FAILED", body = ErrorBody),
    ))]
async fn cancel_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    if caller.only_customer().is_some() {
        // A customer learns nothing of an order that is not its own.
        visible(store::find(&state.pool, order_id.as_uuid()).await?, &caller)
            .ok_or_else(|| no_such_order(order_id))?;
    }
    let span = tracing::Span::current();
    span.record("order_id", tracing::field::display(order_id));
    span.record("event_type", "OrderCancelled");
    let traceparent = telemetry::current_traceparent();
    match ending::cancel(&state.pool, &state.outbox, order_id, traceparent.as_deref()).await? {
        Cancelled::NotFound => Err(no_such_order(order_id)),
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
                .ok_or_else(|| no_such_order(order_id))?;
            span.record("correlation_id", order.correlation_id.as_str());
            let mut response = (StatusCode::ACCEPTED, Json(Order::from(&order))).into_response();
            if let Ok(v) = HeaderValue::from_str(&order.correlation_id) {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(CORRELATION_HEADER), v);
            }
            Ok(response)
        }
    }
}

/// List orders.
///
/// Newest first, paginated with `limit` and `after`. With authentication
/// on, a customer lists only its own orders; an operator lists all.
#[utoipa::path(get, path = "/orders", tag = "orders",
    params(PageParams, OrderFilters),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, description = "A parameter is malformed, unknown or given twice", body = ErrorBody),
        (status = 403, description = "With authentication on: a customer asked for another customer's orders", body = ErrorBody),
    ))]
async fn list_orders(
    State(state): State<AppState>,
    caller: Caller,
    query: ListQuery,
) -> Result<Json<OrderPage>, ApiError> {
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
    let customer_id = match (query.get("customer_id"), caller.only_customer()) {
        (Some(asked), Some(own)) if asked != own => {
            return Err(ApiError::forbidden(
                "customers list only their own orders: leave customer_id out or give your own",
            ))
        }
        (asked, own) => own.or(asked).map(str::to_owned),
    };
    let filter = store::Filter {
        status,
        customer_id,
        created_before: query.time("created_before")?,
        created_after: query.time("created_after")?,
    };
    let rows = store::list(&state.pool, &filter, page.after, page.limit).await?;
    let (orders, next) = listing::one_page(page, &rows, |o| o.order_id, Order::from);
    Ok(Json(OrderPage { orders, next }))
}

/// The order if `caller` may see it: auth off, an operator, or its customer.
fn visible(order: Option<OrderRow>, caller: &Caller) -> Option<OrderRow> {
    order.filter(|o| caller.only_customer().is_none_or(|c| c == o.customer_id))
}

fn no_such_order(order_id: OrderId) -> ApiError {
    ApiError::not_found(format!("order {order_id} does not exist"))
}

impl From<&OrderRow> for Order {
    fn from(order: &OrderRow) -> Self {
        Self {
            order_id: OrderId::from_uuid(order.order_id),
            status: order.status,
            failure_reason: order.failure_reason.clone(),
            customer_id: order.customer_id.clone(),
            items: order.items.0.clone(),
            total: Money::from_minor(order.total_minor),
            refunded: order.refunded,
            stock_released: order.stock_released,
            correlation_id: order.correlation_id.clone(),
            trace_id: order.trace_id.clone(),
            created_at: order.created_at,
            updated_at: order.updated_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> CreateOrderRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn valid_order_totals_in_minor_units() {
        let order = NewOrder::try_from(req(serde_json::json!({
            "customer_id": "c-42",
            "items": [
                {"sku": "SKU-1", "quantity": 2, "unit_price": "29.99"},
                {"sku": "SKU-2", "quantity": 1, "unit_price": "0.5"}
            ]
        })))
        .unwrap();
        assert_eq!(order.total, Money::from_minor(6048));
        assert_eq!(order.items.len(), 2);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases = [
            (
                serde_json::json!({"customer_id": "", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}),
                "customer_id",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": []}),
                "items",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "", "quantity": 1, "unit_price": "1"}]}),
                "items[0].sku",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 0, "unit_price": "1"}]}),
                "items[0].quantity",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1000000, "unit_price": "1"}]}),
                "items[0].quantity",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "0"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "-1.00"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1.001"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}, {"sku": "B", "quantity": -2, "unit_price": "1"}]}),
                "items[1].quantity",
            ),
        ];
        for (body, field) in cases {
            let err = NewOrder::try_from(req(body.clone())).unwrap_err();
            assert!(err.starts_with(field), "{body} → {err}");
        }
    }

    #[test]
    fn too_many_items_are_refused() {
        let items: Vec<_> = (0..=MAX_ITEMS_PER_ORDER)
            .map(|i| serde_json::json!({"sku": format!("S{i}"), "quantity": 1, "unit_price": "1"}))
            .collect();
        let err = NewOrder::try_from(req(serde_json::json!({"customer_id": "c", "items": items})))
            .unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn fingerprint_tells_bodies_apart() {
        let a = NewOrder::try_from(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}))).unwrap();
        let b = NewOrder::try_from(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 2, "unit_price": "1"}]}))).unwrap();
        let a2 = NewOrder::try_from(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1.00"}]}))).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a2.fingerprint());
    }
}
