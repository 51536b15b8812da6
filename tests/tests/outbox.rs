//! The outbox relay: rows handed over in quick succession are published once
//! each, in order per order, and deleted; and its safety net: rows committed
//! but never handed to a relay in memory (the writer died right after its
//! commit) are found by the periodic sweep, published once, and deleted,
//! whatever the load, without holding locks across the send, and never
//! twice by one process; rows the broker refuses are kept and retried.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;

use events::{
    CorrelationId, Envelope, Event, FailureReason, Money, OrderConfirmed, OrderFailed, OrderId,
};
use saga_runtime::outbox::Relay;
use saga_runtime::Outbox;
use saga_tests::{poll, System, TopicMessage, Which};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn rows_no_relay_was_handed_are_swept_published_and_deleted() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let outbox = Outbox::new(sys.kafka());
    let event = confirmed(OrderId::new());
    let db = sys.db(Which::Order);
    let mut tx = db.begin().await?;
    let staged = outbox.enqueue_traced(&mut tx, &[(&event, None)]).await?;
    tx.commit().await?;
    // As if the writer died between its commit and the hand-over.
    drop(staged);

    let ours = HashSet::from([event.event_id.to_string()]);
    let published = wait_published(&sys, &ours).await?;
    assert_eq!(published.len(), 1);
    wait_deleted(db, &ours).await?;
    // Published once: the sweep took it under a row lock and deleted it.
    assert_eq!(published_now(&sys, &ours).await?.len(), 1);
    sys.shutdown().await
}

/// Rows handed over faster than the relay's round trips: however they are
/// cut into batches, every row is published once, each order's events keep
/// the order they were written in, and every published row is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_handed_over_in_quick_succession_are_published_once_in_order_per_order(
) -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    // Our own relay on the order-service's database, with nobody else's
    // relay or sweep beside it.
    sys.stop(Which::Order).await?;
    let db = sys.db(Which::Order).clone();
    let outbox = Outbox::new(sys.kafka());
    let producer = saga_runtime::kafka::producer(sys.kafka(), "relay-test")?;
    let relay = Relay::new(db.clone(), producer, outbox.clone(), "relay-test");
    let stop = CancellationToken::new();
    let relay = tokio::spawn(relay.run(stop.clone()));

    let orders: Vec<OrderId> = (0..4).map(|_| OrderId::new()).collect();
    let mut written: Vec<Envelope> = Vec::new();
    // 60 commits of 5 events each, handed over as fast as they commit.
    for commit in 0..60 {
        let events: Vec<Envelope> = (0..5)
            .map(|i| confirmed(orders[(commit + i) % orders.len()]))
            .collect();
        let traced: Vec<(&Envelope, Option<&str>)> = events.iter().map(|e| (e, None)).collect();
        let mut tx = db.begin().await?;
        let staged = outbox.enqueue_traced(&mut tx, &traced).await?;
        tx.commit().await?;
        outbox.committed(staged);
        written.extend(events);
    }

    let ours: HashSet<String> = written.iter().map(|e| e.event_id.to_string()).collect();
    let published = wait_published(&sys, &ours).await?;
    assert_eq!(published.len(), written.len(), "every row exactly once");
    assert_each_orders_events_in_order(&orders, &written, &published);
    wait_deleted(&db, &ours).await?;
    // Deleted because published, not because a sweep published them again.
    assert_eq!(
        published_now(&sys, &ours).await?.len(),
        written.len(),
        "no row published twice"
    );
    stop.cancel();
    relay.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// A relay of the test's own on the order-service's database (the service
/// is stopped, so nobody else's relay or sweep runs beside it).
async fn own_relay(
    sys: &mut System,
    producer: saga_runtime::kafka::EventProducer,
) -> anyhow::Result<(
    PgPool,
    Outbox,
    CancellationToken,
    tokio::task::JoinHandle<()>,
)> {
    sys.stop(Which::Order).await?;
    let db = sys.db(Which::Order).clone();
    let outbox = Outbox::new(sys.kafka());
    let relay = Relay::new(db.clone(), producer, outbox.clone(), "relay-test");
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    Ok((db, outbox, stop, task))
}

