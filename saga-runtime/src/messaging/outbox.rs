//! Transactional outbox: events are written in the same transaction as the
//! state change they describe, and a relay publishes them to Kafka.
//!
//! The writer hands the rows it staged to the relay once its transaction
//! has committed ([`Outbox::committed`]), so the relay publishes them without
//! reading them back. Each row the broker acknowledges is deleted in one
//! statement per batch that does not wait for the disk: a crash before the
//! delete only republishes, and consumers deduplicate by `event_id`.
//!
//! Rows no live relay holds in memory (a crashed process's, rows past the
//! in-memory cap, rows whose delete failed, or a writer that never handed
//! them over) are swept once a second, whatever the load, once they are a
//! few seconds old. A sweep claims its rows for a minute in a short
//! statement (`claimed_until`, under `FOR UPDATE SKIP LOCKED` so replicas
//! share the work), then sends them holding no lock: a crashed sweeper's
//! claim simply runs out. Rows a sweep took are never published again by
//! the same process's in-memory relay, even when their writer hands them
//! over late. A replica whose hand-over lags more than the sweep's age
//! threshold may see another replica publish its rows as well; consumers
//! absorb the duplicate.
//!
//! Each order's events reach the broker in commit order, whichever path
//! they take (an order's transactions all lock the order, so for one key
//! the row IDs follow commit order):
//! - a batch is sent in waves holding at most one row per key, each wave
//!   acknowledged before the next; a key whose row failed sends nothing
//!   more in that batch, so a retry can never land behind a later event;
//! - before the relay publishes rows handed over in memory it asks the
//!   table for earlier rows of the same keys that are not in its batch
//!   (another replica's, a sweep's, rows past the in-memory cap); rows
//!   behind one wait until it is gone (published and deleted);
//! - a sweep takes a row only with every earlier row of its key (one that
//!   another transaction holds a lock on included), and sweeps of several
//!   replicas claim one at a time (an advisory lock).
//!
//! Nothing is ever set aside: a row the broker refuses for good (too large,
//! wrong ACLs, topic missing) stays in the outbox, marked `refused_at`,
//! logged with its order, counted in `saga_outbox_publish_failures_total`
//! and `saga_outbox_refused`. Only its own order waits: the in-memory relays
//! leave that order's rows in the table, and the sweep (any replica's)
//! retries them in order once a second until someone fixes the cause;
//! every other order's rows keep flowing. A sweep's age threshold counts
//! from when a sweep first saw the row committed (`seen_at`), not from its
//! transaction's start.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use events::Envelope;
use futures::future::join_all;
use futures::FutureExt;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::kafka::{self, headers, EventProducer};
use crate::retry::Backoff;
use crate::{metrics, telemetry};

/// Rows published per round trip.
const BATCH_SIZE: i64 = 500;
/// How often rows no relay holds in memory are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long after a sweep first saw it committed an unpublished row must
/// wait before a sweep takes it: until then it is normally on its way
/// through the relay that wrote it.
const ORPHAN_AFTER: &str = "5 seconds";
/// Rows younger than this (by their transaction's start) are not even
/// looked at: nearly all of them are published and deleted within
/// milliseconds, and stamping them would only add writes.
const SEE_AFTER: &str = "1 second";
/// How long a sweep's claim on its rows lasts: longer than a send can take
/// (`message.timeout.ms`, 30 s) plus the delete.
const CLAIM_FOR: &str = "60 seconds";
/// How long a process remembers the rows its sweep took, so that a writer
/// handing them over late does not publish them again.
const REMEMBER_SWEPT: Duration = Duration::from_secs(120);
/// Most rows held in memory for the relay (about 1 KiB each); the rest wait
/// in the table for a sweep.
const MAX_HELD: usize = 10_000;
/// How long the relay waits before looking again when every row it holds
/// waits behind an earlier row of its key that someone else publishes.
const BLOCKED_RECHECK: Duration = Duration::from_millis(20);
/// `pg_advisory_xact_lock` key that serialises the sweeps' claims (per
/// database, so per service): two sweeps claiming at once could split one
/// key's rows between them and publish them out of order. Holding it (in a
/// session of one's own) pauses every replica's sweep.
pub const SWEEP_LOCK: i64 = 0x5a6a_0b0c;

/// Writes events into the outbox and hands them to the relay.
#[derive(Clone, Debug)]
pub struct Outbox {
    topic_prefix: Arc<str>,
    handoff: Arc<Handoff>,
}

/// Committed rows on their way to the relay.
#[derive(Debug, Default)]
struct Handoff {
    state: Mutex<Held>,
    wake: Notify,
}

