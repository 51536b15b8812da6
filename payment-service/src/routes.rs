//! HTTP API: `GET /payments`, `GET /payments/{order_id}`, each described
//! in the OpenAPI document. Payments are operator data: with
//! authentication on, only a token with the admin scope may read them.

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use events::{CorrelationId, Money, OrderId};
use saga_runtime::http::ErrorBody;
use saga_runtime::listing::{self, ListQuery, PageParams};
use saga_runtime::{ApiError, Caller};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::PaymentStatus;
use crate::store::{self, PaymentRow};

pub fn router(pool: PgPool) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_payments))
        .routes(routes!(get_payment))
        .with_state(pool)
}

/// A payment as the API shows it: one per order that was charged or
/// declined.
#[derive(Debug, Serialize, ToSchema)]
pub struct Payment {
    pub order_id: OrderId,
    pub payment_id: Uuid,
    pub status: PaymentStatus,
    pub amount: Money,
    /// Why the charge was declined; `null` otherwise.
    #[schema(example = "card_declined")]
    pub decline_reason: Option<String>,
    /// Why it was refunded (`out_of_stock`, `customer`, `deadline`);
    /// `null` otherwise.
    #[schema(example = "out_of_stock")]
    pub refund_reason: Option<String>,
    #[schema(value_type = CorrelationId)]
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A page of `GET /payments`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentPage {
    /// Newest order first.
    pub payments: Vec<Payment>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
}

/// An order's payment.
#[utoipa::path(get, path = "/payments/{order_id}", tag = "payments",
    params(("order_id" = OrderId, Path, description = "The order ID")),
    responses(
        (status = 200, description = "The payment", body = Payment),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 403, description = "With authentication on: the token lacks scope `saga:admin`", body = ErrorBody),
        (status = 404, description = "No payment for this order", body = ErrorBody),
    ))]
async fn get_payment(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Payment>, ApiError> {
    caller.require_admin("reading payments")?;
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let p = store::find(&pool, order_id.as_uuid())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))?;
    Ok(Json(Payment::from(&p)))
}

/// List payments.
///
/// Newest order first, paginated with `limit` and `after`.
#[utoipa::path(get, path = "/payments", tag = "payments",
    params(PageParams),
    responses(
        (status = 200, description = "A page of payments", body = PaymentPage),
        (status = 400, description = "A parameter is malformed, unknown or given twice", body = ErrorBody),
        (status = 403, description = "With authentication on: the token lacks scope `saga:admin`", body = ErrorBody),
    ))]
async fn list_payments(
    State(pool): State<PgPool>,
    caller: Caller,
    query: ListQuery,
) -> Result<Json<PaymentPage>, ApiError> {
    caller.require_admin("listing payments")?;
    let page = query.page(&[])?;
    let rows = store::list(&pool, page.after, page.limit).await?;
    let (payments, next) = listing::one_page(page, &rows, |p| p.order_id, Payment::from);
    Ok(Json(PaymentPage { payments, next }))
}

impl From<&PaymentRow> for Payment {
    fn from(p: &PaymentRow) -> Self {
        Self {
            order_id: OrderId::from_uuid(p.order_id),
            payment_id: p.payment_id,
            status: p.status,
            amount: Money::from_minor(p.amount_minor),
            decline_reason: p.decline_reason.clone(),
            refund_reason: p.refund_reason.clone(),
            correlation_id: p.correlation_id.clone(),
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}