/// Commits `event` to the outbox as if a sweep had seen it committed long
/// ago (`created_at` and `seen_at` a minute back, so a sweep may take it at
/// once), without handing it over; returns what the writer would hand
/// over.
async fn commit_old(
    db: &PgPool,
    outbox: &Outbox,
    event: &Envelope,
) -> anyhow::Result<saga_runtime::outbox::Staged> {
    commit_old_with(db, outbox, event, None).await
}

/// [`commit_old`], with the row's value replaced by `payload` in the same
/// transaction.
async fn commit_old_with(
    db: &PgPool,
    outbox: &Outbox,
    event: &Envelope,
    payload: Option<Vec<u8>>,
) -> anyhow::Result<saga_runtime::outbox::Staged> {
    let mut tx = db.begin().await?;
    let staged = outbox.enqueue_traced(&mut tx, &[(event, None)]).await?;
    sqlx::query(
        "UPDATE outbox SET created_at = now() - interval '1 minute', seen_at = now() - interval '1 minute',
                           payload = COALESCE($2, payload)
         WHERE event_id = $1",
    )
    .bind(event.event_id)
    .bind(payload)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(staged)
}

/// Commits `event` to the outbox without handing it over, with `set` (an
/// `UPDATE outbox SET` list) applied to its row in the same transaction:
/// a row as another replica or an earlier moment left it.
async fn commit_as(
    db: &PgPool,
    outbox: &Outbox,
    event: &Envelope,
    set: &str,
) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    drop(outbox.enqueue_traced(&mut tx, &[(event, None)]).await?);
    sqlx::query(&format!("UPDATE outbox SET {set} WHERE event_id = $1"))
        .bind(event.event_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The `SET` of [`commit_as`] for a row another replica's sweep has
/// claimed for an hour.
const CLAIMED_ELSEWHERE: &str = "created_at = now() - interval '1 minute', \
     seen_at = now() - interval '1 minute', claimed_until = now() + interval '1 hour'";

/// A row the producer refuses for good (here: larger than its
/// `message.max.bytes`; wrong ACLs or a missing topic are handled alike) is
/// neither set aside nor dropped: it stays in the outbox, failures are
/// counted and recorded on the row, and once the cause is fixed it is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_the_broker_refuses_stays_until_fixed_then_is_published() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    let producer = saga_runtime::kafka::producer(sys.kafka(), "relay-test")?;
    let (db, outbox, stop, relay) = own_relay(&mut sys, producer).await?;
    let event = confirmed(OrderId::new());
    drop(commit_old_with(&db, &outbox, &event, Some(vec![b' '; 1_100_000])).await?);
    // Refused, and retried: the failure is counted and recorded on the row.
    poll(
        Duration::from_millis(100),
        || async {
            let err: Option<Option<String>> =
                sqlx::query_scalar("SELECT last_error FROM outbox WHERE event_id = $1")
                    .bind(event.event_id)
                    .fetch_optional(&db)
                    .await?;
            Ok(match err {
                Some(Some(e)) => Ok(e),
                other => Err(other),
            })
        },
        |row| anyhow::anyhow!("the refused row was not retried with its error recorded: {row:?}"),
    )
    .await?;
    let metrics = saga_runtime::metrics::global().render();
    assert!(
        metrics.contains(
            "saga_outbox_publish_failures_total{service=\"relay-test\",kind=\"permanent\"}"
        ),
        "failures not counted:\n{metrics}"
    );
    // The cause is fixed; the row goes out on a later sweep.
    sqlx::query("UPDATE outbox SET payload = $2 WHERE event_id = $1")
        .bind(event.event_id)
        .bind(event.to_json()?)
        .execute(&db)
        .await?;
    let ours = HashSet::from([event.event_id.to_string()]);
    assert_eq!(wait_published(&sys, &ours).await?.len(), 1);
    wait_deleted(&db, &ours).await?;
    stop.cancel();
    relay.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// A relay named `name` (its metrics' `service` label) on `db`.
fn relay_on(
    sys: &System,
    db: &PgPool,
    name: &'static str,
    stop: &CancellationToken,
) -> anyhow::Result<(Outbox, tokio::task::JoinHandle<()>)> {
    let outbox = Outbox::new(sys.kafka());
    let producer = saga_runtime::kafka::producer(sys.kafka(), name)?;
    let relay = Relay::new(db.clone(), producer, outbox.clone(), name);
    Ok((outbox, tokio::spawn(relay.run(stop.clone()))))
}

/// The value of `metric{service="<service>"}` in this process's metrics.
fn gauge(metric: &str, service: &str) -> Option<f64> {
    let needle = format!("{metric}{{service=\"{service}\"}} ");
    saga_runtime::metrics::global()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str())?.trim().parse().ok())
}