/// What the relay of this process holds.
#[derive(Debug, Default)]
struct Held {
    /// Rows to publish, in commit order.
    queue: Vec<Row>,
    /// Rows a sweep of this process took, and when: a hand-over that comes
    /// after the sweep drops them instead of publishing them again.
    swept: HashMap<i64, Instant>,
    /// Orders (message keys) with a row the broker refused, and since when:
    /// their rows stay in the table for the sweep instead of being held
    /// here, so that they wait without holding anything else up.
    refused: HashMap<String, Instant>,
}

/// Rows a transaction wrote to the outbox. Give them to
/// [`Outbox::committed`] once it commits; dropped instead (the transaction
/// rolled back, or the process died), the rows are either gone or swept.
#[derive(Debug, Default)]
#[must_use = "hand the rows to Outbox::committed once the transaction commits"]
pub struct Staged(Vec<Row>);

/// Outbox rows encoded for one `INSERT`, for a caller that writes them in
/// the same statement as its own rows (data-modifying `WITH` queries):
/// build the SQL with [`Prepared::insert`], bind with [`Prepared::bind`],
/// select [`Prepared::RETURNING`] and turn those rows into [`Staged`] with
/// [`Prepared::staged`].
#[derive(Debug)]
#[must_use = "insert the rows, then hand them to the relay through Prepared::staged"]
pub struct Prepared(Vec<Row>);

impl Prepared {
    /// Parameters [`Prepared::bind`] adds.
    pub const PARAMS: usize = 7;

    /// What the insert returns for [`Prepared::staged`]: each row's `id`,
    /// `event_id`, and `behind`: whether an earlier row of its key was still
    /// unpublished when it was written. Only such rows make the relay look
    /// for earlier rows before it publishes them; for the others there can
    /// be none (an order's transactions lock the order, so an earlier row
    /// committed before this insert's snapshot, and it was published and
    /// deleted already).
    pub const RETURNING: &'static str = "RETURNING id, event_id, EXISTS (
        SELECT 1 FROM outbox p WHERE p.message_key = outbox.message_key AND p.id < outbox.id) AS behind";

    /// `INSERT INTO outbox ... SELECT ...` over the arrays bound as
    /// parameters `$first` to `$first + 6`, without a `RETURNING` clause.
    /// With `only_orders`, a query yielding order IDs (`uuid`), only the
    /// events of those orders are written.
    pub fn insert(first: usize, only_orders: Option<&str>) -> String {
        let p: Vec<String> = (first..first + Self::PARAMS)
            .map(|i| format!("${i}"))
            .collect();
        let filter = only_orders
            .map(|q| format!(" WHERE e.message_key::uuid IN ({q})"))
            .unwrap_or_default();
        format!(
            "INSERT INTO outbox (event_id, topic, message_key, event_type, correlation_id, traceparent, payload)
             SELECT e.* FROM unnest({}::uuid[], {}::text[], {}::text[], {}::text[], {}::text[], {}::text[], {}::bytea[])
                  AS e(event_id, topic, message_key, event_type, correlation_id, traceparent, payload){filter}",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6]
        )
    }

    /// Binds the rows as the next [`Prepared::PARAMS`] parameters of `q`.
    pub fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        // One array per column, in the order `insert` names them.
        fn col<'r, T>(rows: &'r [Row], f: impl Fn(&'r Row) -> T) -> Vec<T> {
            rows.iter().map(f).collect()
        }
        let rows = &self.0;
        q.bind(col(rows, |r| r.event_id))
            .bind(col(rows, |r| r.topic.as_str()))
            .bind(col(rows, |r| r.message_key.as_str()))
            .bind(col(rows, |r| r.event_type.as_str()))
            .bind(col(rows, |r| r.correlation_id.as_str()))
            .bind(col(rows, |r| r.traceparent.as_deref()))
            .bind(col(rows, |r| r.payload.as_slice()))
    }

    /// The rows the insert wrote, given its `(id, event_id, behind)` rows
    /// (see [`Prepared::RETURNING`]); rows the statement left out are
    /// dropped.
    pub fn staged(self, ids: impl IntoIterator<Item = (i64, uuid::Uuid, bool)>) -> Staged {
        let ids: HashMap<uuid::Uuid, (i64, bool)> = ids
            .into_iter()
            .map(|(id, e, behind)| (e, (id, behind)))
            .collect();
        Staged(
            self.0
                .into_iter()
                .filter_map(|mut row| {
                    (row.id, row.behind) = *ids.get(&row.event_id)?;
                    Some(row)
                })
                .collect(),
        )
    }
}

impl Outbox {
    pub fn new(kafka: &KafkaConfig) -> Self {
        Self {
            topic_prefix: kafka.topic_prefix.as_str().into(),
            handoff: Arc::default(),
        }
    }

