//! The product catalog and its HTTP API.

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use events::Sku;
use saga_runtime::{ApiError, ApiJson};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

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

pub async fn seed_if_empty(pool: &PgPool) -> anyhow::Result<()> {
    let skus: Vec<&str> = DEMO_CATALOG.iter().map(|p| p.0).collect();
    let names: Vec<&str> = DEMO_CATALOG.iter().map(|p| p.1).collect();
    let units: Vec<i64> = DEMO_CATALOG.iter().map(|p| p.2).collect();
    let inserted = sqlx::query(
        "INSERT INTO products (sku, name, available)
         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
         WHERE NOT EXISTS (SELECT 1 FROM products)",
    )
    .bind(&skus)
    .bind(&names)
    .bind(&units)
    .execute(pool)
    .await
    .context("seeding the demo catalog")?
    .rows_affected();
    if inserted > 0 {
        tracing::info!(products = inserted, "loaded the demo catalog");
    }
    Ok(())
}

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/products", get(list))
        .route("/products/{sku}", get(show).put(upsert))
        .with_state(pool)
}

#[derive(sqlx::FromRow)]
struct ProductRow {
    sku: String,
    name: String,
    available: i64,
    reserved: i64,
    updated_at: chrono::DateTime<chrono::Utc>,
}

fn to_json(p: &ProductRow) -> serde_json::Value {
    json!({
        "sku": p.sku,
        "name": p.name,
        "available": p.available,
        "reserved": p.reserved,
        "updated_at": p.updated_at,
    })
}

async fn list(State(pool): State<PgPool>) -> Result<Json<serde_json::Value>, ApiError> {
    let rows: Vec<ProductRow> = sqlx::query_as(
        "SELECT sku, name, available, reserved, updated_at FROM products ORDER BY sku",
    )
    .fetch_all(&pool)
    .await?;
    Ok(Json(
        json!({ "products": rows.iter().map(to_json).collect::<Vec<_>>() }),
    ))
}

fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn show(
    State(pool): State<PgPool>,
    Path(sku): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sku = parse_sku(&sku)?;
    let row: Option<ProductRow> = sqlx::query_as(
        "SELECT sku, name, available, reserved, updated_at FROM products WHERE sku = $1",
    )
    .bind(sku.as_str())
    .fetch_optional(&pool)
    .await?;
    row.map(|r| Json(to_json(&r)))
        .ok_or_else(|| ApiError::not_found(format!("product {sku} does not exist")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpsertRequest {
    name: String,
    available: i64,
}

/// Creates the product, or sets its name and available units.
async fn upsert(
    State(pool): State<PgPool>,
    Path(sku): Path<String>,
    ApiJson(body): ApiJson<UpsertRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
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
    let (row, created): (ProductRow, bool) = {
        let r: (String, String, i64, i64, chrono::DateTime<chrono::Utc>, bool) = sqlx::query_as(
            "INSERT INTO products (sku, name, available) VALUES ($1, $2, $3)
             ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name, available = EXCLUDED.available, updated_at = now()
             RETURNING sku, name, available, reserved, updated_at, (xmax = 0) AS created",
        )
        .bind(sku.as_str())
        .bind(name)
        .bind(body.available)
        .fetch_one(&pool)
        .await?;
        (
            ProductRow {
                sku: r.0,
                name: r.1,
                available: r.2,
                reserved: r.3,
                updated_at: r.4,
            },
            r.5,
        )
    };
    tracing::info!(sku = %sku, available = row.available, created, "product stocked");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(to_json(&row))))
}
