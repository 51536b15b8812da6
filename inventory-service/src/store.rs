//! SQL, all of it: for the saga handler (read and lock what a batch
//! touches, write what it decided), for the catalog and for the
//! reservations' listing.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use events::LineItem;
use events::Sku;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{Reservation, ReservationStatus, Stock};

/// Reads, in one round trip: the reservations of `order_ids` (locked),
/// and the stock of `skus` plus, with `with_held`, of every SKU those
/// reservations hold, locked in SKU order (so concurrent batches cannot
/// deadlock).
pub async fn lock(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
    skus: &[&str],
    with_held: bool,
) -> Result<Stock, sqlx::Error> {
    type Read = (
        Vec<Uuid>,
        Vec<String>,
        Vec<serde_json::Value>,
        Vec<String>,
        Vec<i64>,
    );
    let (ids, statuses, items, locked_skus, available): Read = sqlx::query_as(
        "WITH r AS (
             SELECT order_id, status, items FROM reservations
             WHERE order_id = ANY($2) ORDER BY order_id FOR UPDATE),
         locked AS (
             SELECT sku, available FROM products
             WHERE sku = ANY($1)
                OR ($3 AND sku IN (SELECT i ->> 'sku' FROM r, jsonb_array_elements(r.items) i
                                   WHERE r.status = 'RESERVED'))
             ORDER BY sku FOR UPDATE)
         SELECT COALESCE((SELECT array_agg(order_id) FROM r), '{}'),
                COALESCE((SELECT array_agg(status) FROM r), '{}'),
                COALESCE((SELECT array_agg(items) FROM r), '{}'),
                COALESCE((SELECT array_agg(sku ORDER BY sku) FROM locked), '{}'),
                COALESCE((SELECT array_agg(available ORDER BY sku) FROM locked), '{}')",
    )
    .bind(skus)
    .bind(order_ids)
    .bind(with_held)
    .fetch_one(&mut *conn)
    .await?;
    let mut reservations = HashMap::with_capacity(ids.len());
    for ((id, status), items) in ids.into_iter().zip(statuses).zip(items) {
        let items: Vec<LineItem> =
            serde_json::from_value(items).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        let status =
            ReservationStatus::try_from(status).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        reservations.insert(
            id,
            Reservation {
                status,
                items,
                new: false,
                changed: false,
            },
        );
    }
    Ok(Stock {
        on_hand: locked_skus.into_iter().zip(available).collect(),
        reservations,
        moved: BTreeMap::new(),
    })
}

/// Writes what a batch decided, in one statement: the units moved between
/// `available` and `reserved`, new reservations and changed ones.
/// `correlations` names each new reservation's correlation ID.
pub async fn save(
    conn: &mut PgConnection,
    stock: &Stock,
    correlations: &HashMap<Uuid, &str>,
) -> Result<(), sqlx::Error> {
    let mut new = NewRows::default();
    let (mut changed_ids, mut changed_statuses) = (Vec::new(), Vec::new());
    for (id, r) in &stock.reservations {
        if r.new {
            new.ids.push(*id);
            new.statuses.push(r.status.as_str());
            new.items.push(
                serde_json::to_value(&r.items).map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
            );
            new.correlations
                .push(correlations.get(id).copied().unwrap_or_default());
        } else if r.changed {
            changed_ids.push(*id);
            changed_statuses.push(r.status.as_str());
        }
    }
    let (moved_skus, moved_qtys): (Vec<&str>, Vec<i64>) = stock
        .moved
        .iter()
        .filter(|(_, q)| **q != 0)
        .map(|(s, q)| (s.as_str(), *q))
        .unzip();
    if new.ids.is_empty() && changed_ids.is_empty() && moved_skus.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH moved AS (
             UPDATE products p SET available = p.available + m.qty, reserved = p.reserved - m.qty,
                 version = p.version + 1, updated_at = now()
             FROM unnest($5::text[], $6::bigint[]) AS m(sku, qty)
             WHERE p.sku = m.sku),
         changed AS (
             UPDATE reservations r SET status = c.status, updated_at = now()
             FROM unnest($7::uuid[], $8::text[]) AS c(order_id, status)
             WHERE r.order_id = c.order_id)
         INSERT INTO reservations (order_id, status, items, correlation_id)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[])",
    )
    .bind(&new.ids)
    .bind(&new.statuses)
    .bind(&new.items)
    .bind(&new.correlations)
    .bind(&moved_skus)
    .bind(&moved_qtys)
    .bind(&changed_ids)
    .bind(&changed_statuses)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// New reservations as the column arrays `unnest` takes.
#[derive(Default)]
struct NewRows<'a> {
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    items: Vec<serde_json::Value>,
    correlations: Vec<&'a str>,
}