    /// Adds events to the outbox in one statement, each with the W3C
    /// `traceparent` of the span that caused it (consumer batches write the
    /// events of many traces at once).
    pub async fn enqueue_traced(
        &self,
        conn: &mut PgConnection,
        events: &[(&Envelope, Option<&str>)],
    ) -> Result<Staged, sqlx::Error> {
        if events.is_empty() {
            return Ok(Staged::default());
        }
        static INSERT: LazyLock<String> =
            LazyLock::new(|| format!("{} {}", Prepared::insert(1, None), Prepared::RETURNING));
        let rows = self.prepare(events)?;
        let ids: Vec<(i64, uuid::Uuid, bool)> = rows
            .bind(sqlx::query_as(INSERT.as_str()))
            .fetch_all(&mut *conn)
            .await?;
        Ok(rows.staged(ids))
    }

    /// Encodes events for an outbox insert the caller makes part of a larger
    /// statement (see [`Prepared`]), so that a state change and its events
    /// can commit in one round trip.
    pub fn prepare(&self, events: &[(&Envelope, Option<&str>)]) -> Result<Prepared, sqlx::Error> {
        let now = chrono::Utc::now();
        let mut rows = Vec::with_capacity(events.len());
        for &(e, traceparent) in events {
            rows.push(Row {
                id: 0,
                topic: format!("{}{}", self.topic_prefix, e.event.topic()),
                message_key: e.order_id.to_string(),
                event_type: e.event_type().to_owned(),
                event_id: e.event_id,
                correlation_id: e.correlation_id.to_string(),
                traceparent: traceparent.map(str::to_owned),
                payload: e
                    .to_json()
                    .map_err(|err| sqlx::Error::Encode(Box::new(err)))?,
                created_at: now,
                behind: false,
            });
        }
        Ok(Prepared(rows))
    }

    /// Hands rows to the relay. Call after the transaction that staged them
    /// has committed.
    pub fn committed(&self, staged: Staged) {
        if staged.0.is_empty() {
            return;
        }
        let mut held = self.held();
        let Held {
            queue,
            swept,
            refused,
        } = &mut *held;
        // While the broker is away the queue would only grow; rows beyond
        // the cap stay in the table, where the sweep finds them.
        let room = MAX_HELD.saturating_sub(queue.len());
        let fresh = staged
            .0
            .into_iter()
            .filter(|row| swept.is_empty() || swept.remove(&row.id).is_none())
            .filter(|row| {
                refused.is_empty()
                    || refused
                        .get(&row.message_key)
                        .is_none_or(|at| at.elapsed() >= REMEMBER_SWEPT)
            });
        queue.extend(fresh.take(room));
        drop(held);
        self.handoff.wake.notify_one();
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock cannot leave the state half-written.
        self.handoff
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self) -> Vec<Row> {
        std::mem::take(&mut self.held().queue)
    }

    /// Puts rows back at the head of the queue (a failed publication).
    fn requeue(&self, mut rows: Vec<Row>) {
        let mut held = self.held();
        rows.append(&mut held.queue);
        rows.truncate(MAX_HELD);
        held.queue = rows;
    }

    /// Leaves the orders of `keys` to the sweep: their rows leave the queue
    /// (they stay in the table), and later hand-overs of theirs are not
    /// held either, for a while (after that, the relay learns it again
    /// from the table, see [`Relay::unblocked`]).
    fn leave_to_sweep(&self, keys: &HashSet<String>) {
        if keys.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut held = self.held();
        held.refused
            .retain(|_, at| now.duration_since(*at) < REMEMBER_SWEPT);
        held.queue.retain(|r| !keys.contains(&r.message_key));
        held.refused.extend(keys.iter().map(|k| (k.clone(), now)));
    }

    /// The IDs of the rows held in memory.
    fn held_ids(&self) -> Vec<i64> {
        self.held().queue.iter().map(|r| r.id).collect()
    }

    /// Records that a sweep took `ids`: they leave the queue if they got
    /// there meanwhile, and a later hand-over of them is dropped.
    fn swept(&self, ids: &[i64]) {
        let now = Instant::now();
        let mut held = self.held();
        held.swept
            .retain(|_, at| now.duration_since(*at) < REMEMBER_SWEPT);
        let taken: HashSet<i64> = ids.iter().copied().collect();
        held.queue.retain(|r| !taken.contains(&r.id));
        held.swept.extend(ids.iter().map(|id| (*id, now)));
    }
}

