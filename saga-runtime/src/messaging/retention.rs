//! Forgets processed-event ids (the consumers' inbox) after
//! [`INBOX_RETENTION`], and parked events of a type no build has known
//! after [`PARKED_RETENTION`], off the hot path.
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
/// How long an event of a type no build has known is kept in
/// `parked_events` (see [`crate::parked`]): as long as the inbox remembers.
pub const PARKED_RETENTION: Duration = INBOX_RETENTION;
/// How often a purge runs.
const EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per statement.
pub const CHUNK: i64 = 5_000;

/// Purges once a minute until `shutdown`.
pub async fn run(pool: PgPool, service: &'static str, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let cutoff = chrono::Utc::now() - INBOX_RETENTION;
        let purged = tokio::select! {
            r = purge_inbox(&pool, cutoff, CHUNK) => r,
            _ = shutdown.cancelled() => return,
        };
        match purged {
            Ok(0) => {}
            Ok(n) => tracing::info!(service, rows = n, "purged old processed-event ids"),
            Err(e) => tracing::warn!(service, error = %e, "purging old processed-event ids failed"),
        }
        let cutoff = chrono::Utc::now() - PARKED_RETENTION;
        let purged = tokio::select! {
            r = purge_parked(&pool, cutoff) => r,
            _ = shutdown.cancelled() => return,
        };
        match purged {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                service,
                rows = n,
                "forgot parked events of a type no build here has known for {} days",
                PARKED_RETENTION.as_secs() / 86_400
            ),
            Err(e) => tracing::warn!(service, error = %e, "purging old parked events failed"),
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

/// Deletes parked events stored before `cutoff`. Returns how many.
pub async fn purge_parked(
    pool: &PgPool,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM parked_events WHERE parked_at < $1")
            .bind(cutoff)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}
