//! Saga deadlines: every order still PENDING `ORDER_DEADLINE_SECS` after
//! its creation fails with `deadline_exceeded`, and its `OrderCancelled`
//! asks the other services to undo what they did.
//!
//! Deadlines live in the database, not in timers: each replica looks for
//! due orders a few times a second through a partial index on PENDING
//! orders, so a deadline fires after a restart, and fires once however many
//! replicas look (the due orders are locked with `SKIP LOCKED` and
//! re-checked under the lock). Both ends of the comparison are the
//! database's clock (`created_at` is its `now()` at the insert, and "now"
//! is asked of it), so a replica whose host clock is off expires orders
//! neither early nor late.

use std::time::Duration;

use saga_runtime::CancellationToken;
use saga_runtime::{metrics, Outbox};
use sqlx::PgPool;

use crate::domain::OrderState;
use crate::{ending, store};

/// How often due orders are looked for: a deadline fires within this
/// (plus the transaction) of falling due.
const EVERY: Duration = Duration::from_millis(250);
/// How often the overdue gauge is refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(2);

/// Expires due orders until `shutdown`.
pub async fn run(pool: PgPool, outbox: Outbox, deadline: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gauge = tokio::time::interval(GAUGE_EVERY);
    gauge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let overdue = metrics::global()
        .orders_overdue
        .get_or_create(&metrics::Metrics::service(crate::SERVICE))
        .clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Work through a backlog (after an outage) batch by batch.
                loop {
                    match ending::expire_due(&pool, &outbox, deadline).await {
                        Ok(n) if n > 0 && !shutdown.is_cancelled() => continue,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "expiring orders past their deadline failed; will retry"),
                    }
                    break;
                }
            }
            _ = gauge.tick() => {
                let counted = async {
                    let mut conn = pool.acquire().await?;
                    let cutoff = OrderState::due_cutoff(store::db_now(&mut conn).await?, deadline / 2);
                    store::count_pending_since(&mut *conn, cutoff).await
                };
                match counted.await {
                    Ok(n) => {
                        overdue.set(n);
                    }
                    Err(e) => tracing::debug!(error = %e, "counting overdue orders failed"),
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}
