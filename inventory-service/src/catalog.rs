//! The product catalog and its HTTP API.
//!
//! Every write that changes the units put in goes through the stock ledger
//! in the same statement, so `stocked` (the ledger's sum) always equals
//! `available + reserved`: reservations only move units between the two.

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use events::Sku;
use saga_runtime::http::ErrorBody;
use saga_runtime::{ApiError, ApiJson, Caller};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Loaded on first start with an empty catalog: `(sku, name, units)`.
/// `SKU-RARE` has only 5 units, for trying the out-of-stock path.
pub const DEMO_CATALOG: &[(&str, &str, i64)] = &[
    ("SKU-1", "Mechanical keyboard", 1_000),
    ("SKU-2", "Wireless mouse", 1_000),
    ("SKU-3", "USB-C cable", 5_000),
    ("SKU-4", "27-inch monitor", 200),
    ("SKU-RARE", "Signed first-edition print", 5),
];

/// Most units one product may hold.
const MAX_STOCK: i64 = 1_000_000_000;
const MAX_NAME_LEN: usize = 200;

/// Loads the demo catalog into an empty catalog. Safe when several
/// replicas start at once: a product another replica inserted meanwhile is
/// left alone, and only the rows this call inserted enter the ledger.
pub async fn seed_if_empty(pool: &PgPool) -> anyhow::Result<()> {
    let skus: Vec<&str> = DEMO_CATALOG.iter().map(|p| p.0).collect();
    let names: Vec<&str> = DEMO_CATALOG.iter().map(|p| p.1).collect();
    let units: Vec<i64> = DEMO_CATALOG.iter().map(|p| p.2).collect();
    let inserted: i64 = sqlx::query_scalar(
        "WITH seeded AS (
             INSERT INTO products (sku, name, available)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
             WHERE NOT EXISTS (SELECT 1 FROM products)
             ON CONFLICT (sku) DO NOTHING
             RETURNING sku, available),
         booked AS (
             INSERT INTO stock_ledger (sku, delta, reason)
             SELECT sku, available, 'seed' FROM seeded)
         SELECT count(*) FROM seeded",
    )
    .bind(&skus)
    .bind(&names)
    .bind(&units)
    .fetch_one(pool)
    .await
    .context("seeding the demo catalog")?;
    if inserted > 0 {
        tracing::info!(products = inserted, "loaded the demo catalog");
    }
    Ok(())
}

pub fn router(pool: PgPool) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show, upsert))
        .routes(routes!(restock))
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

#[derive(sqlx::FromRow)]
struct ProductRow {
    sku: String,
    name: String,
    available: i64,
    reserved: i64,
    stocked: i64,
    version: i64,
    updated_at: chrono::DateTime<chrono::Utc>,
}

/// Columns of [`ProductRow`] from `products p`.
const PRODUCT_COLUMNS: &str = "p.sku, p.name, p.available, p.reserved, \
     COALESCE((SELECT sum(delta) FROM stock_ledger l WHERE l.sku = p.sku), 0)::bigint AS stocked, \
     p.version, p.updated_at";

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
async fn list(State(pool): State<PgPool>) -> Result<Json<ProductList>, ApiError> {
    let rows: Vec<ProductRow> = sqlx::query_as(&format!(
        "SELECT {PRODUCT_COLUMNS} FROM products p ORDER BY p.sku"
    ))
    .fetch_all(&pool)
    .await?;
    Ok(Json(ProductList {
        products: rows.iter().map(Product::from).collect(),
    }))
}

fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn find(pool: &PgPool, sku: &Sku) -> Result<Option<ProductRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {PRODUCT_COLUMNS} FROM products p WHERE p.sku = $1"
    ))
    .bind(sku.as_str())
    .fetch_optional(pool)
    .await
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
async fn show(State(pool): State<PgPool>, Path(sku): Path<String>) -> Result<Response, ApiError> {
    let sku = parse_sku(&sku)?;
    let row = find(&pool, &sku).await?;
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

/// What a `PUT /products/{sku}` does, decided from the product as it is
/// (read under a row lock) and the version the caller sent.
#[derive(Debug, PartialEq, Eq)]
enum PutPlan {
    /// No such product and no version: create it; the ledger books its
    /// units.
    Create,
    /// The caller's version is the product's: set it; the ledger books the
    /// change of units.
    Update { delta: i64 },
    /// The product exists and the caller sent no version: a blind write
    /// would overwrite what reservations did meanwhile.
    VersionRequired { current: i64 },
    /// The caller's version is not the product's (`None`: no product).
    Stale { current: Option<i64> },
}

/// `current` is the product's `(available, version)`, if it exists.
fn plan_put(current: Option<(i64, i64)>, expected: Option<i64>, available: i64) -> PutPlan {
    match (current, expected) {
        (None, None) => PutPlan::Create,
        (None, Some(_)) => PutPlan::Stale { current: None },
        (Some((_, version)), None) => PutPlan::VersionRequired { current: version },
        (Some((_, version)), Some(e)) if version != e => PutPlan::Stale {
            current: Some(version),
        },
        (Some((was, _)), Some(_)) => PutPlan::Update {
            delta: available - was,
        },
    }
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
async fn upsert(
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
    let current: Option<(i64, i64)> =
        sqlx::query_as("SELECT available, version FROM products WHERE sku = $1 FOR UPDATE")
            .bind(sku.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    let created = match plan_put(current, expected, body.available) {
        PutPlan::VersionRequired { current } => return Err(version_required(&sku, current)),
        PutPlan::Stale { current } => {
            return Err(stale(&sku, expected.unwrap_or_default(), current))
        }
        PutPlan::Create => {
            let created: i64 = sqlx::query_scalar(
                "WITH up AS (
                     INSERT INTO products (sku, name, available) VALUES ($1, $2, $3)
                     ON CONFLICT (sku) DO NOTHING
                     RETURNING sku),
                 booked AS (
                     INSERT INTO stock_ledger (sku, delta, reason)
                     SELECT sku, $3, 'put' FROM up WHERE $3 <> 0)
                 SELECT count(*) FROM up",
            )
            .bind(sku.as_str())
            .bind(name)
            .bind(body.available)
            .fetch_one(&mut *tx)
            .await?;
            if created == 0 {
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
            sqlx::query(
                "WITH up AS (
                     UPDATE products SET name = $2, available = $3, version = version + 1,
                                         updated_at = now()
                     WHERE sku = $1
                     RETURNING sku)
                 INSERT INTO stock_ledger (sku, delta, reason)
                 SELECT sku, $4, 'put' FROM up WHERE $4 <> 0",
            )
            .bind(sku.as_str())
            .bind(name)
            .bind(body.available)
            .bind(delta)
            .execute(&mut *tx)
            .await?;
            false
        }
    };
    tx.commit().await?;
    let row = find(&pool, &sku)
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
async fn restock(
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
    let outcome: Option<bool> = sqlx::query_scalar(
        "WITH cur AS (SELECT available FROM products WHERE sku = $1 FOR UPDATE),
              up AS (
                  UPDATE products SET available = available + $2, version = version + 1, updated_at = now()
                  WHERE sku = $1 AND available + $2 <= $3
                  RETURNING sku),
              booked AS (
                  INSERT INTO stock_ledger (sku, delta, reason)
                  SELECT sku, $2, 'restock' FROM up)
         SELECT EXISTS (SELECT 1 FROM up) FROM cur",
    )
    .bind(sku.as_str())
    .bind(body.quantity)
    .bind(MAX_STOCK)
    .fetch_optional(&pool)
    .await?;
    match outcome {
        None => return Err(ApiError::not_found(format!("product {sku} does not exist"))),
        Some(false) => {
            return Err(ApiError::validation(format!(
                "quantity: the product would hold more than {MAX_STOCK} units"
            )))
        }
        Some(true) => {}
    }
    let row = find(&pool, &sku)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("product {sku} does not exist")))?;
    tracing::info!(sku = %sku, added = body.quantity, available = row.available, "product restocked");
    Ok(with_etag(StatusCode::OK, &row))
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
    fn a_put_creates_without_a_version_and_sets_only_with_the_current_one() {
        assert_eq!(plan_put(None, None, 7), PutPlan::Create);
        assert_eq!(plan_put(None, Some(1), 7), PutPlan::Stale { current: None });
        assert_eq!(
            plan_put(Some((7, 2)), None, 1_000),
            PutPlan::VersionRequired { current: 2 }
        );
        assert_eq!(
            plan_put(Some((7, 2)), Some(1), 1_000),
            PutPlan::Stale { current: Some(2) }
        );
        assert_eq!(
            plan_put(Some((7, 2)), Some(2), 1_000),
            PutPlan::Update { delta: 993 }
        );
        assert_eq!(
            plan_put(Some((7, 2)), Some(2), 3),
            PutPlan::Update { delta: -4 }
        );
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