/// Publishes outbox rows to Kafka until cancelled.
pub struct Relay {
    pool: PgPool,
    producer: EventProducer,
    outbox: Outbox,
    service: &'static str,
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    topic: String,
    message_key: String,
    event_type: String,
    event_id: uuid::Uuid,
    correlation_id: String,
    traceparent: Option<String>,
    payload: Vec<u8>,
    created_at: chrono::DateTime<chrono::Utc>,
    /// An earlier row of its key was unpublished when it was written (see
    /// [`Prepared::RETURNING`]); rows read by a sweep leave it false.
    #[sqlx(default)]
    behind: bool,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        producer: EventProducer,
        outbox: Outbox,
        service: &'static str,
    ) -> Self {
        Self {
            pool,
            producer,
            outbox,
            service,
        }
    }

    /// Runs until `shutdown`, then publishes what is left and flushes.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            // The sweep keeps its schedule whatever the load: under a steady
            // stream of hand-overs the queue is never empty, and the rows
            // only the sweep can find (a crashed replica's, those past the
            // in-memory cap) would wait until the load drops.
            if sweep.tick().now_or_never().is_some() {
                self.sweep_and_log().await;
            }
            let rows = self.outbox.take();
            if !rows.is_empty() {
                match self.publish(rows).await {
                    Ok(Progress::Published) => backoff.reset(),
                    Ok(Progress::Blocked) => {
                        // Every row waits behind one someone else sends.
                        tokio::select! {
                            _ = tokio::time::sleep(BLOCKED_RECHECK) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(service = self.service, error = %format!("{e:#}"), "outbox publish failed; will retry");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                }
                continue;
            }
            tokio::select! {
                _ = self.outbox.handoff.wake.notified() => {}
                _ = sweep.tick() => self.sweep_and_log().await,
                _ = shutdown.cancelled() => break,
            }
        }
        // Graceful stop: whatever committed before shutdown still goes out
        // (or stays in the table for the next start).
        let rows = self.outbox.take();
        if !rows.is_empty() {
            if let Err(e) = self.publish(rows).await {
                tracing::warn!(error = %format!("{e:#}"), "final outbox publish failed; rows stay for the next start");
            }
        }
        let producer = self.producer.clone();
        let flushed =
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("producer flush on shutdown did not complete");
        }
    }

    /// Counts the table's old rows, then sweeps if there are any: an idle
    /// service asks one indexed question a second, not five.
    async fn sweep_and_log(&self) {
        match self.measure().await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(service = self.service, error = %e, "could not measure the outbox");
            }
        }
        if let Err(e) = self.sweep().await {
            tracing::warn!(service = self.service, error = %format!("{e:#}"), "outbox sweep failed; will retry");
        }
    }

    /// Sets `saga_outbox_backlog` and `saga_outbox_refused` from the table,
    /// which holds every unpublished row: those in some relay's memory, a
    /// dead replica's, those past the in-memory cap, refused ones. Every
    /// replica reports the same table: aggregate with `max`, not `sum`.
    ///
    /// Only rows older than [`SEE_AFTER`] count: the rows of the last second
    /// are nearly all on their way, and leaving them out lets two partial
    /// indexes find the others without reading the heap's dead rows (the
    /// migration `outbox_old_rows_by_index` says what a full count cost).
    ///
    /// Returns the number of rows counted: none means a sweep has nothing
    /// to see or take (the count leaves out only rows younger than
    /// [`SEE_AFTER`], which a sweep does not look at either).
    async fn measure(&self) -> Result<i64, sqlx::Error> {
        static COUNT: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT count(*), count(*) FILTER (WHERE refused_at IS NOT NULL)
                 FROM (SELECT refused_at FROM outbox
                       WHERE seen_at IS NULL AND created_at < now() - interval '{SEE_AFTER}'
                       UNION ALL
                       SELECT refused_at FROM outbox WHERE seen_at IS NOT NULL) old"
            )
        });
        let (rows, refused): (i64, i64) =
            sqlx::query_as(COUNT.as_str()).fetch_one(&self.pool).await?;
        let m = metrics::global();
        let labels = metrics::Metrics::service(self.service);
        m.outbox_backlog.get_or_create(&labels).set(rows);
        m.outbox_refused.get_or_create(&labels).set(refused);
        Ok(rows)
    }

    /// Publishes rows handed over in memory and deletes those the broker
    /// acknowledged. Rows to retry, and rows behind an earlier unpublished
    /// row of their key, go back to the head of the queue.
    async fn publish(&self, rows: Vec<Row>) -> anyhow::Result<Progress> {
        let (rows, blocked) = match self.unblocked(rows).await {
            Ok(split) => split,
            Err((e, rows)) => {
                self.outbox.requeue(rows);
                return Err(anyhow::Error::new(e).context("looking for earlier outbox rows"));
            }
        };
        if rows.is_empty() {
            self.outbox.requeue(blocked);
            return Ok(Progress::Blocked);
        }
        let mut outcome = self.send(rows).await;
        let deleted = async {
            let mut conn = self.pool.acquire().await?;
            outcome.delete_sent(&mut conn).await
        }
        .await;
        if let Err(e) = deleted {
            // Published but not deleted: a sweep publishes them again later,
            // and consumers drop the duplicates.
            tracing::warn!(service = self.service, error = %e, "could not delete published outbox rows");
        }
        self.record(&outcome);
        let mut again = std::mem::take(&mut outcome.retry);
        if !outcome.refused.is_empty() {
            // Their orders wait in the table, for the sweep; nothing else
            // waits for them.
            let keys: HashSet<String> = outcome.refused.iter().map(|r| r.key.clone()).collect();
            let marked = async {
                let mut conn = self.pool.acquire().await?;
                outcome.mark_refused(&mut conn).await
            };
            if let Err(e) = marked.await {
                tracing::warn!(service = self.service, error = %e, "could not mark refused outbox rows");
            }
            again.retain(|r| !keys.contains(&r.message_key));
            self.outbox.leave_to_sweep(&keys);
        }
        if !blocked.is_empty() {
            // Both lists are in commit order, and no key is in both.
            again.extend(blocked);
            again.sort_by_key(|r| r.id);
        }
        if !again.is_empty() {
            self.outbox.requeue(again);
        }
        // Back off only when the round got nothing out and something may
        // clear by itself: a refused row is not retried from here, and
        // healthy rows must not wait for it.
        match outcome.error {
            Some(e) if outcome.sent.is_empty() && outcome.transient_failures > 0 => Err(e),
            Some(e) => {
                tracing::debug!(service = self.service, error = %format!("{e:#}"), "some outbox rows will be retried");
                Ok(Progress::Published)
            }
            None => Ok(Progress::Published),
        }
    }

    /// Splits rows into those free to go and those behind an earlier row of
    /// their key that is still in the table but not among `rows`. Rows
    /// behind a refused row are left to the sweep (dropped from memory).
    async fn unblocked(
        &self,
        rows: Vec<Row>,
    ) -> Result<(Vec<Row>, Vec<Row>), (sqlx::Error, Vec<Row>)> {
        // Only rows written behind an earlier row of their key can have
        // one left (the common case asks the database nothing).
        let mut keys: Vec<&str> = rows
            .iter()
            .filter(|r| r.behind)
            .map(|r| r.message_key.as_str())
            .collect();
        if keys.is_empty() {
            return Ok((rows, Vec::new()));
        }
        keys.sort_unstable();
        keys.dedup();
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let earliest: Result<Vec<(String, i64, bool)>, sqlx::Error> = sqlx::query_as(
            "SELECT message_key, min(id), bool_or(refused_at IS NOT NULL) FROM outbox
             WHERE message_key = ANY($1) AND id NOT IN (SELECT unnest($2::bigint[]))
             GROUP BY message_key",
        )
        .bind(&keys)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await;
        let earliest = match earliest {
            Ok(earliest) => earliest,
            Err(e) => return Err((e, rows)),
        };
        let refused: HashSet<String> = earliest
            .iter()
            .filter(|(_, _, refused)| *refused)
            .map(|(key, _, _)| key.clone())
            .collect();
        let (go, blocked) = split_blocked(
            rows,
            &earliest.into_iter().map(|(key, id, _)| (key, id)).collect(),
        );
        if refused.is_empty() {
            return Ok((go, blocked));
        }
        self.outbox.leave_to_sweep(&refused);
        let blocked = blocked
            .into_iter()
            .filter(|r| !refused.contains(&r.message_key))
            .collect();
        Ok((go, blocked))
    }

    /// Publishes rows nobody holds in memory (see the module docs): claims
    /// them in one short statement, sends them holding no lock, deletes
    /// those the broker took and releases the others for the next sweep.
    async fn sweep(&self) -> anyhow::Result<()> {
        static CLAIM: LazyLock<String> = LazyLock::new(|| {
            // A row the sweep may take: unclaimed, seen committed long
            // enough ago, not in memory.
            let free = |t: &str| {
                format!(
                    "({t}.claimed_until IS NULL OR {t}.claimed_until < now())
                     AND {t}.seen_at < now() - interval '{ORPHAN_AFTER}'
                     AND {t}.id NOT IN (SELECT unnest($2::bigint[]))"
                )
            };
            // `SKIP LOCKED` passes over a row someone holds a lock on (a
            // relay marking it refused or deleting it, an operator's open
            // transaction) though the snapshot calls it free; a row of its
            // key behind it must not go without it, so a row is claimed only
            // if every earlier row of its key still in the table was locked
            // here too.
            format!(
                "WITH c AS (
                     SELECT id, message_key FROM outbox c
                     WHERE {} AND NOT EXISTS (
                         SELECT 1 FROM outbox e
                         WHERE e.message_key = c.message_key AND e.id < c.id AND NOT ({}))
                     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                 UPDATE outbox o SET claimed_until = now() + interval '{CLAIM_FOR}'
                 FROM c
                 WHERE o.id = c.id AND NOT EXISTS (
                     SELECT 1 FROM outbox e
                     WHERE e.message_key = c.message_key AND e.id < c.id
                           AND e.id NOT IN (SELECT id FROM c))
                 RETURNING o.id, o.topic, o.message_key, o.event_type, o.event_id, o.correlation_id,
                           o.traceparent, o.payload, o.created_at",
                free("c"),
                free("e")
            )
        });
        // Rows this sweep sees committed for the first time: their age
        // starts now (the claim, in the same transaction, cannot take them).
        static SEE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE outbox o SET seen_at = now()
                 FROM (SELECT id FROM outbox
                       WHERE seen_at IS NULL AND created_at < now() - interval '{SEE_AFTER}'
                             AND id NOT IN (SELECT unnest($1::bigint[]))
                       FOR UPDATE SKIP LOCKED) s
                 WHERE o.id = s.id"
            )
        });
        let held = self.outbox.held_ids();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SWEEP_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query(SEE.as_str())
            .bind(&held)
            .execute(&mut *tx)
            .await?;
        let mut rows: Vec<Row> = sqlx::query_as(CLAIM.as_str())
            .bind(BATCH_SIZE)
            .bind(&held)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        if rows.is_empty() {
            return Ok(());
        }
        // Commit order, as far as the table knows it.
        rows.sort_unstable_by_key(|r| r.id);
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        self.outbox.swept(&ids);
        tracing::info!(
            service = self.service,
            rows = rows.len(),
            "publishing outbox rows no relay announced"
        );
        let outcome = self.send(rows).await;
        let mut conn = self.pool.acquire().await?;
        outcome.delete_sent(&mut conn).await?;
        outcome.release_retries(&mut conn).await?;
        outcome.mark_refused(&mut conn).await?;
        self.record(&outcome);
        outcome.error.map_or(Ok(()), Err)
    }

    /// Sends rows in waves of at most one row per key (see the module
    /// docs); a key whose row failed sends nothing more in this batch.
    /// Within a wave every row is sent, then the deliveries are awaited
    /// together (awaiting one by one would serialise them behind
    /// `linger.ms`).
    async fn send(&self, rows: Vec<Row>) -> Outcome {
        let mut outcome = Outcome::default();
        let mut failed_keys: HashSet<String> = HashSet::new();
        let mut retry: Vec<Row> = Vec::new();
        for wave in waves(rows) {
            let (go, held_back): (Vec<Row>, Vec<Row>) = wave
                .into_iter()
                .partition(|r| !failed_keys.contains(&r.message_key));
            retry.extend(held_back);
            for row in self.send_wave(go, &mut outcome).await {
                failed_keys.insert(row.message_key.clone());
                retry.push(row);
            }
        }
        // Commit order, as they came.
        retry.sort_by_key(|r| r.id);
        outcome.retry = retry;
        outcome
    }

    /// Sends one wave (no two rows of one key) and returns the rows that
    /// did not get through.
    async fn send_wave(&self, rows: Vec<Row>, outcome: &mut Outcome) -> Vec<Row> {
        let mut failed = Vec::new();
        let mut pending = Vec::with_capacity(rows.len());
        let mut rows = rows.into_iter();
        for row in rows.by_ref() {
            let span = self.publish_span(&row);
            let event_id = row.event_id.to_string();
            let traceparent = telemetry::traceparent_of(&span).or_else(|| row.traceparent.clone());
            let hdrs = kafka::with_headers(
                OwnedHeaders::new_with_capacity(5),
                [
                    (headers::EVENT_TYPE, row.event_type.as_str()),
                    (headers::EVENT_ID, event_id.as_str()),
                    (headers::CORRELATION_ID, row.correlation_id.as_str()),
                    (headers::CONTENT_TYPE, "application/json"),
                ]
                .into_iter()
                .chain(traceparent.as_deref().map(|tp| (headers::TRACEPARENT, tp))),
            );
            let record = FutureRecord::to(&row.topic)
                .key(row.message_key.as_str())
                .payload(row.payload.as_slice())
                .headers(hdrs);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push((row, span, delivery)),
                Err((e, _)) => {
                    telemetry::mark_error(&span, &e.to_string());
                    let permanent = kafka::is_permanent(&e);
                    if permanent {
                        // This row alone (too large, say): the rest of the
                        // wave goes on.
                        self.refused(&row, &e, outcome);
                        failed.push(row);
                        continue;
                    }
                    // The producer's queue is full, or similar: publish what
                    // is enqueued, retry the rest.
                    outcome.failed(false);
                    outcome.error = Some(anyhow::Error::new(e).context("enqueueing outbox row"));
                    failed.push(row);
                    break;
                }
            }
        }
        failed.extend(rows);
        let (sent, deliveries): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .map(|(row, span, d)| ((row, span), d))
            .unzip();
        let results = join_all(deliveries).await;
        for ((row, span), result) in sent.into_iter().zip(results) {
            match result {
                Ok(Ok(delivery)) => {
                    span.record("messaging.kafka.destination.partition", delivery.partition);
                    span.record("messaging.kafka.message.offset", delivery.offset);
                    outcome.sent.push((row.id, row.created_at));
                }
                Ok(Err((e, _))) => {
                    telemetry::mark_error(&span, &e.to_string());
                    if kafka::is_permanent(&e) {
                        // Wrong ACLs, a missing topic: nothing a retry
                        // cures by itself, but an operator can.
                        self.refused(&row, &e, outcome);
                    } else {
                        outcome.failed(false);
                        outcome.error.get_or_insert_with(|| {
                            anyhow::Error::new(e).context("publishing outbox row")
                        });
                    }
                    failed.push(row);
                }
                Err(_canceled) => {
                    telemetry::mark_error(&span, "delivery canceled");
                    outcome.failed(false);
                    outcome
                        .error
                        .get_or_insert_with(|| anyhow::anyhow!("producer dropped a delivery"));
                    failed.push(row);
                }
            }
        }
        failed
    }

    /// Notes a row the broker refuses for good: logged with its order,
    /// counted, and kept (see the module docs).
    fn refused(&self, row: &Row, e: &rdkafka::error::KafkaError, outcome: &mut Outcome) {
        tracing::error!(
            service = self.service,
            outbox_id = row.id,
            order_id = %row.message_key,
            event_type = %row.event_type,
            topic = %row.topic,
            error = %e,
            "the broker refuses this outbox row; its order's events wait in the outbox (retried once a second) until the cause is fixed, the other orders' go on"
        );
        outcome.failed(true);
        outcome.refused.push(Refused {
            id: row.id,
            key: row.message_key.clone(),
            error: e.to_string(),
        });
        outcome.error.get_or_insert_with(|| {
            anyhow::anyhow!("the broker refused outbox row {}: {e}", row.id)
        });
    }

    /// A producer span per message, child of the span that wrote the row;
    /// the consumer's span becomes its child through the header.
    fn publish_span(&self, row: &Row) -> tracing::Span {
        let span = tracing::info_span!(
            parent: None,
            "publish",
            otel.name = format!("{} publish", row.topic),
            otel.kind = "producer",
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            service = self.service,
            messaging.system = "kafka",
            messaging.operation = "publish",
            messaging.destination.name = %row.topic,
            messaging.kafka.message.key = %row.message_key,
            messaging.message.id = %row.event_id,
            messaging.kafka.destination.partition = tracing::field::Empty,
            messaging.kafka.message.offset = tracing::field::Empty,
            event_type = %row.event_type,
            order_id = %row.message_key,
            correlation_id = %row.correlation_id,
        );
        telemetry::set_remote_parent(&span, row.traceparent.as_deref());
        span
    }

    fn record(&self, outcome: &Outcome) {
        let m = metrics::global();
        for (kind, n) in [
            ("permanent", outcome.permanent_failures),
            ("transient", outcome.transient_failures),
        ] {
            if n > 0 {
                m.outbox_publish_failures
                    .get_or_create(&metrics::FailureLabels {
                        service: self.service.to_owned(),
                        kind: kind.to_owned(),
                    })
                    .inc_by(n);
            }
        }
        let labels = metrics::Metrics::service(self.service);
        m.outbox_published
            .get_or_create(&labels)
            .inc_by(outcome.sent.len() as u64);
        let now = chrono::Utc::now();
        let latency = m.outbox_publish_seconds.get_or_create(&labels);
        for (_, at) in &outcome.sent {
            latency.observe((now - *at).num_microseconds().unwrap_or(0) as f64 / 1e6);
        }
    }
}

