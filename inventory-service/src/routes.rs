//! The HTTP API: the product catalog (`/products`) and the stock held for
//! orders (`/reservations`). Handlers parse and check the request, call
//! [`crate::store`] for the SQL and [`crate::domain`] for the rules, and
//! shape the answer.
//!
//! Every write that changes the units put in goes through the stock ledger
//! in the same statement, so `stocked` (the ledger's sum) always equals
//! `available + reserved`: reservations only move units between the two.
//!
//! A reservation is `HELD`, or `RELEASED` after a refund gave the stock
//! back; an order inventory refused (out of stock), or never reserved, has
//! none. Reservations are operator data: with authentication on, only a
//! token with the admin scope may read them.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use events::{CorrelationId, LineItem, OrderId, Sku};
use saga_runtime::http::ErrorBody;
use saga_runtime::listing::{self, ListQuery, PageParams};
use saga_runtime::{ApiError, ApiJson, Caller};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::{plan_put, PutPlan, ReservationStatus};
use crate::store::{self, ProductRow, ReservationRow, Restock};

/// Most units one product may hold.
const MAX_STOCK: i64 = 1_000_000_000;
const MAX_NAME_LEN: usize = 200;

pub fn router(pool: PgPool) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_products))
        .routes(routes!(show_product, put_product))
        .routes(routes!(restock_product))
        .routes(routes!(list_reservations))
        .routes(routes!(show_reservation))
        .with_state(pool)
}

/// A product and its stock.
#[derive(Debug, Serialize, ToSchema)]
pub struct Product {
    #[schema(value_type = Sku)]
    pub sku: String,
    #[schema(example = "Mechanical keyboard")]
    pub name: String,
    /// Units free to reserve.
    pub available: i64,
    /// Units held for orders.
    pub reserved: i64,
    /// Units ever put in through the catalog API (the ledger's sum):
    /// always `available + reserved`.
    pub stocked: i64,
    /// Goes up by one with every write; also the `ETag`.
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

/// `GET /products`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProductList {
    /// By SKU.
    pub products: Vec<Product>,
}

impl From<&ProductRow> for Product {
    fn from(p: &ProductRow) -> Self {
        Self {
            sku: p.sku.clone(),
            name: p.name.clone(),
            available: p.available,
            reserved: p.reserved,
            stocked: p.stocked,
            version: p.version,
            updated_at: p.updated_at,
        }
    }
}

/// The product with its version as `ETag`, for a later `If-Match`.
fn with_etag(status: StatusCode, p: &ProductRow) -> Response {
    let mut r = (status, Json(Product::from(p))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", p.version)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// The catalog.
#[utoipa::path(get, path = "/products", tag = "catalog", operation_id = "list_products",
    responses(
        (status = 200, description = "Every product", body = ProductList),
    ))]
async fn list_products(State(pool): State<PgPool>) -> Result<Json<ProductList>, ApiError> {
    let rows = store::list_products(&pool).await?;
    Ok(Json(ProductList {
        products: rows.iter().map(Product::from).collect(),
    }))
}

fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// A product.
#[utoipa::path(get, path = "/products/{sku}", tag = "catalog", operation_id = "show_product",
    params(("sku" = Sku, Path, description = "The product's SKU")),
    responses(
        (status = 200, description = "The product", body = Product,
            headers(("ETag" = String, description = "The version, for `If-Match`"))),
        (status = 400, description = "Not a valid SKU", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
    ))]
async fn show_product(
    State(pool): State<PgPool>,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    let sku = parse_sku(&sku)?;
    let row = store::find_product(&pool, &sku).await?;
    row.map(|r| with_etag(StatusCode::OK, &r))
        .ok_or_else(|| ApiError::not_found(format!("product {sku} does not exist")))
}

/// `PUT /products/{sku}`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Mechanical keyboard", "available": 1000, "version": 3}))]
pub struct UpsertRequest {
    /// 1 to 200 characters.
    name: String,
    /// Units free to reserve, 0 to 1,000,000,000.
    available: i64,
    /// The version the caller read; a stale one is refused (as `If-Match`).
    #[serde(default)]
    version: Option<i64>,
}

