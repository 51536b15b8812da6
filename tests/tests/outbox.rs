//! The outbox relay's safety net: rows committed but never handed to a relay
//! in memory (the writer died right after its commit) are found by the
//! periodic sweep, published once, and deleted.

use std::time::Duration;

use events::{CorrelationId, Envelope, Event, Money, OrderConfirmed, OrderId};
use saga_runtime::Outbox;
use saga_tests::{poll, System, Which};

#[tokio::test]
async fn rows_no_relay_was_handed_are_swept_published_and_deleted() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let outbox = Outbox::new(sys.kafka());
    let event = Envelope::new(
        OrderId::new(),
        CorrelationId::generate(),
        Event::OrderConfirmed(OrderConfirmed {
            total: Money::from_minor(1_234),
            order_created_at: chrono::Utc::now(),
        }),
    );
    let db = sys.db(Which::Order);
    let mut tx = db.begin().await?;
    let staged = outbox.enqueue_traced(&mut tx, &[(&event, None)]).await?;
    tx.commit().await?;
    // As if the writer died between its commit and the hand-over.
    drop(staged);

    let topic = sys.topic("order-events");
    let event_id = event.event_id.to_string();
    let published = poll(
        Duration::from_millis(100),
        || async {
            let found = sys
                .read_topic(&topic)
                .await?
                .into_iter()
                .filter(|m| m.header("event_id") == Some(event_id.as_str()))
                .count();
            Ok(if found > 0 { Ok(found) } else { Err(found) })
        },
        |_| anyhow::anyhow!("the swept row never reached {topic}"),
    )
    .await?;
    assert_eq!(published, 1);
    let left = poll(
        Duration::from_millis(100),
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_id = $1")
                .bind(event.event_id)
                .fetch_one(db)
                .await?;
            Ok(if n == 0 { Ok(n) } else { Err(n) })
        },
        |n| anyhow::anyhow!("{n} published row(s) still in the outbox"),
    )
    .await?;
    assert_eq!(left, 0);
    // Published once: the sweep took it under a row lock and deleted it.
    let copies = sys
        .read_topic(&topic)
        .await?
        .into_iter()
        .filter(|m| m.header("event_id") == Some(event_id.as_str()))
        .count();
    assert_eq!(copies, 1);
    sys.shutdown().await
}
