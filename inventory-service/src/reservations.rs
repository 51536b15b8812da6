//! `GET /reservations` and `GET /reservations/{order_id}`: the stock held
//! for orders (`HELD`) or given back after a refund (`RELEASED`). An order
//! inventory refused (out of stock), or never reserved, has none.

//!
//! Reservations are operator data: with authentication on, only a token
//! with the admin scope may read them.

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use events::{CorrelationId, LineItem, OrderId};
use saga_runtime::http::ErrorBody;
use saga_runtime::listing::{self, ListQuery, PageParams};
use saga_runtime::{ApiError, Caller};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::ReservationStatus;

pub fn router(pool: PgPool) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .with_state(pool)
}

/// Stock held for an order, or given back.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reservation {
    pub order_id: OrderId,
    /// `HELD`, or `RELEASED` after a refund gave the stock back.
    #[schema(value_type = String, example = "HELD")]
    pub status: Option<&'static str>,
    #[schema(value_type = Vec<LineItem>)]
    pub items: serde_json::Value,
    #[schema(value_type = CorrelationId)]
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A page of `GET /reservations`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationPage {
    /// Newest order first.
    pub reservations: Vec<Reservation>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
}

/// `GET /reservations`'s filter, as documented ([`ListQuery`] reads it).
#[allow(dead_code)]
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReservationFilter {
    /// `HELD` or `RELEASED` (default: both).
    #[param(pattern = "^(HELD|RELEASED)$")]
    pub status: Option<String>,
}

/// The stored statuses the API shows.
fn shown() -> Vec<&'static str> {
    ReservationStatus::ALL
        .iter()
        .copied()
        .filter(|s| s.shown().is_some())
        .map(ReservationStatus::as_str)
        .collect()
}

#[derive(sqlx::FromRow)]
struct ReservationRow {
    order_id: Uuid,
    #[sqlx(try_from = "String")]
    status: ReservationStatus,
    items: serde_json::Value,
    correlation_id: String,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<&ReservationRow> for Reservation {
    fn from(r: &ReservationRow) -> Self {
        Self {
            order_id: OrderId::from_uuid(r.order_id),
            status: r.status.shown(),
            items: r.items.clone(),
            correlation_id: r.correlation_id.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// List reservations (operators).
///
/// Newest order first, paginated with `limit` and `after`.
#[utoipa::path(get, path = "/reservations", tag = "reservations", operation_id = "list_reservations",
    params(PageParams, ReservationFilter),
    responses(
        (status = 200, description = "A page of reservations", body = ReservationPage),
        (status = 400, description = "A parameter is malformed, unknown or given twice", body = ErrorBody),
        (status = 403, description = "With authentication on: the token lacks scope `saga:admin`", body = ErrorBody),
    ))]
async fn list(
    State(pool): State<PgPool>,
    caller: Caller,
    query: ListQuery,
) -> Result<Json<ReservationPage>, ApiError> {
    caller.require_admin("listing reservations")?;
    let page = query.page(&["status"])?;
    let statuses: Vec<&str> = match query.get("status") {
        None => shown(),
        Some(s) => vec![ReservationStatus::ALL
            .iter()
            .copied()
            .find(|st| st.shown() == Some(s))
            .map(ReservationStatus::as_str)
            .ok_or_else(|| {
                ApiError::bad_request(format!("status must be HELD or RELEASED, got {s:?}"))
            })?],
    };
    let rows: Vec<ReservationRow> = sqlx::query_as(
        "SELECT order_id, status, items, correlation_id, created_at, updated_at FROM reservations
         WHERE status = ANY($1) AND ($2::uuid IS NULL OR order_id < $2)
         ORDER BY order_id DESC LIMIT $3",
    )
    .bind(&statuses)
    .bind(page.after)
    .bind(page.limit)
    .fetch_all(&pool)
    .await?;
    let next = listing::next_cursor(page, rows.len(), rows.last().map(|r| r.order_id));
    Ok(Json(ReservationPage {
        reservations: rows.iter().map(Reservation::from).collect(),
        next,
    }))
}

/// An order's reservation (operators).
#[utoipa::path(get, path = "/reservations/{order_id}", tag = "reservations", operation_id = "show_reservation",
    params(("order_id" = OrderId, Path, description = "The order ID")),
    responses(
        (status = 200, description = "The reservation", body = Reservation),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 403, description = "With authentication on: the token lacks scope `saga:admin`", body = ErrorBody),
        (status = 404, description = "Inventory never reserved stock for this order", body = ErrorBody),
    ))]
async fn show(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Reservation>, ApiError> {
    caller.require_admin("reading reservations")?;
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let row: Option<ReservationRow> = sqlx::query_as(
        "SELECT order_id, status, items, correlation_id, created_at, updated_at FROM reservations
         WHERE order_id = $1 AND status = ANY($2)",
    )
    .bind(order_id.as_uuid())
    .bind(shown())
    .fetch_optional(&pool)
    .await?;
    row.map(|r| Json(Reservation::from(&r))).ok_or_else(|| {
        ApiError::not_found(format!(
            "inventory never reserved stock for order {order_id}"
        ))
    })
}
