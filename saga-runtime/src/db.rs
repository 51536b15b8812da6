//! Database set-up: create the service's database when missing, connect with
//! a deadline, run the shared migrations (outbox, inbox) and the service's own.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

/// How long start-up waits for PostgreSQL to accept connections.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// Connects to `url`, creating the database first if it does not exist, and
/// migrates it: the runtime's tables first, then `service_migrations`.
pub async fn connect_and_migrate(
    url: &str,
    max_connections: u32,
    mut service_migrations: Migrator,
) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| "DATABASE_URL is not a valid PostgreSQL URL".to_owned())?;
    let db_name = options.get_database().unwrap_or("postgres").to_owned();

    retry_until_deadline("create the database", || async {
        if !Postgres::database_exists(url).await? {
            match Postgres::create_database(url).await {
                Ok(()) => tracing::info!(database = %db_name, "created database"),
                // Another instance created it in the meantime.
                Err(e) if is_duplicate_database(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await?;

    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to database {db_name}"))?;

    let mut shared = sqlx::migrate!("./migrations");
    // Both migrators record into the same `_sqlx_migrations` table, each
    // ignoring the other's versions.
    shared.set_ignore_missing(true);
    shared
        .run(&pool)
        .await
        .context("running the shared outbox/inbox migrations")?;
    service_migrations.set_ignore_missing(true);
    service_migrations
        .run(&pool)
        .await
        .context("running the service's migrations")?;
    Ok(pool)
}

/// A second, small pool on the same database for the consumer loop and the
/// outbox relay, which each work on one connection at a time. They must not
/// queue behind HTTP requests: under load the request handlers hold every
/// connection of the main pool, and a consumer waiting for one stalls every
/// saga behind it (figures in docs/performance.md).
///
/// Every statement on it is a key lookup or a keyed write, so it plans each
/// statement once (`plan_cache_mode = force_generic_plan`) with sequential
/// scans ruled out (`enable_seqscan = off`). A plan cached by default rules
/// is a trap here: made while the tables were still empty, it kept scanning
/// `payments` and `orders` sequentially for the batch's keys as they grew.
/// Planning every statement afresh avoided that but cost a third of these
/// statements' time (docs/performance.md).
pub fn background_pool(main: &PgPool) -> PgPool {
    let options = (*main.connect_options()).clone().options([
        ("plan_cache_mode", "force_generic_plan"),
        ("enable_seqscan", "off"),
    ]);
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options)
}

/// Another instance created the database first: `duplicate_database`, or,
/// when both `CREATE DATABASE`s ran at once, the unique violation on the
/// catalog that the slower one hits.
fn is_duplicate_database(e: &sqlx::Error) -> bool {
    matches!(sqlstate(e).as_deref(), Some("42P04" | "23505"))
}

/// Retries `op` while it fails with a connection-level error, up to a deadline,
/// so services may start before the database is ready (docker compose).
async fn retry_until_deadline<F, Fut>(what: &str, mut op: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(()) => return Ok(()),
            Err(e) if is_connectivity_error(&e) && started.elapsed() < CONNECT_DEADLINE => {
                tracing::warn!(error = %e, "database not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e).with_context(|| format!("could not {what}")),
        }
    }
}

/// Errors that say "the database is not there right now", not "this is wrong".
pub fn is_connectivity_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    ) || sqlstate(e).is_some_and(|c| c.starts_with("57P") || c.starts_with("08"))
}

/// Errors that go away by waiting: the database is away, read-only (a
/// failover's window), out of a resource, or the statement lost a race
/// with another transaction. Retrying the same work later is correct for
/// all of them; none of them says anything about the data being handled,
/// so none may ever dead-letter an event.
pub fn is_transient(e: &sqlx::Error) -> bool {
    is_connectivity_error(e)
        || matches!(e, sqlx::Error::WorkerCrashed)
        || sqlstate(e).is_some_and(|c| is_transient_sqlstate(&c))
}

/// Transient errors that may be this work's own doing rather than the
/// database's state: a statement timeout or cancel (`57014`), the lock
/// table or memory exhausted (`53200`, a batch that locks too much), a lock
/// not granted in time or an object in use (`55P03`, `55006`), a lost race
/// (`40001`, `40P01`). Retried, but not for ever: if the same work keeps
/// failing with one of these while the database answers other queries,
/// it is the work, and the consumer splits its batch (see
/// [`crate::consumer`]). The other transient errors (connection lost,
/// server shutting down or starting, read-only, too many connections,
/// disk full, I/O) are outages, waited out however long they last.
pub fn is_contention(e: &sqlx::Error) -> bool {
    sqlstate(e).is_some_and(|c| is_contention_sqlstate(&c))
}

/// The SQLSTATEs of [`is_contention`].
pub fn is_contention_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "57014" | "53200" | "55P03" | "55006" | "40001" | "40P01"
    )
}

/// The SQLSTATE classes and codes [`is_transient`] waits out.
pub fn is_transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        // read_only_sql_transaction: a standby, or a primary being demoted.
        "25006"
        // serialization_failure, deadlock_detected.
        | "40001" | "40P01"
        // lock_not_available, object_in_use.
        | "55P03" | "55006"
        // query_canceled (statement_timeout, pg_cancel_backend).
        | "57014"
    ) || code.starts_with("53") // insufficient resources: too many connections, disk full, out of memory
        || code.starts_with("57P") // operator intervention: shutdown, crash shutdown, cannot connect now
        || code.starts_with("08") // connection exceptions
        || code.starts_with("58") // system errors (I/O)
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    match e {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{is_contention_sqlstate, is_transient_sqlstate};

    #[test]
    fn outages_and_lost_races_are_transient_data_errors_are_not() {
        for code in [
            "25006", "40001", "40P01", "55P03", "57014", "53300", "53100", "57P01", "57P03",
            "08006", "58030",
        ] {
            assert!(is_transient_sqlstate(code), "{code} should be retried");
        }
        for code in ["23505", "22P02", "42P01", "42703", "23514", "P0001"] {
            assert!(!is_transient_sqlstate(code), "{code} is not transient");
        }
    }

    #[test]
    fn contention_is_transient_but_outages_are_not_contention() {
        for code in ["57014", "53200", "55P03", "55006", "40001", "40P01"] {
            assert!(
                is_transient_sqlstate(code) && is_contention_sqlstate(code),
                "{code}"
            );
        }
        for code in [
            "25006", "53300", "53100", "57P01", "57P03", "08006", "58030",
        ] {
            assert!(
                is_transient_sqlstate(code) && !is_contention_sqlstate(code),
                "{code}"
            );
        }
    }
}
