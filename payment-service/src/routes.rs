//! HTTP API: `GET /payments`, `GET /payments/{order_id}`.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use events::Money;
use saga_runtime::listing::{self, ListQuery};
use saga_runtime::ApiError;
use serde_json::json;
use sqlx::PgPool;

use crate::store::{self, PaymentRow};

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/payments", get(list_payments))
        .route("/payments/{order_id}", get(get_payment))
        .with_state(pool)
}

async fn get_payment(
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let p = store::find(&pool, order_id.as_uuid())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))?;
    Ok(Json(payment_json(&p)))
}

/// `GET /payments`: newest order first, paginated (see
/// [`saga_runtime::listing`]).
async fn list_payments(
    State(pool): State<PgPool>,
    query: ListQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page = query.page(&[])?;
    let rows = store::list(&pool, page.after, page.limit).await?;
    let rows = rows.iter().map(|p| (p.order_id, payment_json(p))).collect();
    Ok(Json(listing::page_body("payments", page, rows)))
}

fn payment_json(p: &PaymentRow) -> serde_json::Value {
    json!({
        "order_id": p.order_id,
        "payment_id": p.payment_id,
        "status": p.status,
        "amount": Money::from_minor(p.amount_minor),
        "decline_reason": p.decline_reason,
        "refund_reason": p.refund_reason,
        "correlation_id": p.correlation_id,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    })
}
