//! `GET /reservations` and `GET /reservations/{order_id}`: the stock held
//! for orders (`HELD`) or given back after a refund (`RELEASED`). An order
//! inventory refused (out of stock), or never reserved, has none.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use saga_runtime::listing::{self, ListQuery};
use saga_runtime::ApiError;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::ReservationStatus;

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/reservations", get(list))
        .route("/reservations/{order_id}", get(show))
        .with_state(pool)
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

fn to_json(r: &ReservationRow) -> serde_json::Value {
    json!({
        "order_id": r.order_id,
        "status": r.status.shown(),
        "items": r.items,
        "correlation_id": r.correlation_id,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    })
}

/// `GET /reservations[?status=HELD|RELEASED]`: newest order first,
/// paginated (see [`saga_runtime::listing`]).
async fn list(
    State(pool): State<PgPool>,
    query: ListQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
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
    let rows = rows.iter().map(|r| (r.order_id, to_json(r))).collect();
    Ok(Json(listing::page_body("reservations", page, rows)))
}

async fn show(
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let row: Option<ReservationRow> = sqlx::query_as(
        "SELECT order_id, status, items, correlation_id, created_at, updated_at FROM reservations
         WHERE order_id = $1 AND status = ANY($2)",
    )
    .bind(order_id.as_uuid())
    .bind(shown())
    .fetch_optional(&pool)
    .await?;
    row.map(|r| Json(to_json(&r))).ok_or_else(|| {
        ApiError::not_found(format!(
            "inventory never reserved stock for order {order_id}"
        ))
    })
}
