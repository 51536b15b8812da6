//! Forgets what is no longer needed, off the hot path: processed-event ids
//! (the consumers' inbox) after [`INBOX_RETENTION`], and outbox rows earlier
//! versions left marked published.
//!
//! It runs as its own task, so a long purge never holds up the relay or a
//! consumer batch, and deletes in chunks of [`CHUNK`] rows, so no statement
//! runs long or writes a burst of WAL. The inbox has a BRIN index on
//! `processed_at` (rows arrive in time order, so it stays a few pages and
//! costs inserts next to nothing); a purge reads only the old block ranges
//! instead of the whole table.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How long a consumer remembers an event it processed. A redelivery older
/// than this (a consumer group reset to the beginning of a topic with older
/// retention, say) would be processed again.
pub const INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a purge runs.
const EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per statement.
pub const CHUNK: i64 = 5_000;
/// Published outbox rows left by earlier versions (which kept them an hour
/// instead of deleting them) are purged after this.
const OUTBOX_RETENTION: &str = "1 hour";

/// Purges once a minute until `shutdown`.
pub async fn run(pool: PgPool, service: &'static str, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let purge = async {
            let cutoff = chrono::Utc::now() - INBOX_RETENTION;
            match purge_inbox(&pool, cutoff, CHUNK).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(service, rows = n, "purged old processed-event ids"),
                Err(e) => {
                    tracing::warn!(service, error = %e, "purging old processed-event ids failed")
                }
            }
            if let Err(e) = purge_outbox(&pool).await {
                tracing::warn!(service, error = %e, "purging published outbox rows failed");
            }
        };
        tokio::select! {
            () = purge => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Deletes inbox rows processed before `cutoff`, `chunk` rows per statement.
/// Returns how many it deleted.
pub async fn purge_inbox(
    pool: &PgPool,
    cutoff: chrono::DateTime<chrono::Utc>,
    chunk: i64,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM processed_events WHERE processed_at < $1 LIMIT $2))",
        )
        .bind(cutoff)
        .bind(chunk)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < u64::try_from(chunk).unwrap_or(u64::MAX) {
            return Ok(total);
        }
    }
}

async fn purge_outbox(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(&format!(
        "DELETE FROM outbox WHERE published_at < now() - interval '{OUTBOX_RETENTION}'"
    ))
    .execute(pool)
    .await?
    .rows_affected())
}
