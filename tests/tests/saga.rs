//! The checkout saga end to end: real PostgreSQL, real broker, three services.

use anyhow::Context;
use saga_tests::{System, Which};
use serde_json::json;

fn history_types(order: &serde_json::Value) -> Vec<String> {
    order["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|e| e["event_type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn happy_path_confirms_the_order_and_reserves_stock() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-H", 10).await?;
    let (status, headers, body) = sys
        .post_order(
            &json!({"customer_id": "c-42", "items": [{"sku": "SKU-H", "quantity": 2, "unit_price": "29.99"}]}),
            &[("X-Correlation-ID", "corr-happy-1")],
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "PENDING");
    assert_eq!(body["correlation_id"], "corr-happy-1");
    let id = body["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(headers["x-correlation-id"], "corr-happy-1");
    assert_eq!(headers["location"], format!("/orders/{id}").as_str());

    let order = sys.wait_terminal(&id).await?;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["failure_reason"], serde_json::Value::Null);
    assert_eq!(order["total"], "59.98");
    assert_eq!(order["customer_id"], "c-42");
    assert_eq!(order["correlation_id"], "corr-happy-1");
    assert_eq!(order["items"][0]["sku"], "SKU-H");
    assert_eq!(
        history_types(&order),
        [
            "OrderCreated",
            "PaymentSucceeded",
            "InventoryReserved",
            "OrderConfirmed"
        ]
    );

    let payment = sys.payment(&id).await?;
    assert_eq!(payment["status"], "CHARGED");
    assert_eq!(payment["amount"], "59.98");

    assert_eq!(sys.stock_levels("SKU-H").await?, (8, 2));

    // Every event of the order is keyed by its ID and carries the headers.
    let created = sys.read_topic(&sys.topic("order-events")).await?;
    let mine: Vec<_> = created
        .iter()
        .filter(|m| m.key.as_deref() == Some(id.as_str()))
        .collect();
    assert_eq!(mine.len(), 2, "OrderCreated and OrderConfirmed");
    for m in mine {
        assert_eq!(m.header("correlation_id"), Some("corr-happy-1"));
        assert!(m
            .header("traceparent")
            .is_some_and(|t| t.starts_with("00-")));
        assert!(m.header("event_type").is_some());
    }
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payment_over_the_limit_is_declined_and_the_order_fails() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-D", 10).await?;
    let id = sys
        .place(json!([{"sku": "SKU-D", "quantity": 2, "unit_price": "600.00"}]))
        .await?;
    let order = sys.wait_terminal(&id).await?;
    assert_eq!(order["status"], "FAILED", "{order}");
    assert_eq!(order["failure_reason"], "payment_declined");
    assert_eq!(
        history_types(&order),
        ["OrderCreated", "PaymentFailed", "OrderFailed"]
    );
    let payment = sys.payment(&id).await?;
    assert_eq!(payment["status"], "DECLINED");
    assert_eq!(payment["amount"], "1200.00");
    // Inventory never heard of it.
    assert_eq!(sys.stock_levels("SKU-D").await?, (10, 0));
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failure_rate_one_declines_every_order() -> anyhow::Result<()> {
    let sys = System::start_with(saga_tests::PaymentSettings {
        failure_rate: 1.0,
        ..Default::default()
    })
    .await?;
    let id = sys
        .place(json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "1.00"}]))
        .await?;
    let order = sys.wait_terminal(&id).await?;
    assert_eq!(order["failure_reason"], "payment_declined", "{order}");
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_stock_fails_the_order_and_refunds_the_payment() -> anyhow::Result<()> {
    let sys = System::start().await?;
    // The demo catalog's scarce item has 5 units.
    let id = sys
        .place(json!([{"sku": "SKU-RARE", "quantity": 6, "unit_price": "100.00"}]))
        .await?;
    let order = sys
        .wait_order(&id, |o| o["status"] == "FAILED" && o["refunded"] == true)
        .await?;
    assert_eq!(order["failure_reason"], "out_of_stock");
    let types = history_types(&order);
    for expected in [
        "OrderCreated",
        "PaymentSucceeded",
        "InventoryOutOfStock",
        "OrderFailed",
        "PaymentRefunded",
    ] {
        assert!(
            types.iter().any(|t| t == expected),
            "{expected} missing from {types:?}"
        );
    }
    let payment = sys.payment(&id).await?;
    assert_eq!(payment["status"], "REFUNDED");
    assert_eq!(payment["amount"], "600.00");
    assert_eq!(sys.stock_levels("SKU-RARE").await?, (5, 0));
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_item_orders_reserve_everything_or_nothing() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-A", 10).await?;
    sys.stock("SKU-B", 1).await?;
    let short = sys
        .place(json!([
            {"sku": "SKU-A", "quantity": 3, "unit_price": "1.00"},
            {"sku": "SKU-B", "quantity": 2, "unit_price": "1.00"}
        ]))
        .await?;
    let order = sys
        .wait_order(&short, |o| o["status"] == "FAILED" && o["refunded"] == true)
        .await?;
    assert_eq!(order["failure_reason"], "out_of_stock");
    assert_eq!(
        sys.product("SKU-A").await?["available"],
        10,
        "nothing of A was taken"
    );
    assert_eq!(sys.product("SKU-B").await?["available"], 1);

    // Two lines of the same SKU count together; a missing SKU is out of stock.
    let ok = sys
        .place(json!([
            {"sku": "SKU-A", "quantity": 3, "unit_price": "1.00"},
            {"sku": "SKU-B", "quantity": 1, "unit_price": "1.00"},
            {"sku": "SKU-A", "quantity": 2, "unit_price": "1.00"}
        ]))
        .await?;
    assert_eq!(sys.wait_terminal(&ok).await?["status"], "CONFIRMED");
    assert_eq!(sys.product("SKU-A").await?["available"], 5);
    assert_eq!(sys.product("SKU-A").await?["reserved"], 5);
    assert_eq!(sys.product("SKU-B").await?["available"], 0);

    let unknown = sys
        .place(json!([{"sku": "NO-SUCH-SKU", "quantity": 1, "unit_price": "1.00"}]))
        .await?;
    assert_eq!(
        sys.wait_terminal(&unknown).await?["failure_reason"],
        "out_of_stock"
    );
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_returns_the_same_order_and_emits_once() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let body = json!({"customer_id": "c-idem", "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "10.00"}]});
    let key = [("Idempotency-Key", "key-123")];
    let (s1, _, first) = sys.post_order(&body, &key).await?;
    let (s2, h2, second) = sys.post_order(&body, &key).await?;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first["order_id"], second["order_id"]);
    assert_eq!(first["correlation_id"], second["correlation_id"]);
    assert_eq!(h2["idempotent-replayed"], "true");
    let id = first["order_id"].as_str().expect("order_id").to_owned();

    // Same key, different body: refused, nothing new.
    let other = json!({"customer_id": "c-idem", "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "10.00"}]});
    let (s3, _, err) = sys.post_order(&other, &key).await?;
    assert_eq!(s3, 422, "{err}");
    assert_eq!(err["error"]["code"], "idempotency_key_reused");

    // Concurrent retries with a fresh key also collapse to one order, also
    // when they share one group commit (the key then conflicts within a
    // single INSERT).
    let key2 = [("Idempotency-Key", "key-456")];
    let answers =
        futures::future::try_join_all((0..16).map(|_| sys.post_order(&body, &key2))).await?;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, _, b)| {
            assert_eq!(*status, 202, "{b}");
            b["order_id"].to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id2 = answers[0].2["order_id"]
        .as_str()
        .expect("order_id")
        .to_owned();

    assert_eq!(sys.wait_terminal(&id).await?["status"], "CONFIRMED");
    assert_eq!(sys.wait_terminal(&id2).await?["status"], "CONFIRMED");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(sys.db(Which::Order))
        .await?;
    assert_eq!(orders, 2);
    let topic = sys.topic("order-events");
    let created = sys.events_for(&topic, &id).await?;
    assert_eq!(
        created
            .iter()
            .filter(|e| e["event_type"] == "OrderCreated")
            .count(),
        1
    );
    // The losing requests' orders were never written, so neither were
    // their events: the statement that writes orders, history and outbox
    // keeps only the events of the orders it inserted. (Every request was
    // answered, so every such statement had committed and handed its
    // events to the relay before the winner's saga even began; a stray
    // event would be on the topic long before that saga ends.)
    let all_created = sys
        .read_topic(&topic)
        .await?
        .iter()
        .filter(|m| m.header("event_type") == Some("OrderCreated"))
        .count();
    assert_eq!(all_created, 2, "one OrderCreated per order written");
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_orders_for_scarce_stock_never_oversell() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-HOT", 10).await?;
    let posts = (0..40)
        .map(|_| sys.place(json!([{"sku": "SKU-HOT", "quantity": 1, "unit_price": "5.00"}])));
    let ids: Vec<String> = futures::future::try_join_all(posts).await?;
    let finals = futures::future::try_join_all(ids.iter().map(|id| sys.wait_terminal(id))).await?;
    let confirmed = finals.iter().filter(|o| o["status"] == "CONFIRMED").count();
    let out_of_stock = finals
        .iter()
        .filter(|o| o["failure_reason"] == "out_of_stock")
        .count();
    assert_eq!((confirmed, out_of_stock), (10, 30));
    assert_eq!(sys.stock_levels("SKU-HOT").await?, (0, 10));
    // Every failed order got its money back.
    for o in finals.iter().filter(|o| o["status"] == "FAILED") {
        let id = o["order_id"].as_str().expect("order_id");
        sys.wait_order(id, |o| o["refunded"] == true).await?;
    }
    let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM payments WHERE status = 'CHARGED'")
        .fetch_one(sys.db(Which::Payment))
        .await?;
    assert_eq!(charged, 10);
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivered_and_reproduced_events_change_nothing() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-R", 10).await?;
    let id = sys
        .place(json!([{"sku": "SKU-R", "quantity": 1, "unit_price": "7.00"}]))
        .await?;
    assert_eq!(sys.wait_terminal(&id).await?["status"], "CONFIRMED");

    let order_topic = sys.topic("order-events");
    let payment_topic = sys.topic("payment-events");
    let original = sys
        .read_topic(&order_topic)
        .await?
        .into_iter()
        .find(|m| {
            m.key.as_deref() == Some(id.as_str()) && m.header("event_type") == Some("OrderCreated")
        })
        .expect("OrderCreated on the topic");
    let paid = sys
        .read_topic(&payment_topic)
        .await?
        .into_iter()
        .find(|m| {
            m.key.as_deref() == Some(id.as_str())
                && m.header("event_type") == Some("PaymentSucceeded")
        })
        .expect("PaymentSucceeded on the topic");

    // 1. The very same messages again (a relay that crashed before marking
    //    its rows sent re-publishes exactly these bytes).
    let mut last = Vec::new();
    for (topic, m) in [(&order_topic, &original), (&payment_topic, &paid)] {
        last.push((
            topic.clone(),
            sys.produce_raw(topic, &id, &m.payload, m.owned_headers())
                .await?,
        ));
    }
    // 2. The same order created again under a new event ID: the business
    //    guard (one payment per order) holds even when the inbox cannot tell.
    let mut fresh: serde_json::Value = serde_json::from_slice(&original.payload)?;
    fresh["event_id"] = json!(uuid::Uuid::new_v4());
    last.push((
        order_topic.clone(),
        sys.produce_raw(
            &order_topic,
            &id,
            &serde_json::to_vec(&fresh)?,
            rdkafka::message::OwnedHeaders::new(),
        )
        .await?,
    ));

    // Wait until the consumers have processed (and committed) past them.
    let (p, o) = last[1].1;
    sys.wait_committed(Which::Inventory, &payment_topic, p, o)
        .await?;
    sys.wait_committed(Which::Order, &payment_topic, p, o)
        .await?;
    let (p, o) = last[2].1;
    sys.wait_committed(Which::Payment, &order_topic, p, o)
        .await?;

    let payments = sys.events_for(&payment_topic, &id).await?;
    let charges = payments
        .iter()
        .filter(|e| e["event_type"] == "PaymentSucceeded")
        .count();
    assert_eq!(
        charges, 2,
        "the original plus our replay, and no new charge: {payments:?}"
    );
    let distinct: std::collections::HashSet<_> =
        payments.iter().map(|e| e["event_id"].clone()).collect();
    assert_eq!(distinct.len(), 1, "payment-service emitted nothing new");
    let inventory = sys.events_for(&sys.topic("inventory-events"), &id).await?;
    assert_eq!(inventory.len(), 1, "one reservation only: {inventory:?}");
    assert_eq!(sys.stock_levels("SKU-R").await?, (9, 1));
    let order = sys.order(&id).await?;
    assert_eq!(history_types(&order).len(), 4, "history unchanged: {order}");
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_messages_go_to_the_dead_letter_topic_and_do_not_block() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let order_topic = sys.topic("order-events");
    // Garbage on every partition a later order might use.
    let mut poisoned = Vec::new();
    for i in 0..6 {
        let key = format!("poison-{i}");
        let at = sys
            .produce_raw(
                &order_topic,
                &key,
                b"{this is not json",
                rdkafka::message::OwnedHeaders::new(),
            )
            .await?;
        poisoned.push(at);
    }
    // A well-formed envelope that breaks a domain rule (quantity 0) is malformed too.
    let bad_qty = br#"{"event_id":"00000000-0000-0000-0000-0000000000aa","order_id":"00000000-0000-0000-0000-0000000000bb","correlation_id":"c","occurred_at":"2026-01-01T00:00:00Z","schema_version":1,"event_type":"OrderCreated","data":{"customer_id":"c","items":[{"sku":"A","quantity":0,"unit_price":"1.00"}],"total":"1.00"}}"#;
    sys.produce_raw(
        &order_topic,
        "poison-q",
        bad_qty,
        rdkafka::message::OwnedHeaders::new(),
    )
    .await?;

    sys.confirm_orders(6).await?;

    let dlq = sys.read_topic(&format!("{order_topic}.dlq")).await?;
    assert_eq!(dlq.len(), 7, "{dlq:?}");
    for m in &dlq {
        assert_eq!(m.header("dlq.consumer"), Some("payment-service"));
        assert_eq!(m.header("dlq.original.topic"), Some(order_topic.as_str()));
        assert!(
            m.header("dlq.reason")
                .is_some_and(|r| r.contains("malformed")),
            "{m:?}"
        );
        let partition: i32 = m
            .header("dlq.original.partition")
            .expect("partition")
            .parse()?;
        let offset: i64 = m.header("dlq.original.offset").expect("offset").parse()?;
        assert!(m.key.as_deref().is_some_and(|k| k.starts_with("poison")));
        if m.payload.starts_with(b"{this") {
            assert!(
                poisoned.contains(&(partition, offset)),
                "{partition}/{offset}"
            );
        }
    }
    sys.shutdown().await
}

/// The tolerant reader (a rolling upgrade deploys a producer before its
/// consumers): an event type payment-service does not know, with fields it
/// does not know either, is acknowledged, counted and never dead-lettered;
/// an envelope of a newer `schema_version` is dead-lettered with that
/// reason, to be redriven once the consumer is upgraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_event_types_are_skipped_and_newer_schemas_dead_lettered() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let order_topic = sys.topic("order-events");
    let envelope = |event_type: &str, version: u32| {
        format!(
            r#"{{"event_id":"{}","order_id":"{}","correlation_id":"c","occurred_at":"2026-01-01T00:00:00Z","schema_version":{version},"event_type":"{event_type}","data":{{"points":10}},"channel":"app"}}"#,
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4()
        )
    };
    // On every partition a later order might use.
    for i in 0..6 {
        sys.produce_raw(
            &order_topic,
            &format!("loyalty-{i}"),
            envelope("LoyaltyPointsAwarded", 1).as_bytes(),
            rdkafka::message::OwnedHeaders::new(),
        )
        .await?;
    }
    sys.produce_raw(
        &order_topic,
        "schema-2",
        envelope("OrderCreated", 2).as_bytes(),
        rdkafka::message::OwnedHeaders::new(),
    )
    .await?;

    sys.confirm_orders(6).await?;
    let series = format!(
        r#"saga_events_skipped_total{{service="payment-service",topic="{order_topic}",event_type="LoyaltyPointsAwarded"}}"#
    );
    saga_tests::poll(
        std::time::Duration::from_millis(100),
        || async {
            let skipped = saga_tests::metric_sum(&sys.metrics(Which::Payment).await?, &series);
            Ok(if skipped == 6.0 { Ok(()) } else { Err(skipped) })
        },
        |skipped| anyhow::anyhow!("{series} is {skipped}, not 6"),
    )
    .await?;
    // Kept for a build that knows the type (none does: they stay).
    let want: Vec<(String, String)> = (0..6)
        .map(|i| ("LoyaltyPointsAwarded".to_owned(), format!("loyalty-{i}")))
        .collect();
    saga_tests::poll(
        std::time::Duration::from_millis(50),
        || async {
            let parked: Vec<(String, String)> = sqlx::query_as(
                "SELECT event_type, convert_from(message_key, 'UTF8') FROM parked_events ORDER BY 2",
            )
            .fetch_all(sys.db(Which::Payment))
            .await?;
            Ok(if parked == want { Ok(()) } else { Err(parked) })
        },
        |parked| anyhow::anyhow!("parked by payment-service: {parked:?}"),
    )
    .await?;
    let dlq = sys.wait_topic(&format!("{order_topic}.dlq"), 1).await?;
    assert_eq!(
        dlq.len(),
        1,
        "only the newer schema is dead-lettered: {dlq:?}"
    );
    assert_eq!(dlq[0].key.as_deref(), Some("schema-2"));
    assert!(
        dlq[0]
            .header("dlq.reason")
            .is_some_and(|r| r.contains("unsupported schema_version 2")),
        "{:?}",
        dlq[0]
    );
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_too_large_for_its_dead_letter_topic_goes_there_without_its_value(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    let order_topic = sys.topic("order-events");
    // Malformed and larger than the services' producers may send (librdkafka's
    // default message.max.bytes, 1,000,000): its whole copy can never go to
    // the DLQ.
    let producer = sys.producer()?;
    // Still under Kafka's own default limit for a batch (1,048,588 bytes).
    let mut huge = vec![b'x'; 1_010_000];
    huge[0] = b'{';
    for partition in 0..sys.kafka.partitions {
        let key = format!("huge-{partition}");
        let record = rdkafka::producer::FutureRecord::to(&order_topic)
            .partition(partition)
            .key(&key)
            .payload(&huge);
        producer
            .send(record, std::time::Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::Error::new(e).context("producing the huge message"))?;
    }

    // Every partition has one in front of the orders; they still complete.
    sys.confirm_orders(6).await?;

    // Each is skipped only with its copy in the DLQ: without its value
    // (too large), saying so and where the original is.
    let dlq = sys
        .wait_topic(&format!("{order_topic}.dlq"), sys.kafka.partitions as usize)
        .await?;
    assert_eq!(dlq.len(), sys.kafka.partitions as usize, "{dlq:?}");
    for copy in &dlq {
        assert!(copy.payload.is_empty(), "the copy carries the value");
        assert_eq!(copy.header("dlq.truncated"), Some("true"));
        assert_eq!(copy.header("dlq.original.size"), Some("1010000"));
        assert_eq!(
            copy.header("dlq.original.topic"),
            Some(order_topic.as_str())
        );
        assert!(copy.key.as_deref().is_some_and(|k| k.starts_with("huge-")));
    }
    sys.shutdown().await
}

/// An event the inbox no longer remembers (its row purged after the
/// retention, as after a dead-letter redrive or a group reset weeks later)
/// is not recorded twice in its order's history: the schema refuses a
/// second row for one event, and the write skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_is_recorded_once_in_its_orders_history_even_after_the_inbox_forgot_it(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    let id = sys
        .place(json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "4.00"}]))
        .await?;
    assert_eq!(sys.wait_terminal(&id).await?["status"], "CONFIRMED");
    let before = history_types(&sys.order(&id).await?);

    let topic = sys.topic("inventory-events");
    let reserved = sys
        .read_topic(&topic)
        .await?
        .into_iter()
        .find(|m| {
            m.key.as_deref() == Some(id.as_str())
                && m.header("event_type") == Some("InventoryReserved")
        })
        .expect("InventoryReserved on the topic");
    let event_id: uuid::Uuid = reserved.header("event_id").expect("event_id").parse()?;
    // The inbox's retention purged it.
    let forgotten = sqlx::query("DELETE FROM processed_events WHERE event_id = $1")
        .bind(event_id)
        .execute(sys.db(Which::Order))
        .await?
        .rows_affected();
    assert_eq!(forgotten, 1);
    let (p, o) = sys
        .produce_raw(&topic, &id, &reserved.payload, reserved.owned_headers())
        .await?;
    sys.wait_committed(Which::Order, &topic, p, o).await?;
    let order = sys.order(&id).await?;
    assert_eq!(history_types(&order), before, "history changed: {order}");

    // The schema itself refuses a second row for the event.
    let again = sqlx::query(
        "INSERT INTO order_history (order_id, event_id, event_type, occurred_at, data)
         SELECT order_id, event_id, event_type, occurred_at, data FROM order_history
         WHERE event_id = $1",
    )
    .bind(event_id)
    .execute(sys.db(Which::Order))
    .await;
    let code = again
        .as_ref()
        .err()
        .and_then(|e| e.as_database_error())
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("23505"), "{again:?}");
    sys.shutdown().await
}

