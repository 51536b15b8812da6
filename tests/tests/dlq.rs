//! `saga-admin dlq`: a refused event is dead-lettered, listed and shown;
//! once its cause is fixed, a redrive puts it back and the saga completes;
//! a second redrive is refused, `--dry-run` changes nothing, a forced one
//! is absorbed by the consumers' inbox, and a poison message redriven lands
//! in its dead-letter topic again.

use std::time::Duration;

use events::{
    CorrelationId, CustomerId, Envelope, Event, LineItem, Money, OrderCreated, OrderId, Quantity,
    Sku,
};
use saga_tests::procs::admin_binary;
use saga_tests::{poll, System, TopicMessage, Which};
use serde_json::Value;

/// Runs `saga-admin` against the system's broker and topics.
async fn admin(sys: &System, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let (brokers, prefix) = (
        sys.kafka().brokers.clone(),
        sys.kafka().topic_prefix.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        admin_binary(
            &args,
            &[
                ("KAFKA_BROKERS", brokers.as_str()),
                ("KAFKA_TOPIC_PREFIX", prefix.as_str()),
            ],
        )
    })
    .await?
}

/// The messages about `key` on `topic` once there are at least `want`.
async fn wait_for(
    sys: &System,
    topic: &str,
    key: &str,
    want: usize,
) -> anyhow::Result<Vec<TopicMessage>> {
    poll(
        Duration::from_millis(50),
        || async {
            let found: Vec<TopicMessage> = sys
                .read_topic(&sys.topic(topic))
                .await?
                .into_iter()
                .filter(|m| m.key.as_deref() == Some(key))
                .collect();
            Ok(if found.len() >= want {
                Ok(found)
            } else {
                Err(found.len())
            })
        },
        |n| anyhow::anyhow!("{topic} holds {n} of {want} messages about {key}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_events_are_redriven_once_the_order_exists_and_the_saga_completes(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-DLQ", 10).await?;
    // An order payment-service and inventory-service hear of before
    // order-service has it (restored from a backup later, say): they charge
    // and reserve, and order-service refuses their events.
    let order = OrderId::new();
    let key = order.to_string();
    let correlation = CorrelationId::generate();
    let items = vec![LineItem {
        sku: Sku::parse("SKU-DLQ")?,
        quantity: Quantity::new(2)?,
        unit_price: Money::from_minor(450),
    }];
    let created = Envelope::new(
        order,
        correlation.clone(),
        Event::OrderCreated(OrderCreated {
            customer_id: CustomerId::parse("c-dlq")?,
            items: items.clone(),
            total: Money::from_minor(900),
        }),
    );
    sys.publish("order-events", &created).await?;
    wait_for(&sys, "payment-events.dlq", &key, 1).await?;
    wait_for(&sys, "inventory-events.dlq", &key, 1).await?;

    // Listed, with where they came from and why.
    let (code, out) = admin(&sys, &["dlq", "list", "--order", &key, "--json"]).await?;
    assert_eq!(code, 0, "{out}");
    let listed: Vec<Value> = serde_json::from_str(&out)?;
    assert_eq!(listed.len(), 2, "{out}");
    for d in &listed {
        assert_eq!(d["consumer"], "order-service", "{d}");
        assert!(
            d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("does not exist")),
            "{d}"
        );
        assert_eq!(d["order_id"], Value::String(key.clone()));
        assert!(d["original"]["offset"].is_i64(), "{d}");
        assert!(d["redriven_at"].is_null());
    }
    let mut types: Vec<&str> = listed
        .iter()
        .filter_map(|d| d["event_type"].as_str())
        .collect();
    types.sort_unstable();
    assert_eq!(types, ["InventoryReserved", "PaymentSucceeded"]);
    let (code, out) = admin(&sys, &["dlq", "list", "--consumer", "payment-service"]).await?;
    assert_eq!(code, 0);
    assert!(out.ends_with("0 dead letters\n"), "{out}");
    let (code, out) = admin(&sys, &["dlq", "list", "--topic", "payment-events"]).await?;
    assert!(
        code == 0 && out.contains("PaymentSucceeded") && !out.contains("InventoryReserved"),
        "{out}"
    );

    // Shown whole.
    let paid = listed
        .iter()
        .find(|d| d["event_type"] == "PaymentSucceeded")
        .ok_or_else(|| anyhow::anyhow!("no PaymentSucceeded"))?;
    let (partition, offset) = (
        paid["at"]["partition"].to_string(),
        paid["at"]["offset"].to_string(),
    );
    let (code, out) = admin(
        &sys,
        &[
            "dlq",
            "show",
            "payment-events.dlq",
            &offset,
            "--partition",
            &partition,
        ],
    )
    .await?;
    assert_eq!(code, 0, "{out}");
    for part in [
        "dlq.reason: ",
        "dlq.original.topic: ",
        "key: ",
        "\"PaymentSucceeded\"",
    ] {
        assert!(out.contains(part), "{part} missing:\n{out}");
    }

    // A dry run changes nothing.
    let before = sys.read_topic(&sys.topic("payment-events")).await?.len();
    let (code, out) = admin(&sys, &["dlq", "redrive", "--order", &key, "--dry-run"]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("would redrive").count(), 2, "{out}");
    assert_eq!(
        sys.read_topic(&sys.topic("payment-events")).await?.len(),
        before
    );
    assert!(sys
        .read_topic(&sys.topic("saga-admin.redrives"))
        .await?
        .is_empty());

    // The cause is fixed: order-service gets the order.
    sqlx::query(
        "INSERT INTO orders (order_id, customer_id, status, items, total_minor, correlation_id)
         VALUES ($1, 'c-dlq', 'PENDING', $2, 900, $3)",
    )
    .bind(order.as_uuid())
    .bind(serde_json::to_value(&items)?)
    .bind(correlation.as_str())
    .execute(sys.db(Which::Order))
    .await?;
    let (code, out) = admin(&sys, &["dlq", "redrive", "--order", &key]).await?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 dead letters selected, 2 redriven"), "{out}");
    let confirmed = sys.wait_terminal(&key).await?;
    assert_eq!(confirmed["status"], "CONFIRMED", "{confirmed}");
    let redriven = wait_for(&sys, "payment-events", &key, 2).await?;
    let again = redriven
        .iter()
        .find(|m| m.header("dlq.redriven_from").is_some())
        .ok_or_else(|| anyhow::anyhow!("no redriven copy on payment-events"))?;
    assert!(again.header("dlq.redriven_at").is_some());
    assert!(
        again.header("dlq.reason").is_none(),
        "failure headers left behind"
    );
    let first = redriven
        .iter()
        .find(|m| m.header("dlq.redriven_from").is_none())
        .ok_or_else(|| anyhow::anyhow!("the original PaymentSucceeded is gone"))?;
    assert_eq!(
        (again.header("event_id"), &again.payload),
        (first.header("event_id"), &first.payload),
        "the redrive changed the message"
    );
    let history = confirmed["history"].as_array().map(Vec::len).unwrap_or(0);

    // Redriving again is refused; forced, the inbox absorbs it.
    let (code, out) = admin(&sys, &["dlq", "redrive", "--order", &key]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.matches("redriven before").count(), 2, "{out}");
    let (code, out) = admin(&sys, &["dlq", "list", "--order", &key]).await?;
    assert_eq!(code, 0);
    assert_eq!(out.matches("redriven_at=").count(), 2, "{out}");
    let one = format!("{}/{partition}@{offset}", sys.topic("payment-events.dlq"));
    let (code, out) = admin(&sys, &["dlq", "redrive", "--message", &one, "--force"]).await?;
    assert_eq!(code, 0, "{out}");
    let forced = wait_for(&sys, "payment-events", &key, 3).await?;
    let last = forced
        .iter()
        .max_by_key(|m| m.offset)
        .map(|m| (m.partition, m.offset))
        .ok_or_else(|| anyhow::anyhow!("nothing on payment-events"))?;
    sys.wait_committed(Which::Order, &sys.topic("payment-events"), last.0, last.1)
        .await?;
    let order_now = sys.order(&key).await?;
    assert_eq!(
        order_now["history"].as_array().map(Vec::len).unwrap_or(0),
        history,
        "the forced redrive changed the order: {order_now}"
    );
    assert_eq!(sys.stock_levels("SKU-DLQ").await?, (8, 2));
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redriven_poison_message_lands_in_its_dead_letter_topic_again() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let key = "poison-1";
    sys.produce_raw(
        &sys.topic("order-events"),
        key,
        b"{this is not an event",
        rdkafka::message::OwnedHeaders::new(),
    )
    .await?;
    wait_for(&sys, "order-events.dlq", key, 1).await?;
    let (code, out) = admin(&sys, &["dlq", "redrive", "--order", key]).await?;
    assert_eq!(code, 0, "{out}");
    let twice = wait_for(&sys, "order-events.dlq", key, 2).await?;
    let second = twice
        .iter()
        .max_by_key(|m| m.offset)
        .ok_or_else(|| anyhow::anyhow!("no second dead letter"))?;
    assert!(
        second.header("dlq.redriven_from").is_some(),
        "the second dead letter does not say it was redriven: {second:?}"
    );
    assert_eq!(second.payload, b"{this is not an event");
    let (code, out) = admin(
        &sys,
        &["dlq", "list", "--order", key, "--reason", "MALFORMED"],
    )
    .await?;
    assert_eq!(code, 0);
    assert!(out.ends_with("2 dead letters\n"), "{out}");
    sys.shutdown().await
}