/// The version a write expects, from `If-Match` (`"3"`, `3` or `W/"3"`)
/// and/or the body's `version`; both given must agree.
fn expected_version(headers: &HeaderMap, body: Option<i64>) -> Result<Option<i64>, ApiError> {
    let header = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => {
            let raw = v.to_str().unwrap_or_default().trim();
            let tag = raw.trim_start_matches("W/").trim_matches('"');
            Some(tag.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "If-Match must be a product version as its ETag gives it, e.g. \"3\"; got {raw:?}"
                ))
            })?)
        }
    };
    match (header, body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::bad_request(format!(
            "If-Match ({h}) and version ({b}) disagree"
        ))),
        (h, b) => Ok(h.or(b)),
    }
}

fn stale(sku: &Sku, expected: i64, current: Option<i64>) -> ApiError {
    let now = current.map_or("the product does not exist".to_owned(), |v| {
        format!("it is at version {v}")
    });
    ApiError::new(
        StatusCode::CONFLICT,
        "version_conflict",
        format!("product {sku} changed since version {expected} ({now}); read it again and retry"),
    )
}

fn version_required(sku: &Sku, current: i64) -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_REQUIRED,
        "precondition_required",
        format!(
            "product {sku} exists (version {current}): send If-Match with the version you read (its ETag), or add units with POST /products/{sku}/restock"
        ),
    )
}

/// Create or set a product (operators).
///
/// Creates the product (no `If-Match` needed), or sets its name and
/// available units: that needs the version read (`If-Match` or `version`),
/// and happens only if the product is still at it, so a read-modify-write
/// cannot overwrite reservations made in between. To add units, prefer
/// `POST /products/{sku}/restock`.
#[utoipa::path(put, path = "/products/{sku}", tag = "catalog", operation_id = "put_product",
    request_body = UpsertRequest,
    params(
        ("sku" = Sku, Path, description = "The product's SKU"),
        ("If-Match" = Option<String>, Header, description = "The version read (its `ETag`): the write happens only if the product is still at it"),
    ),
    responses(
        (status = 200, description = "Updated", body = Product,
            headers(("ETag" = String, description = "The new version"))),
        (status = 201, description = "Created", body = Product,
            headers(("ETag" = String, description = "The new version"))),
        (status = 400, description = "Malformed JSON, SKU or `If-Match`", body = ErrorBody),
        (status = 403, description = "With authentication on: the token lacks scope `saga:admin`", body = ErrorBody),
        (status = 409, description = "`version_conflict`: the product changed since the given version, or another request created it meanwhile", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "A field breaks a rule", body = ErrorBody),
        (status = 428, description = "`precondition_required`: the product exists and no version was given", body = ErrorBody),
    ))]
async fn put_product(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(sku): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UpsertRequest>,
) -> Result<Response, ApiError> {
    caller.require_admin("writing the catalog")?;
    let sku = parse_sku(&sku)?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN {
        return Err(ApiError::validation(format!(
            "name: must be 1 to {MAX_NAME_LEN} characters"
        )));
    }
    if !(0..=MAX_STOCK).contains(&body.available) {
        return Err(ApiError::validation(format!(
            "available: must be between 0 and {MAX_STOCK}, got {}",
            body.available
        )));
    }
    let expected = expected_version(&headers, body.version)?;
    // Read and lock the product, decide, write it and book the change of
    // units in the ledger in one statement, commit.
    let mut tx = pool.begin().await?;
    let current = store::lock_product(&mut tx, &sku).await?;
    let created = match plan_put(current, expected, body.available) {
        PutPlan::VersionRequired { current } => return Err(version_required(&sku, current)),
        PutPlan::Stale { current } => {
            return Err(stale(&sku, expected.unwrap_or_default(), current))
        }
        PutPlan::Create => {
            if !store::create_product(&mut tx, &sku, name, body.available).await? {
                // Another request created it since we looked.
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "version_conflict",
                    format!("product {sku} was created meanwhile by another request; read it and retry with If-Match"),
                ));
            }
            true
        }
        PutPlan::Update { delta } => {
            store::update_product(&mut tx, &sku, name, body.available, delta).await?;
            false
        }
    };
    tx.commit().await?;
    let row = store::find_product(&pool, &sku)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("product {sku} does not exist")))?;
    tracing::info!(sku = %sku, available = row.available, version = row.version, created, "product stocked");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_etag(status, &row))
}

