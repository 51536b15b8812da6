//! SQL for payments and the cancellations heard before any charge.

use chrono::{DateTime, Utc};
use events::{CancelReason, Money};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::domain::{Book, Payment, PaymentStatus};

/// A payment as the API shows it.
#[derive(Debug, sqlx::FromRow)]
pub struct PaymentRow {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount_minor: i64,
    #[sqlx(try_from = "String")]
    pub status: PaymentStatus,
    pub decline_reason: Option<String>,
    pub refund_reason: Option<String>,
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "order_id, payment_id, amount_minor, status, decline_reason, refund_reason, \
     correlation_id, created_at, updated_at";

pub async fn find<'e>(
    db: impl PgExecutor<'e>,
    order_id: Uuid,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(db)
    .await
}

/// One page of payments, newest order first, below `after`.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<PaymentRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE ($1::uuid IS NULL OR order_id < $1)
         ORDER BY order_id DESC LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// A row of [`lock`]'s answer: a payment, or a cancellation heard before
/// any payment (then only `order_id` and `cancel_reason` are set).
#[derive(sqlx::FromRow)]
struct Known {
    order_id: Uuid,
    payment_id: Option<Uuid>,
    amount_minor: Option<i64>,
    status: Option<String>,
    decline_reason: Option<String>,
    refund_reason: Option<String>,
    correlation_id: Option<String>,
    cancel_reason: Option<String>,
}

/// Locks the payments of `ids` (in ID order, so concurrent batches cannot
/// deadlock) and reads which of those orders were cancelled before any
/// charge, in one statement.
pub async fn lock(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Book, sqlx::Error> {
    let rows: Vec<Known> = sqlx::query_as(
        "WITH p AS (
             SELECT order_id, payment_id, amount_minor, status, decline_reason, refund_reason,
                    correlation_id
             FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE)
         SELECT p.*, NULL::text AS cancel_reason FROM p
         UNION ALL
         SELECT order_id, NULL, NULL, NULL, NULL, NULL, NULL, reason
         FROM cancellations WHERE order_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let decode = |e: events::DomainError| sqlx::Error::Decode(Box::new(e));
    let mut book = Book::default();
    for r in rows {
        if let Some(reason) = r.cancel_reason {
            let reason: CancelReason = reason.parse().map_err(decode)?;
            book.cancelled.insert(r.order_id, (reason, false));
            continue;
        }
        let (Some(payment_id), Some(amount), Some(status), Some(correlation_id)) =
            (r.payment_id, r.amount_minor, r.status, r.correlation_id)
        else {
            return Err(sqlx::Error::Decode(
                format!("incomplete payment row for order {}", r.order_id).into(),
            ));
        };
        book.payments.insert(
            r.order_id,
            Payment {
                payment_id,
                amount: Money::from_minor(amount),
                status: PaymentStatus::try_from(status).map_err(decode)?,
                decline_reason: r.decline_reason,
                refund_reason: r.refund_reason,
                correlation_id,
                new: false,
                changed: false,
            },
        );
    }
    Ok(book)
}

/// Writes what a batch changed: new payments, changed statuses and newly
/// heard cancellations, in one statement. A payment another consumer
/// inserted meanwhile (during a rebalance) violates the key, and the batch
/// is retried, now seeing it.
pub async fn save(conn: &mut PgConnection, book: &Book) -> Result<(), sqlx::Error> {
    let mut new = Columns::default();
    let (mut changed_ids, mut changed_status, mut refund_reasons) =
        (Vec::new(), Vec::new(), Vec::new());
    for (order_id, p) in &book.payments {
        if p.new {
            new.order_ids.push(*order_id);
            new.payment_ids.push(p.payment_id);
            new.amounts.push(p.amount.minor());
            new.statuses.push(p.status.as_str());
            new.reasons.push(p.decline_reason.as_deref());
            new.refund_reasons.push(p.refund_reason.as_deref());
            new.correlations.push(p.correlation_id.as_str());
        } else if p.changed {
            changed_ids.push(*order_id);
            changed_status.push(p.status.as_str());
            refund_reasons.push(p.refund_reason.as_deref());
        }
    }
    let (cancel_ids, cancel_reasons): (Vec<Uuid>, Vec<&str>) = book
        .cancelled
        .iter()
        .filter(|(_, (_, new))| *new)
        .map(|(id, (reason, _))| (*id, reason.as_str()))
        .unzip();
    if new.order_ids.is_empty() && changed_ids.is_empty() && cancel_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH changed AS (
             UPDATE payments p SET status = c.status, refund_reason = c.refund_reason, updated_at = now()
             FROM unnest($8::uuid[], $9::text[], $10::text[]) AS c(order_id, status, refund_reason)
             WHERE p.order_id = c.order_id),
         cancelled AS (
             INSERT INTO cancellations (order_id, reason)
             SELECT * FROM unnest($11::uuid[], $12::text[])
             ON CONFLICT (order_id) DO NOTHING)
         INSERT INTO payments (order_id, payment_id, amount_minor, status, decline_reason,
                               refund_reason, correlation_id)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[],
                              $6::text[], $7::text[])",
    )
    .bind(&new.order_ids)
    .bind(&new.payment_ids)
    .bind(&new.amounts)
    .bind(&new.statuses)
    .bind(&new.reasons)
    .bind(&new.refund_reasons)
    .bind(&new.correlations)
    .bind(&changed_ids)
    .bind(&changed_status)
    .bind(&refund_reasons)
    .bind(&cancel_ids)
    .bind(&cancel_reasons)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// New payments as the column arrays `unnest` takes.
#[derive(Default)]
struct Columns<'p> {
    order_ids: Vec<Uuid>,
    payment_ids: Vec<Uuid>,
    amounts: Vec<i64>,
    statuses: Vec<&'static str>,
    reasons: Vec<Option<&'p str>>,
    refund_reasons: Vec<Option<&'p str>>,
    correlations: Vec<&'p str>,
}