/// One row the broker refuses (too large), the oldest in the table, handed
/// to one of two replicas' relays and seen by both sweeps, beside 1,000
/// healthy rows of 99 other orders written through both replicas and
/// behind their backs: every healthy row is published, in order per order;
/// only the refused row's order waits, and the refusal shows in the row
/// and the metrics. Fixed, the waiting order goes out in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_row_holds_back_only_its_own_order() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    sys.stop(Which::Order).await?;
    let db = sys.db(Which::Order).clone();
    let stop = CancellationToken::new();
    let (a, relay_a) = relay_on(&sys, &db, "relay-refusal-a", &stop)?;
    let (b, relay_b) = relay_on(&sys, &db, "relay-refusal-b", &stop)?;

    // The refused row, then two more events of its order, all at replica A.
    let stuck = OrderId::new();
    let refused = Envelope::new(
        stuck,
        CorrelationId::generate(),
        Event::OrderFailed(OrderFailed {
            reason: FailureReason::OutOfStock,
            // Over the producer's `message.max.bytes`.
            detail: "x".repeat(1_100_000),
            order_created_at: chrono::Utc::now(),
        }),
    );
    a.committed(commit_old(&db, &a, &refused).await?);
    let behind: Vec<Envelope> = (0..2).map(|_| confirmed(stuck)).collect();
    for e in &behind {
        let mut tx = db.begin().await?;
        let staged = a.enqueue_traced(&mut tx, &[(e, None)]).await?;
        tx.commit().await?;
        a.committed(staged);
    }

    // 100 commits of 10 events, each of another order: a third of the
    // orders written through A, a third through B, a third by writers that
    // died after their commits (only a sweep finds those). Each order stays
    // with one writer: a hand-over shared between replicas may be published
    // twice by design (see the outbox's docs), which is not the point here.
    let orders: Vec<OrderId> = (0..99).map(|_| OrderId::new()).collect();
    let groups: Vec<&[OrderId]> = orders.chunks(33).collect();
    let mut written: Vec<Envelope> = Vec::new();
    for commit in 0..100 {
        let group = groups[commit % 3];
        let events: Vec<Envelope> = (0..10)
            .map(|i| confirmed(group[(commit * 10 + i) % group.len()]))
            .collect();
        let traced: Vec<(&Envelope, Option<&str>)> = events.iter().map(|e| (e, None)).collect();
        let mut tx = db.begin().await?;
        let staged = a.enqueue_traced(&mut tx, &traced).await?;
        tx.commit().await?;
        match commit % 3 {
            0 => a.committed(staged),
            1 => b.committed(staged),
            _ => drop(staged),
        }
        written.extend(events);
    }

    let ours: HashSet<String> = written.iter().map(|e| e.event_id.to_string()).collect();
    let published = wait_published(&sys, &ours).await?;
    assert_eq!(published.len(), written.len(), "every healthy row once");
    assert_each_orders_events_in_order(&orders, &written, &published);

    // Reported: on the row, and in both replicas' metrics, which count
    // the table (the refused order's three rows).
    let (refused_at, error): (Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
        sqlx::query_as("SELECT refused_at, last_error FROM outbox WHERE event_id = $1")
            .bind(refused.event_id)
            .fetch_one(&db)
            .await?;
    assert!(refused_at.is_some(), "the refused row is not marked");
    assert!(
        error.as_deref().is_some_and(|e| e.contains("too large")),
        "{error:?}"
    );
    poll(
        Duration::from_millis(100),
        || async {
            let now: Vec<_> = ["relay-refusal-a", "relay-refusal-b"]
                .iter()
                .map(|r| {
                    (
                        gauge("saga_outbox_refused", r),
                        gauge("saga_outbox_backlog", r),
                    )
                })
                .collect();
            Ok(if now.iter().all(|m| *m == (Some(1.0), Some(3.0))) {
                Ok(())
            } else {
                Err(now)
            })
        },
        |now| anyhow::anyhow!("(refused, backlog) of the two replicas: {now:?}"),
    )
    .await?;
    let waiting: HashSet<String> = std::iter::once(&refused)
        .chain(&behind)
        .map(|e| e.event_id.to_string())
        .collect();
    assert!(
        published_now(&sys, &waiting).await?.is_empty(),
        "the refused order's events went out"
    );

    // Fixed (an operator shortens it): its order goes out, in order.
    let mut fixed = refused.clone();
    if let Event::OrderFailed(failed) = &mut fixed.event {
        failed.detail = "SKU-1 is out of stock".into();
    }
    sqlx::query("UPDATE outbox SET payload = $2 WHERE event_id = $1")
        .bind(refused.event_id)
        .bind(fixed.to_json()?)
        .execute(&db)
        .await?;
    let mut out = wait_published(&sys, &waiting).await?;
    out.sort_by_key(|m| m.offset);
    let got: Vec<&str> = out.iter().filter_map(|m| m.header("event_id")).collect();
    let want: Vec<String> = std::iter::once(&refused)
        .chain(&behind)
        .map(|e| e.event_id.to_string())
        .collect();
    assert_eq!(got, want);
    stop.cancel();
    relay_a.await?;
    relay_b.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// A sweep passes over a row another transaction holds a lock on (a relay
/// marking it refused, an operator's open transaction) though it is free:
/// the later rows of its order must wait for it, not go out ahead of it;
/// other orders' rows go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_locked_elsewhere_holds_back_the_later_rows_of_its_order() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    let producer = saga_runtime::kafka::producer(sys.kafka(), "relay-test")?;
    let (db, outbox, stop, relay) = own_relay(&mut sys, producer).await?;
    // Sweeps wait while the rows are written and the first one is locked
    // (on connections of their own: the harness's pool has two, which the
    // relay uses).
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&sys.service_config(Which::Order)?.database_url)
        .await?;
    let mut pause = own.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(saga_runtime::outbox::SWEEP_LOCK)
        .execute(&mut *pause)
        .await?;
    let order = OrderId::new();
    let (first, second) = (confirmed(order), confirmed(order));
    let other = confirmed(OrderId::new());
    for e in [&first, &second, &other] {
        drop(commit_old(&db, &outbox, e).await?);
    }
    let mut holder = own.begin().await?;
    sqlx::query("SELECT 1 FROM outbox WHERE event_id = $1 FOR UPDATE")
        .bind(first.event_id)
        .execute(&mut *holder)
        .await?;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(saga_runtime::outbox::SWEEP_LOCK)
        .execute(&mut *pause)
        .await?;
    drop(pause);

    // The other order's row, later than both, goes out: a sweep has looked
    // at all three.
    wait_published(&sys, &HashSet::from([other.event_id.to_string()])).await?;
    let order_ids: HashSet<String> = [&first, &second]
        .iter()
        .map(|e| e.event_id.to_string())
        .collect();
    assert!(
        published_now(&sys, &order_ids).await?.is_empty(),
        "the order's second event went out ahead of its first"
    );

    holder.rollback().await?;
    let mut out = wait_published(&sys, &order_ids).await?;
    out.sort_by_key(|m| m.offset);
    let got: Vec<&str> = out.iter().filter_map(|m| m.header("event_id")).collect();
    assert_eq!(
        got,
        [first.event_id.to_string(), second.event_id.to_string()]
    );
    stop.cancel();
    relay.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// A row's age for the sweep starts when it is committed, not when its