// ---- The catalog.

/// Loaded on first start with an empty catalog: `(sku, name, units)`.
/// `SKU-RARE` has only 5 units, for trying the out-of-stock path.
pub const DEMO_CATALOG: &[(&str, &str, i64)] = &[
    ("SKU-1", "Mechanical keyboard", 1_000),
    ("SKU-2", "Wireless mouse", 1_000),
    ("SKU-3", "USB-C cable", 5_000),
    ("SKU-4", "27-inch monitor", 200),
    ("SKU-RARE", "Signed first-edition print", 5),
];

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

/// A product as stored, with its ledger's sum.
#[derive(sqlx::FromRow)]
pub struct ProductRow {
    pub sku: String,
    pub name: String,
    pub available: i64,
    pub reserved: i64,
    pub stocked: i64,
    pub version: i64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Columns of [`ProductRow`] from `products p`.
const PRODUCT_COLUMNS: &str = "p.sku, p.name, p.available, p.reserved, \
     COALESCE((SELECT sum(delta) FROM stock_ledger l WHERE l.sku = p.sku), 0)::bigint AS stocked, \
     p.version, p.updated_at";

/// Every product, by SKU.
pub async fn list_products(pool: &PgPool) -> Result<Vec<ProductRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {PRODUCT_COLUMNS} FROM products p ORDER BY p.sku"
    ))
    .fetch_all(pool)
    .await
}

pub async fn find_product(pool: &PgPool, sku: &Sku) -> Result<Option<ProductRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {PRODUCT_COLUMNS} FROM products p WHERE p.sku = $1"
    ))
    .bind(sku.as_str())
    .fetch_optional(pool)
    .await
}

/// The product's `(available, version)`, locked until the transaction ends.
pub async fn lock_product(
    conn: &mut PgConnection,
    sku: &Sku,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT available, version FROM products WHERE sku = $1 FOR UPDATE")
        .bind(sku.as_str())
        .fetch_optional(conn)
        .await
}

/// Creates the product and books its units in the ledger, in one
/// statement; `false` if another request created it meanwhile.
pub async fn create_product(
    conn: &mut PgConnection,
    sku: &Sku,
    name: &str,
    available: i64,
) -> Result<bool, sqlx::Error> {
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
    .bind(available)
    .fetch_one(conn)
    .await?;
    Ok(created > 0)
}

/// Sets the product's name and units, a new version, and books the change
/// of units (`delta`) in the ledger, in one statement.
pub async fn update_product(
    conn: &mut PgConnection,
    sku: &Sku,
    name: &str,
    available: i64,
    delta: i64,
) -> Result<(), sqlx::Error> {
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
    .bind(available)
    .bind(delta)
    .execute(conn)
    .await?;
    Ok(())
}

/// What a restock did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restock {
    Added,
    NoSuchProduct,
    /// The product would hold more than the limit: nothing changed.
    OverLimit,
}

/// Adds `quantity` units, whatever was reserved meanwhile, unless the
/// product would then hold more than `max`; books them in the ledger in the
/// same statement.
pub async fn restock(
    pool: &PgPool,
    sku: &Sku,
    quantity: i64,
    max: i64,
) -> Result<Restock, sqlx::Error> {
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
    .bind(quantity)
    .bind(max)
    .fetch_optional(pool)
    .await?;
    Ok(match outcome {
        None => Restock::NoSuchProduct,
        Some(false) => Restock::OverLimit,
        Some(true) => Restock::Added,
    })
}

// ---- The reservations' listing.

/// A reservation as stored.
#[derive(sqlx::FromRow)]
pub struct ReservationRow {
    pub order_id: Uuid,
    #[sqlx(try_from = "String")]
    pub status: ReservationStatus,
    pub items: serde_json::Value,
    pub correlation_id: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A page of reservations in `statuses`, newest order first, below `after`.
pub async fn list_reservations(
    pool: &PgPool,
    statuses: &[&str],
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ReservationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, status, items, correlation_id, created_at, updated_at FROM reservations
         WHERE status = ANY($1) AND ($2::uuid IS NULL OR order_id < $2)
         ORDER BY order_id DESC LIMIT $3",
    )
    .bind(statuses)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The order's reservation, if its status is one of `statuses`.
pub async fn find_reservation(
    pool: &PgPool,
    order_id: Uuid,
    statuses: &[&str],
) -> Result<Option<ReservationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, status, items, correlation_id, created_at, updated_at FROM reservations
         WHERE order_id = $1 AND status = ANY($2)",
    )
    .bind(order_id)
    .bind(statuses)
    .fetch_optional(pool)
    .await
}