/// What a round of the in-memory relay achieved.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Rows went out (or failed and will be retried).
    Published,
    /// Every row waits behind an earlier row of its key held elsewhere.
    Blocked,
}

/// Splits `rows` into waves: wave `n` holds the `n`-th row of each key,
/// and keeps the rows' order.
fn waves(rows: Vec<Row>) -> Vec<Vec<Row>> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut waves: Vec<Vec<Row>> = Vec::new();
    for row in rows {
        let n = seen.entry(row.message_key.clone()).or_insert(0);
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(row);
        *n += 1;
    }
    waves
}

/// Splits `rows` into those free to go and those (in the same order) that
/// come after `earliest[key]`, the first row of their key still in the
/// table outside this batch.
fn split_blocked(rows: Vec<Row>, earliest: &HashMap<String, i64>) -> (Vec<Row>, Vec<Row>) {
    if earliest.is_empty() {
        return (rows, Vec::new());
    }
    rows.into_iter().partition(|r| {
        earliest
            .get(&r.message_key)
            .is_none_or(|first| r.id < *first)
    })
}

/// A row the broker refused for good.
struct Refused {
    id: i64,
    key: String,
    error: String,
}

/// What became of a batch of rows.
#[derive(Default)]
struct Outcome {
    /// Acknowledged by the broker: `(id, written at)`.
    sent: Vec<(i64, chrono::DateTime<chrono::Utc>)>,
    /// To try again, in their original order.
    retry: Vec<Row>,
    /// Refused by the broker for good (also in `retry`).
    refused: Vec<Refused>,
    /// Failures the broker will repeat until someone fixes it, and others.
    permanent_failures: u64,
    transient_failures: u64,
    error: Option<anyhow::Error>,
}