/// transaction began: a transaction that began a minute ago (it waited on
/// a lock, say) commits a row that its writer is about to publish, and no
/// sweep takes it until it has been committed for the sweep's threshold.
/// Meanwhile it counts in `saga_outbox_backlog`, though no relay holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_is_swept_only_once_committed_for_a_while_and_counts_in_the_backlog(
) -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    sys.stop(Which::Order).await?;
    let db = sys.db(Which::Order).clone();
    let stop = CancellationToken::new();
    let (outbox, relay) = relay_on(&sys, &db, "relay-commit-age", &stop)?;
    let event = confirmed(OrderId::new());
    let mut tx = db.begin().await?;
    drop(outbox.enqueue_traced(&mut tx, &[(&event, None)]).await?);
    sqlx::query("UPDATE outbox SET created_at = now() - interval '1 minute' WHERE event_id = $1")
        .bind(event.event_id)
        .execute(&mut *tx)
        .await?;
    let committing = chrono::Utc::now();
    tx.commit().await?;
    poll(
        Duration::from_millis(50),
        || async {
            let n = gauge("saga_outbox_backlog", "relay-commit-age");
            Ok(if n == Some(1.0) { Ok(()) } else { Err(n) })
        },
        |n| anyhow::anyhow!("saga_outbox_backlog is {n:?}, not the one row in the table"),
    )
    .await?;
    let out = wait_published(&sys, &HashSet::from([event.event_id.to_string()])).await?;
    let sent = out[0]
        .timestamp_ms
        .context("a message without a timestamp")?;
    let after = sent - committing.timestamp_millis();
    assert!(
        after >= 5_000,
        "swept {after} ms after its commit, before the 5 s threshold"
    );
    stop.cancel();
    relay.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// Rows only a sweep can find are published while the relay is never idle:
/// it holds a row that waits behind an earlier row of its order, which
/// another replica's sweep has claimed, and looks again every few
/// milliseconds without ever waiting for work. The sweep keeps its
/// schedule whatever the relay is doing (publishing under a steady stream
/// of hand-overs is the same loop; a stream fast enough to keep it busy on
/// every machine would bury the database under a backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_keeps_its_schedule_while_the_relay_is_never_idle() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    let producer = saga_runtime::kafka::producer(sys.kafka(), "relay-test")?;
    let (db, outbox, stop, relay) = own_relay(&mut sys, producer).await?;
    let order = OrderId::new();
    let (claimed, waiting) = (confirmed(order), confirmed(order));
    // Claimed for an hour by a sweep elsewhere, in the commit that writes it.
    commit_as(&db, &outbox, &claimed, CLAIMED_ELSEWHERE).await?;
    let mut tx = db.begin().await?;
    let staged = outbox.enqueue_traced(&mut tx, &[(&waiting, None)]).await?;
    tx.commit().await?;
    outbox.committed(staged);

    // A row nobody handed over (its writer died after the commit), which a
    // sweep may take two seconds from now (seen three seconds ago; the
    // threshold is five): by then the relay has long been going round
    // (and a sweep already under way cannot take it).
    let orphan = confirmed(OrderId::new());
    commit_as(
        &db,
        &outbox,
        &orphan,
        "created_at = now() - interval '1 minute', seen_at = now() - interval '3 seconds'",
    )
    .await?;
    let ours = HashSet::from([orphan.event_id.to_string()]);
    wait_deleted(&db, &ours).await?;
    wait_published(&sys, &ours).await?;
    let held: HashSet<String> = [&claimed, &waiting]
        .iter()
        .map(|e| e.event_id.to_string())
        .collect();
    assert!(
        published_now(&sys, &held).await?.is_empty(),
        "the order's rows went out though its first is claimed elsewhere"
    );
    stop.cancel();
    relay.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// A writer whose hand-over lags past the sweep's threshold (a stalled
/// process): if the sweep publishes the row before its writer hands it
/// over, the hand-over must not publish it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_the_sweep_took_is_not_published_again_when_handed_over_late() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    let producer = saga_runtime::kafka::producer(sys.kafka(), "relay-test")?;
    let (db, outbox, stop, relay) = own_relay(&mut sys, producer).await?;
    let late = confirmed(OrderId::new());
    let staged = commit_old(&db, &outbox, &late).await?;
    let late_id = HashSet::from([late.event_id.to_string()]);
    wait_published(&sys, &late_id).await?;
    wait_deleted(&db, &late_id).await?;
    // The writer hands it over only now; then a marker row, handed over
    // after it: once the marker is out, the late row had its chance.
    outbox.committed(staged);
    let marker = confirmed(OrderId::new());
    let mut tx = db.begin().await?;
    let marker_staged = outbox.enqueue_traced(&mut tx, &[(&marker, None)]).await?;
    tx.commit().await?;
    outbox.committed(marker_staged);
    wait_published(&sys, &HashSet::from([marker.event_id.to_string()])).await?;
    assert_eq!(
        published_now(&sys, &late_id).await?.len(),
        1,
        "the late hand-over published the swept row again"
    );
    stop.cancel();
    relay.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// A sweep sends without holding row locks: while its send hangs (a broker