/// `POST /products/{sku}/restock`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestockRequest {
    /// Units to add, at least 1.
    #[schema(example = 50)]
    quantity: i64,
}

/// Add units to a product (operators).
///
/// Adds atomically, whatever was reserved meanwhile.
#[utoipa::path(post, path = "/products/{sku}/restock", tag = "catalog", operation_id = "restock_product",
    request_body = RestockRequest,
    params(("sku" = Sku, Path, description = "The product's SKU")),
    responses(
        (status = 200, description = "The product after the restock", body = Product,
            headers(("ETag" = String, description = "The new version"))),
        (status = 400, description = "Malformed JSON or SKU", body = ErrorBody),
        (status = 403, description = "With authentication on: the token lacks scope `saga:admin`", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "`quantity` out of range", body = ErrorBody),
    ))]
async fn restock_product(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(sku): Path<String>,
    ApiJson(body): ApiJson<RestockRequest>,
) -> Result<Response, ApiError> {
    caller.require_admin("restocking")?;
    let sku = parse_sku(&sku)?;
    if !(1..=MAX_STOCK).contains(&body.quantity) {
        return Err(ApiError::validation(format!(
            "quantity: must be between 1 and {MAX_STOCK}, got {}",
            body.quantity
        )));
    }
    match store::restock(&pool, &sku, body.quantity, MAX_STOCK).await? {
        Restock::NoSuchProduct => {
            return Err(ApiError::not_found(format!("product {sku} does not exist")))
        }
        Restock::OverLimit => {
            return Err(ApiError::validation(format!(
                "quantity: the product would hold more than {MAX_STOCK} units"
            )))
        }
        Restock::Added => {}
    }
    let row = store::find_product(&pool, &sku)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("product {sku} does not exist")))?;
    tracing::info!(sku = %sku, added = body.quantity, available = row.available, "product restocked");
    Ok(with_etag(StatusCode::OK, &row))
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
async fn list_reservations(
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
    let rows = store::list_reservations(&pool, &statuses, page.after, page.limit).await?;
    let (reservations, next) = listing::one_page(page, &rows, |r| r.order_id, Reservation::from);
    Ok(Json(ReservationPage { reservations, next }))
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
async fn show_reservation(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Reservation>, ApiError> {
    caller.require_admin("reading reservations")?;
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let row = store::find_reservation(&pool, order_id.as_uuid(), &shown()).await?;
    row.map(|r| Json(Reservation::from(&r))).ok_or_else(|| {
        ApiError::not_found(format!(
            "inventory never reserved stock for order {order_id}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn if_match(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::IF_MATCH, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn the_expected_version_comes_from_if_match_or_the_body() {
        assert_eq!(expected_version(&HeaderMap::new(), None).ok(), Some(None));
        assert_eq!(
            expected_version(&HeaderMap::new(), Some(4)).ok(),
            Some(Some(4))
        );
        for tag in ["\"7\"", "7", "W/\"7\""] {
            assert_eq!(
                expected_version(&if_match(tag), None).ok(),
                Some(Some(7)),
                "{tag}"
            );
        }
        assert_eq!(
            expected_version(&if_match("\"7\""), Some(7)).ok(),
            Some(Some(7))
        );
        assert!(expected_version(&if_match("\"7\""), Some(8)).is_err());
        assert!(expected_version(&if_match("*"), None).is_err());
    }
}