/// "Transient" errors that do not go away: inventory-service's database
/// refuses to wait for locks (`lock_timeout`), and an operator holds one
/// product's row. The batch holding that order's `PaymentSucceeded` fails
/// with `55P03` every time while the database answers everything else: it
/// is retried a bounded number of times, then split, and that one event is
/// dead-lettered with its reason, so the partition moves on and another
/// order completes. (A real outage is still waited out: see the chaos
/// suite.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_that_keeps_hitting_a_lock_timeout_is_split_and_dead_lettered_not_retried_for_ever(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-HELD", 10).await?;
    sys.stock("SKU-FREE", 10).await?;
    let db = sys.db(Which::Inventory);
    sqlx::query(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET lock_timeout = ''200ms''', current_database()); END $$",
    )
    .execute(db)
    .await?;
    // The service's sessions pick the setting up when they reconnect.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(db)
    .await?;
    let mut operator = db.begin().await?;
    sqlx::query("SELECT 1 FROM products WHERE sku = 'SKU-HELD' FOR UPDATE")
        .execute(&mut *operator)
        .await?;

    let held = sys
        .place(json!([{"sku": "SKU-HELD", "quantity": 1, "unit_price": "1.00"}]))
        .await?;
    let free = sys
        .place(json!([{"sku": "SKU-FREE", "quantity": 1, "unit_price": "1.00"}]))
        .await?;
    assert_eq!(sys.wait_terminal(&free).await?["status"], "CONFIRMED");
    let dlq = format!("{}.dlq", sys.topic("payment-events"));
    let copies = sys.wait_topic(&dlq, 1).await?;
    let copy = copies
        .iter()
        .find(|m| m.key.as_deref() == Some(held.as_str()))
        .context("the held order's event is not in the DLQ")?;
    assert_eq!(copy.header("dlq.consumer"), Some("inventory-service"));
    assert!(
        copy.header("dlq.reason")
            .is_some_and(|r| r.contains("55P03")),
        "{copy:?}"
    );
    operator.rollback().await?;
    sys.shutdown().await
}

/// Sets one configuration entry of `topic`, as `kafka-configs.sh --alter`
/// does.
async fn set_topic_config(sys: &System, topic: &str, key: &str, value: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        saga_runtime::kafka::client_config(sys.kafka(), "saga-tests-admin").create()?;
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set(key, value);
    for result in admin.alter_configs(&[change], &AdminOptions::new()).await? {
        result.map_err(|(what, e)| anyhow::anyhow!("altering {what:?}: {e}"))?;
    }
    Ok(())
}

/// A dead-letter topic that refuses even the copy without its value (here
/// its `max.message.bytes` is below any record) holds its consumer on that
/// copy: the copy is retried, the message never skipped, and `/ready` says
/// why until the topic takes it; then the saga goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_stuck_on_a_dead_letter_copy_is_not_ready_until_the_copy_goes(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    let order_topic = sys.topic("order-events");
    let dlq = format!("{order_topic}.dlq");
    set_topic_config(&sys, &dlq, "max.message.bytes", "64").await?;
    sys.produce_raw(
        &order_topic,
        "stuck-poison",
        b"{not json",
        rdkafka::message::OwnedHeaders::new(),
    )
    .await?;
    let why = saga_tests::poll(
        std::time::Duration::from_millis(100),
        || async {
            let (status, body) = sys.get_json(Which::Payment, "/ready").await?;
            Ok(if status == 503 && body.to_string().contains(&dlq) {
                Ok(body)
            } else {
                Err((status, body))
            })
        },
        |now| anyhow::anyhow!("payment-service's /ready does not name the stuck copy: {now:?}"),
    )
    .await?;
    assert!(why.to_string().contains("dead-letter"), "{why}");

    set_topic_config(&sys, &dlq, "max.message.bytes", "1048588").await?;
    let copies = sys.wait_topic(&dlq, 1).await?;
    assert_eq!(copies[0].key.as_deref(), Some("stuck-poison"));
    saga_tests::poll(
        std::time::Duration::from_millis(100),
        || async {
            let (status, body) = sys.get_json(Which::Payment, "/ready").await?;
            Ok(if status == 200 { Ok(()) } else { Err(body) })
        },
        |body| anyhow::anyhow!("payment-service not ready again: {body}"),
    )
    .await?;
    sys.confirm_orders(2).await?;
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_a_handler_refuses_are_dead_lettered_alone_and_stay_replayable() -> anyhow::Result<()>
{
    let sys = System::start().await?;
    let id = sys
        .place(json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "2.00"}]))
        .await?;
    assert_eq!(sys.wait_terminal(&id).await?["status"], "CONFIRMED");

    // A well-formed InventoryReserved for an order order-service never saw:
    // its handler refuses it, which must not roll back the events around it.
    let inventory_topic = sys.topic("inventory-events");
    let reserved = sys
        .read_topic(&inventory_topic)
        .await?
        .into_iter()
        .find(|m| m.key.as_deref() == Some(id.as_str()))
        .expect("InventoryReserved on the topic");
    let mut stray: serde_json::Value = serde_json::from_slice(&reserved.payload)?;
    let stray_order = uuid::Uuid::new_v4().to_string();
    let stray_event = uuid::Uuid::new_v4();
    stray["order_id"] = json!(stray_order);
    stray["event_id"] = json!(stray_event);
    let stray = serde_json::to_vec(&stray)?;
    let headers = rdkafka::message::OwnedHeaders::new;
    sys.produce_raw(&inventory_topic, &stray_order, &stray, headers())
        .await?;
    sys.confirm_orders(4).await?;

    let dlq_topic = format!("{inventory_topic}.dlq");
    let dlq = sys.wait_topic(&dlq_topic, 1).await?;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].key.as_deref(), Some(stray_order.as_str()));
    assert_eq!(dlq[0].header("dlq.consumer"), Some("order-service"));
    assert!(
        dlq[0]
            .header("dlq.reason")
            .is_some_and(|r| r.contains("does not exist")),
        "{:?}",
        dlq[0]
    );
    // Refused means not processed: the inbox does not remember it ...
    let remembered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE event_id = $1")
            .bind(stray_event)
            .fetch_one(sys.db(Which::Order))
            .await?;
    assert_eq!(remembered, 0);
    // ... so replaying it (after a fix, say) is handled again, not skipped
    // as a duplicate.
    sys.produce_raw(&inventory_topic, &stray_order, &stray, headers())
        .await?;
    assert_eq!(sys.wait_topic(&dlq_topic, 2).await?.len(), 2);
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_http_input_gets_a_json_4xx_and_changes_nothing() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let item = |q: serde_json::Value, p: serde_json::Value| json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": q, "unit_price": p}]});
    let cases: Vec<(&str, serde_json::Value, u16, &str)> = vec![
        (
            "empty items",
            json!({"customer_id": "c", "items": []}),
            422,
            "items",
        ),
        ("quantity 0", item(json!(0), json!("1.00")), 422, "quantity"),
        (
            "negative quantity",
            item(json!(-3), json!("1.00")),
            422,
            "quantity",
        ),
        (
            "absurd quantity",
            item(json!(1_000_000_000), json!("1.00")),
            422,
            "quantity",
        ),
        (
            "fractional quantity",
            item(json!(1.5), json!("1.00")),
            422,
            "quantity",
        ),
        (
            "zero price",
            item(json!(1), json!("0.00")),
            422,
            "unit_price",
        ),
        (
            "negative price",
            item(json!(1), json!("-1.00")),
            422,
            "unit_price",
        ),
        (
            "sub-cent price",
            item(json!(1), json!("1.005")),
            422,
            "unit_price",
        ),
        (
            "price as a float",
            item(json!(1), json!(1.5)),
            422,
            "unit_price",
        ),
        (
            "price not a number",
            item(json!(1), json!("abc")),
            422,
            "unit_price",
        ),
        (
            "empty customer",
            json!({"customer_id": "", "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "1"}]}),
            422,
            "customer_id",
        ),
        (
            "empty sku",
            json!({"customer_id": "c", "items": [{"sku": "", "quantity": 1, "unit_price": "1"}]}),
            422,
            "sku",
        ),
        ("missing items", json!({"customer_id": "c"}), 422, "items"),
        (
            "unknown field",
            json!({"customer_id": "c", "items": [], "coupon": "FREE"}),
            422,
            "coupon",
        ),
        ("not an object", json!([1, 2, 3]), 422, ""),
    ];
    for (name, body, status, mentions) in cases {
        let (got, _, err) = sys.post_order(&body, &[]).await?;
        assert_eq!(got, status, "{name}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(err["error"]["code"].is_string(), "{name}: {err}");
        assert!(
            message.contains(mentions),
            "{name}: message should mention {mentions:?}: {message}"
        );
    }

    let post_raw = |body: Vec<u8>, content_type: &'static str| {
        sys.send(
            Which::Order,
            sys.http
                .post(sys.url(Which::Order, "/orders"))
                .header("content-type", content_type)
                .body(body),
        )
    };
    let resp = post_raw(b"{\"customer_id\": ".to_vec(), "application/json").await?;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.body["error"]["code"], "malformed_json");
    let resp = post_raw(
        b"customer_id=c".to_vec(),
        "application/x-www-form-urlencoded",
    )
    .await?;
    assert_eq!(resp.status, 415);
    assert!(resp.body["error"]["message"].is_string());
    let huge = format!(
        "{{\"customer_id\": \"{}\", \"items\": []}}",
        "x".repeat(1024 * 1024 + 1)
    );
    let resp = post_raw(huge.into_bytes(), "application/json").await?;
    assert_eq!(resp.status, 413);
    assert_eq!(resp.body["error"]["code"], "body_too_large");

    let ok_body = item(json!(1), json!("1.00"));
    for (header, value) in [
        ("X-Correlation-ID", "has spaces in it"),
        ("Idempotency-Key", ""),
    ] {
        let (got, _, err) = sys.post_order(&ok_body, &[(header, value)]).await?;
        assert_eq!(got, 400, "{header}: {err}");
    }

    for (path, status) in [
        ("/orders/not-a-uuid", 400),
        ("/orders/00000000-0000-0000-0000-000000000000", 404),
        ("/nope", 404),
    ] {
        let (got, err) = sys.get_json(Which::Order, path).await?;
        assert_eq!(got, status, "{path}: {err}");
        assert!(err["error"]["message"].is_string(), "{path}: {err}");
    }
    let resp = sys
        .send(
            Which::Order,
            sys.http.delete(sys.url(Which::Order, "/orders")),
        )
        .await?;
    assert_eq!(resp.status, 405);
    assert!(resp.body["error"]["code"].is_string());

    // Inventory refuses negative stock and bad names, and keeps its stock.
    let put = |body: serde_json::Value| {
        sys.send(
            Which::Inventory,
            sys.http
                .put(sys.url(Which::Inventory, "/products/SKU-1"))
                .json(&body),
        )
    };
    for body in [
        json!({"name": "x", "available": -1}),
        json!({"name": "", "available": 1}),
        json!({"available": 3}),
    ] {
        let resp = put(body.clone()).await?;
        assert_eq!(resp.status, 422, "{body}");
        assert!(resp.body["error"]["message"].is_string());
    }
    assert_eq!(sys.product("SKU-1").await?["available"], 1000);
    let (got, _) = sys
        .get_json(Which::Inventory, "/products/bad%20sku")
        .await?;
    assert_eq!(got, 400);
    let (got, _) = sys.get_json(Which::Payment, "/payments/not-a-uuid").await?;
    assert_eq!(got, 400);

    // Nothing was written or emitted.
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(sys.db(Which::Order))
        .await?;
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(sys.db(Which::Order))
        .await?;
    assert_eq!((orders, outbox), (0, 0));
    assert!(sys.read_topic(&sys.topic("order-events")).await?.is_empty());
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_crashed_mid_saga_lose_nothing_after_restart() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    sys.stock("SKU-C", 1000).await?;
    // One saga first, so every consumer has joined its group before the
    // crashes.
    let warm_up = sys
        .place(json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "2.00"}]))
        .await?;
    assert_eq!(sys.wait_terminal(&warm_up).await?["status"], "CONFIRMED");
    // Inventory is down: orders get charged but stay PENDING.
    sys.crash(Which::Inventory).await?;
    let first: Vec<String> = futures::future::try_join_all(
        (0..15).map(|_| sys.place(json!([{"sku": "SKU-C", "quantity": 1, "unit_price": "2.00"}]))),
    )
    .await?;
    // Payment crashes while orders are in flight.
    let second_batch =
        (0..15).map(|_| sys.place(json!([{"sku": "SKU-C", "quantity": 1, "unit_price": "2.00"}])));
    let second: Vec<String> = futures::future::try_join_all(second_batch).await?;
    sys.crash(Which::Payment).await?;
    for id in &first {
        assert_eq!(sys.order(id).await?["status"], "PENDING");
    }
    // Order-service crashes too, then everything comes back.
    sys.crash(Which::Order).await?;
    sys.restart(Which::Order).await?;
    sys.restart(Which::Payment).await?;
    sys.restart(Which::Inventory).await?;
    for id in first.iter().chain(&second) {
        assert_eq!(sys.wait_terminal(id).await?["status"], "CONFIRMED", "{id}");
    }
    // Exactly one charge and one reservation per order.
    let charged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payments WHERE status = 'CHARGED' AND order_id <> $1::uuid",
    )
    .bind(&warm_up)
    .fetch_one(sys.db(Which::Payment))
    .await?;
    assert_eq!(charged, 30);
    assert_eq!(sys.stock_levels("SKU-C").await?, (970, 30));

    // A graceful stop and start in between changes nothing either.
    sys.stop(Which::Payment).await?;
    let late = sys
        .place(json!([{"sku": "SKU-C", "quantity": 1, "unit_price": "2.00"}]))
        .await?;
    sys.restart(Which::Payment).await?;
    assert_eq!(sys.wait_terminal(&late).await?["status"], "CONFIRMED");
    sys.shutdown().await
}