/// that accepts connections and never answers), the rows can be locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_holds_no_row_lock_while_its_send_hangs() -> anyhow::Result<()> {
    // A broker that stalls: it accepts connections and answers nothing.
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let stalled_addr = stalled.local_addr()?;
    let accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = stalled.accept().await {
            held.push(conn);
        }
    });
    let mut sys = System::start().await?;
    let mut cfg = sys.kafka().clone();
    cfg.brokers = stalled_addr.to_string();
    let producer = saga_runtime::kafka::producer(&cfg, "relay-test")?;
    let (db, outbox, stop, relay) = own_relay(&mut sys, producer).await?;
    let event = confirmed(OrderId::new());
    drop(commit_old(&db, &outbox, &event).await?);
    // The sweep claims the row and starts its send, which cannot finish.
    poll(
        Duration::from_millis(50),
        || async {
            let claimed: Option<bool> = sqlx::query_scalar(
                "SELECT claimed_until IS NOT NULL FROM outbox WHERE event_id = $1",
            )
            .bind(event.event_id)
            .fetch_optional(&db)
            .await?;
            Ok(if claimed == Some(true) {
                Ok(())
            } else {
                Err(claimed)
            })
        },
        |c| anyhow::anyhow!("the sweep never claimed the row: {c:?}"),
    )
    .await?;
    let mut tx = db.begin().await?;
    let locked = sqlx::query("SELECT 1 FROM outbox WHERE event_id = $1 FOR UPDATE NOWAIT")
        .bind(event.event_id)
        .execute(&mut *tx)
        .await;
    tx.rollback().await?;
    assert!(
        locked.is_ok(),
        "the row is locked while the sweep sends it: {locked:?}"
    );
    stop.cancel();
    relay.abort();
    let _ = relay.await;
    accepting.abort();
    // The row stays for a sweep that can reach a broker.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_id = $1")
        .bind(event.event_id)
        .fetch_one(&db)
        .await?;
    assert_eq!(left, 1);
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// A sweep takes a row only together with every earlier row of its order:
/// while an earlier row is claimed by another replica's sweep (sending it
/// now), the later one waits, even though it is old enough to be swept.
/// Once the claim runs out (that sweeper died), both go out, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_publishes_a_row_only_after_every_earlier_row_of_its_order() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    let producer = saga_runtime::kafka::producer(sys.kafka(), "relay-test")?;
    let (db, outbox, stop, relay) = own_relay(&mut sys, producer).await?;
    let order = OrderId::new();
    let (first, second) = (confirmed(order), confirmed(order));
    // The first row, claimed by another replica's sweep.
    commit_as(&db, &outbox, &first, CLAIMED_ELSEWHERE).await?;
    // The second row of the same order, and a marker of another order,
    // both orphans: the next sweep looks at both.
    drop(commit_old(&db, &outbox, &second).await?);
    let marker = confirmed(OrderId::new());
    drop(commit_old(&db, &outbox, &marker).await?);
    wait_published(&sys, &HashSet::from([marker.event_id.to_string()])).await?;
    let second_id = HashSet::from([second.event_id.to_string()]);
    assert!(
        published_now(&sys, &second_id).await?.is_empty(),
        "the sweep published an order's second event while its first was still on its way"
    );
    // The other sweeper died: its claim runs out.
    sqlx::query(
        "UPDATE outbox SET claimed_until = now() - interval '1 second' WHERE event_id = $1",
    )
    .bind(first.event_id)
    .execute(&db)
    .await?;
    let both = HashSet::from([first.event_id.to_string(), second.event_id.to_string()]);
    let mut out = wait_published(&sys, &both).await?;
    out.sort_by_key(|m| m.offset);
    let got: Vec<&str> = out.iter().filter_map(|m| m.header("event_id")).collect();
    assert_eq!(
        got,
        vec![first.event_id.to_string(), second.event_id.to_string()]
    );
    stop.cancel();
    relay.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// A row handed over in memory waits while an earlier row of its order is