impl Outcome {
    fn failed(&mut self, permanent: bool) {
        if permanent {
            self.permanent_failures += 1;
        } else {
            self.transient_failures += 1;
        }
    }

    /// Deletes the published rows. The delete need not wait for the disk
    /// (`synchronous_commit` off for its own transaction, set in the same
    /// statement): if it is lost, the rows are published again and
    /// consumers drop the duplicates.
    async fn delete_sent(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if !self.sent.is_empty() {
            let ids: Vec<i64> = self.sent.iter().map(|(id, _)| *id).collect();
            sqlx::query(
                "WITH gone AS (DELETE FROM outbox WHERE id = ANY($1))
                 SELECT set_config('synchronous_commit', 'off', true)",
            )
            .bind(&ids)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Ends a sweep's claim on the rows to retry, with the error, so the
    /// next sweep (of any replica) takes them again.
    async fn release_retries(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.retry.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = self.retry.iter().map(|r| r.id).collect();
        let why = self.error.as_ref().map(|e| format!("{e:#}"));
        sqlx::query(
            "UPDATE outbox SET claimed_until = NULL, last_error = COALESCE($2, last_error)
             WHERE id = ANY($1)",
        )
        .bind(&ids)
        .bind(why)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Records on each row the broker refused that it did, and why.
    async fn mark_refused(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.refused.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = self.refused.iter().map(|r| r.id).collect();
        let why: Vec<&str> = self.refused.iter().map(|r| r.error.as_str()).collect();
        sqlx::query(
            "UPDATE outbox o SET refused_at = coalesce(o.refused_at, now()), last_error = r.why
             FROM unnest($1::bigint[], $2::text[]) AS r(id, why) WHERE o.id = r.id",
        )
        .bind(&ids)
        .bind(&why)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, key: &str) -> Row {
        Row {
            id,
            topic: "t".into(),
            message_key: key.into(),
            event_type: "E".into(),
            event_id: uuid::Uuid::now_v7(),
            correlation_id: "c".into(),
            traceparent: None,
            payload: Vec::new(),
            created_at: chrono::Utc::now(),
            behind: false,
        }
    }

    fn ids(rows: &[Row]) -> Vec<i64> {
        rows.iter().map(|r| r.id).collect()
    }

    #[test]
    fn waves_hold_one_row_per_key_in_order() {
        let rows = vec![
            row(1, "a"),
            row(2, "b"),
            row(3, "a"),
            row(4, "a"),
            row(5, "c"),
        ];
        let w = waves(rows);
        let w: Vec<Vec<i64>> = w.iter().map(|w| ids(w)).collect();
        assert_eq!(w, vec![vec![1, 2, 5], vec![3], vec![4]]);
        assert!(waves(Vec::new()).is_empty());
    }

    #[test]
    fn rows_behind_an_earlier_row_elsewhere_wait() {
        let rows = vec![row(3, "a"), row(4, "b"), row(9, "a"), row(10, "c")];
        let earliest = HashMap::from([("a".to_owned(), 5), ("c".to_owned(), 7)]);
        let (go, wait) = split_blocked(rows, &earliest);
        // a@3 precedes the outside row a@5; a@9 and c@10 follow theirs.
        assert_eq!((ids(&go), ids(&wait)), (vec![3, 4], vec![9, 10]));
        let (go, wait) = split_blocked(vec![row(1, "a")], &HashMap::new());
        assert_eq!((ids(&go), ids(&wait)), (vec![1], vec![]));
    }
}
