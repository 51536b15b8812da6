//! The outbox relay: rows handed over in quick succession are published once
//! each, in order per order, and deleted; and its safety net: rows committed
//! but never handed to a relay in memory (the writer died right after its
//! commit) are found by the periodic sweep, published once, and deleted.

use std::collections::HashSet;
use std::time::Duration;

use events::{CorrelationId, Envelope, Event, Money, OrderConfirmed, OrderId};
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
    for order in &orders {
        let key = order.to_string();
        let want: Vec<String> = written
            .iter()
            .filter(|e| e.order_id == *order)
            .map(|e| e.event_id.to_string())
            .collect();
        // One key, one partition: offsets give the published order.
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