/// still in the table outside its batch (another replica holds it, or the
/// in-memory cap left it to the sweep), and goes out once that one is
/// published and deleted; rows of other orders do not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handed_over_row_waits_for_an_earlier_row_of_its_order_held_elsewhere(
) -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    let producer = saga_runtime::kafka::producer(sys.kafka(), "relay-test")?;
    let (db, outbox, stop, relay) = own_relay(&mut sys, producer).await?;
    let order = OrderId::new();
    let (first, second) = (confirmed(order), confirmed(order));
    // The first row: committed by "another replica", which holds it in
    // memory (young, so no sweep takes it yet).
    let mut tx = db.begin().await?;
    let elsewhere = outbox.enqueue_traced(&mut tx, &[(&first, None)]).await?;
    tx.commit().await?;
    drop(elsewhere);
    // The second row and a marker of another order, handed to our relay.
    let marker = confirmed(OrderId::new());
    let mut tx = db.begin().await?;
    let ours = outbox
        .enqueue_traced(&mut tx, &[(&second, None), (&marker, None)])
        .await?;
    tx.commit().await?;
    outbox.committed(ours);
    wait_published(&sys, &HashSet::from([marker.event_id.to_string()])).await?;
    let second_id = HashSet::from([second.event_id.to_string()]);
    assert!(
        published_now(&sys, &second_id).await?.is_empty(),
        "an order's second event went out while its first was still unpublished"
    );
    // The other replica publishes the first row and deletes it.
    let (partition, offset) = sys
        .produce_raw(
            &sys.topic("order-events"),
            &order.to_string(),
            &first.to_json()?,
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "event_id",
                value: Some(first.event_id.to_string().as_str()),
            }),
        )
        .await?;
    sqlx::query("DELETE FROM outbox WHERE event_id = $1")
        .bind(first.event_id)
        .execute(&db)
        .await?;
    let out = wait_published(&sys, &second_id).await?;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].partition, partition);
    assert!(
        out[0].offset > offset,
        "the second event overtook the first"
    );
    stop.cancel();
    relay.await?;
    sys.restart(Which::Order).await?;
    sys.shutdown().await
}

/// Each of `orders` has its `written` events in `published` in the order
/// they were written (one key, one partition: offsets give the order).
fn assert_each_orders_events_in_order(
    orders: &[OrderId],
    written: &[Envelope],
    published: &[TopicMessage],
) {
    for order in orders {
        let key = order.to_string();
        let want: Vec<String> = written
            .iter()
            .filter(|e| e.order_id == *order)
            .map(|e| e.event_id.to_string())
            .collect();
        let mut got: Vec<&TopicMessage> = published
            .iter()
            .filter(|m| m.key.as_deref() == Some(key.as_str()))
            .collect();
        got.sort_by_key(|m| m.offset);
        let got: Vec<String> = got
            .iter()
            .filter_map(|m| m.header("event_id").map(str::to_owned))
            .collect();
        assert_eq!(got, want, "events of order {key} out of order");
    }
}

fn confirmed(order: OrderId) -> Envelope {
    Envelope::new(
        order,
        CorrelationId::generate(),
        Event::OrderConfirmed(OrderConfirmed {
            total: Money::from_minor(1_234),
            order_created_at: chrono::Utc::now(),
        }),
    )
}

/// The messages on `order-events` whose `event_id` is one of `ids`.
async fn published_now(sys: &System, ids: &HashSet<String>) -> anyhow::Result<Vec<TopicMessage>> {
    Ok(sys
        .read_topic(&sys.topic("order-events"))
        .await?
        .into_iter()
        .filter(|m| m.header("event_id").is_some_and(|id| ids.contains(id)))
        .collect())
}

/// [`published_now`] once every one of `ids` is there.
async fn wait_published(sys: &System, ids: &HashSet<String>) -> anyhow::Result<Vec<TopicMessage>> {
    poll(
        Duration::from_millis(50),
        || async {
            let found = published_now(sys, ids).await?;
            Ok(if found.len() >= ids.len() {
                Ok(found)
            } else {
                Err(found.len())
            })
        },
        |n| anyhow::anyhow!("{n} of {} rows published", ids.len()),
    )
    .await
}

/// Waits until none of the outbox rows of `ids` is left.
async fn wait_deleted(db: &PgPool, ids: &HashSet<String>) -> anyhow::Result<()> {
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
    poll(
        Duration::from_millis(50),
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_id = ANY($1)")
                .bind(&ids)
                .fetch_one(db)
                .await?;
            Ok(if n == 0 { Ok(()) } else { Err(n) })
        },
        |n| anyhow::anyhow!("{n} published row(s) still in the outbox"),
    )
    .await
}
