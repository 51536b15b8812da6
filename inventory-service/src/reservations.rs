//! `GET /reservations` and `GET /reservations/{order_id}`: the stock held
//! for orders. An order inventory refused (out of stock) holds nothing and
//! has no reservation.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use saga_runtime::listing::{self, ListQuery};
use saga_runtime::ApiError;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/reservations", get(list))
        .route("/reservations/{order_id}", get(show))
        .with_state(pool)
}

/// What a reservation row stands for, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    /// The units are taken from `available` and counted in `reserved`.
    Held,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "HELD",
        }
    }

    /// As stored in `reservations.status`.
    pub fn stored(self) -> &'static str {
        match self {
            Self::Held => "RESERVED",
        }
    }
}

#[derive(sqlx::FromRow)]
struct ReservationRow {
    order_id: Uuid,
    items: serde_json::Value,
    correlation_id: String,
    created_at: chrono::DateTime<chrono::Utc>,
}

fn to_json(r: &ReservationRow) -> serde_json::Value {
    json!({
        "order_id": r.order_id,
        "status": ReservationStatus::Held.as_str(),
        "items": r.items,
        "correlation_id": r.correlation_id,
        "created_at": r.created_at,
    })
}

async fn list(
    State(pool): State<PgPool>,
    query: ListQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page = query.page(&[])?;
    let rows: Vec<ReservationRow> = sqlx::query_as(
        "SELECT order_id, items, correlation_id, created_at FROM reservations
         WHERE status = $1 AND ($2::uuid IS NULL OR order_id < $2)
         ORDER BY order_id DESC LIMIT $3",
    )
    .bind(ReservationStatus::Held.stored())
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
        "SELECT order_id, items, correlation_id, created_at FROM reservations
         WHERE order_id = $1 AND status = $2",
    )
    .bind(order_id.as_uuid())
    .bind(ReservationStatus::Held.stored())
    .fetch_optional(&pool)
    .await?;
    row.map(|r| Json(to_json(&r))).ok_or_else(|| {
        ApiError::not_found(format!("inventory holds no stock for order {order_id}"))
    })
}
