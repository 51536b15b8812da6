//! Cancellation and deadlines, end to end on the real broker and database:
//! every way an order can be cancelled or expire ends with the money given
//! back and the stock returned, each order's events stay in commit order
//! (also with two order-service replicas), and deadlines fire once, after a
//! restart too; events parked during a rolling upgrade are published again
//! in their order.

use std::collections::HashMap;
use std::time::Duration;

use saga_admin::audit;
use saga_tests::{poll, Options, OrderSettings, System, TopicMessage, Which};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn items(sku: &str, quantity: i64) -> Value {
    json!([{"sku": sku, "quantity": quantity, "unit_price": "5.00"}])
}

/// `POST {base}/orders/{id}/cancel`: status and JSON body.
async fn cancel_at(sys: &System, base: &str, id: &str) -> anyhow::Result<(u16, Value)> {
    let resp = sys
        .http
        .post(format!("{base}/orders/{id}/cancel"))
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

async fn cancel(sys: &System, id: &str) -> anyhow::Result<(u16, Value)> {
    cancel_at(sys, &sys.url(Which::Order, ""), id).await
}

fn history_types(order: &Value) -> Vec<String> {
    order["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|e| e["event_type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the order shows the compensation done: refunded and its
/// stock released.
async fn wait_compensated(sys: &System, id: &str) -> anyhow::Result<Value> {
    sys.wait_order(id, |o| o["refunded"] == true && o["stock_released"] == true)
        .await
}

/// Event types about `id` on `topic`, in the order they were published
/// (by their services: a parked event published again is a copy).
async fn types_on(sys: &System, topic: &str, id: &str) -> anyhow::Result<Vec<String>> {
    let mut msgs: Vec<TopicMessage> = sys
        .read_topic(&sys.topic(topic))
        .await?
        .into_iter()
        .filter(|m| m.key.as_deref() == Some(id) && m.header("parked.from").is_none())
        .collect();
    msgs.sort_by_key(|m| m.offset);
    Ok(msgs
        .iter()
        .filter_map(|m| m.header("event_type").map(str::to_owned))
        .collect())
}

/// Everything a cancelled order that had been charged and reserved must
/// show once compensated, on every service.
async fn assert_fully_compensated(sys: &System, id: &str, sku: &str) -> anyhow::Result<()> {
    let order = wait_compensated(sys, id).await?;
    let history = history_types(&order);
    for t in ["OrderCancelled", "PaymentRefunded", "InventoryReleased"] {
        assert!(history.iter().any(|h| h == t), "{t} missing: {history:?}");
    }
    let payment = sys.payment(id).await?;
    assert_eq!(payment["status"], "REFUNDED", "{payment}");
    let reservation = sys
        .get_ok(Which::Inventory, &format!("/reservations/{id}"))
        .await?;
    assert_eq!(reservation["status"], "RELEASED", "{reservation}");
    assert_eq!(reservation["items"][0]["sku"], sku);
    assert_eq!(
        types_on(sys, "order-events", id)
            .await?
            .iter()
            .filter(|t| *t == "OrderCancelled")
            .count(),
        1,
        "one OrderCancelled"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_while_pending_before_payment_refunds_and_releases() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    sys.settle().await?;
    sys.stock("SKU-C1", 10).await?;
    sys.stop(Which::Payment).await?;
    let id = sys.place(items("SKU-C1", 2)).await?;
    let (status, body) = cancel(&sys, &id).await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (&body["order_id"], &body["status"], &body["failure_reason"]),
        (&json!(id), &json!("CANCELLED"), &json!("cancelled"))
    );
    // Again: the same order, nothing emitted.
    let (again, body2) = cancel(&sys, &id).await?;
    assert_eq!((again, &body2["status"]), (202, &json!("CANCELLED")));
    // payment-service comes back: it charges (OrderCreated comes first on
    // the partition) and refunds; inventory reserves and releases.
    sys.restart(Which::Payment).await?;
    assert_fully_compensated(&sys, &id, "SKU-C1").await?;
    assert_eq!(sys.stock_levels("SKU-C1").await?, (10, 0));
    assert_eq!(
        types_on(&sys, "order-events", &id).await?,
        vec!["OrderCreated", "OrderCancelled"]
    );
    assert_eq!(
        types_on(&sys, "payment-events", &id).await?,
        vec!["PaymentSucceeded", "PaymentRefunded"]
    );
    assert_eq!(
        types_on(&sys, "inventory-events", &id).await?,
        vec!["InventoryReserved", "InventoryReleased"]
    );
    let order = sys.order(&id).await?;
    assert_eq!(
        order["status"], "CANCELLED",
        "a late reservation changes nothing"
    );
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_after_payment_and_before_inventory_releases_what_inventory_reserves_later(
) -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    sys.settle().await?;
    sys.stock("SKU-C2", 5).await?;
    sys.stop(Which::Inventory).await?;
    let id = sys.place(items("SKU-C2", 3)).await?;
    poll(
        Duration::from_millis(20),
        || async {
            let (status, p) = sys
                .get_json(Which::Payment, &format!("/payments/{id}"))
                .await?;
            Ok(if status == 200 && p["status"] == "CHARGED" {
                Ok(())
            } else {
                Err(p)
            })
        },
        |p| anyhow::anyhow!("payment never charged: {p}"),
    )
    .await?;
    assert_eq!(cancel(&sys, &id).await?.0, 202);
    // The refund does not wait for inventory.
    sys.wait_order(&id, |o| o["refunded"] == true).await?;
    sys.restart(Which::Inventory).await?;
    assert_fully_compensated(&sys, &id, "SKU-C2").await?;
    assert_eq!(sys.stock_levels("SKU-C2").await?, (5, 0));
    assert_eq!(sys.order(&id).await?["status"], "CANCELLED");
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_after_confirmation_refunds_and_releases_and_replays_change_nothing(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-C3", 10).await?;
    let id = sys.place(items("SKU-C3", 2)).await?;
    assert_eq!(sys.wait_terminal(&id).await?["status"], "CONFIRMED");
    assert_eq!(sys.stock_levels("SKU-C3").await?, (8, 2));
    let (status, body) = cancel(&sys, &id).await?;
    assert_eq!(
        (status, &body["status"]),
        (202, &json!("CANCELLED")),
        "{body}"
    );
    assert_fully_compensated(&sys, &id, "SKU-C3").await?;
    assert_eq!(sys.stock_levels("SKU-C3").await?, (10, 0));
    let payment = sys.payment(&id).await?;
    assert_eq!(payment["refund_reason"], "order cancelled");

    // Older events replayed after the newer ones, under new event IDs (a
    // redrive from a dead-letter topic): nothing is charged or taken again.
    let mut last = Vec::new();
    for (topic, kind) in [
        ("order-events", "OrderCreated"),
        ("payment-events", "PaymentSucceeded"),
    ] {
        let original = sys
            .read_topic(&sys.topic(topic))
            .await?
            .into_iter()
            .find(|m| m.key.as_deref() == Some(id.as_str()) && m.header("event_type") == Some(kind))
            .ok_or_else(|| anyhow::anyhow!("{kind} not on {topic}"))?;
        let mut fresh: Value = serde_json::from_slice(&original.payload)?;
        fresh["event_id"] = json!(uuid::Uuid::now_v7());
        let at = sys
            .produce_raw(
                &sys.topic(topic),
                &id,
                &serde_json::to_vec(&fresh)?,
                rdkafka::message::OwnedHeaders::new(),
            )
            .await?;
        last.push((topic, at));
    }
    let (p, o) = last[0].1;
    sys.wait_committed(Which::Payment, &sys.topic("order-events"), p, o)
        .await?;
    let (p, o) = last[1].1;
    sys.wait_committed(Which::Inventory, &sys.topic("payment-events"), p, o)
        .await?;
    assert_eq!(sys.payment(&id).await?["status"], "REFUNDED");
    assert_eq!(sys.stock_levels("SKU-C3").await?, (10, 0));
    assert_eq!(
        types_on(&sys, "inventory-events", &id).await?,
        vec!["InventoryReserved", "InventoryReleased"]
    );

    // The listing finds it by status, and the metrics count it.
    let cancelled = sys
        .get_ok(Which::Order, "/orders?status=CANCELLED&limit=10")
        .await?;
    assert!(
        cancelled["orders"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["order_id"] == json!(id))),
        "{cancelled}"
    );
    let metrics = sys.metrics(Which::Order).await?;
    assert!(
        metrics.contains("saga_orders_cancelled_total{reason=\"customer\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("saga_orders_pending_past_half_deadline{service=\"order-service\"}"),
        "{metrics}"
    );
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_orders_cannot_be_cancelled_and_bad_ids_are_refused() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let id = sys
        .place(json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "5000.00"}]))
        .await?;
    let failed = sys.wait_terminal(&id).await?;
    assert_eq!(failed["failure_reason"], "payment_declined");
    let (status, body) = cancel(&sys, &id).await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "order_not_cancellable");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("FAILED")),
        "{body}"
    );
    let (status, body) = cancel(&sys, &uuid::Uuid::now_v7().to_string()).await?;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
    let (status, body) = cancel(&sys, "not-an-id").await?;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    // Nothing changed.
    let after = sys.order(&id).await?;
    assert_eq!(
        (&after["status"], &after["updated_at"]),
        (&failed["status"], &failed["updated_at"])
    );
    assert!(!types_on(&sys, "order-events", &id)
        .await?
        .contains(&"OrderCancelled".to_owned()));
    sys.shutdown().await
}

fn short_deadline(secs: u64) -> Options {
    Options {
        order: OrderSettings {
            deadline: Duration::from_secs(secs),
        },
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_passing_while_inventory_is_down_fails_the_order_and_compensates_later(
) -> anyhow::Result<()> {
    let mut sys = System::start_opts(short_deadline(2)).await?;
    sys.settle().await?;
    sys.stock("SKU-D1", 4).await?;
    sys.stop(Which::Inventory).await?;
    let id = sys.place(items("SKU-D1", 1)).await?;
    let expired = sys.wait_order(&id, |o| o["status"] != "PENDING").await?;
    assert_eq!(
        (&expired["status"], &expired["failure_reason"]),
        (&json!("FAILED"), &json!("deadline_exceeded")),
        "{expired}"
    );
    let took = chrono::DateTime::parse_from_rfc3339(expired["updated_at"].as_str().unwrap_or(""))?
        - chrono::DateTime::parse_from_rfc3339(expired["created_at"].as_str().unwrap_or(""))?;
    assert!(
        took >= chrono::Duration::seconds(2),
        "expired after {took}, before its deadline"
    );
    // The charge is refunded without waiting for inventory.
    sys.wait_order(&id, |o| o["refunded"] == true).await?;
    // An expired order can no longer be cancelled.
    assert_eq!(cancel(&sys, &id).await?.0, 409);
    // inventory-service comes back: it reserves (the charge came first),
    // then releases on the refund.
    sys.restart(Which::Inventory).await?;
    assert_fully_compensated(&sys, &id, "SKU-D1").await?;
    assert_eq!(sys.stock_levels("SKU-D1").await?, (4, 0));
    let order = sys.order(&id).await?;
    assert_eq!(order["status"], "FAILED");
    let cancelled = sys
        .events_for(&sys.topic("order-events"), &id)
        .await?
        .into_iter()
        .find(|e| e["event_type"] == "OrderCancelled")
        .ok_or_else(|| anyhow::anyhow!("no OrderCancelled"))?;
    assert_eq!(cancelled["data"]["reason"], "deadline");
    assert_eq!(cancelled["data"]["total"], "5.00");
    assert_eq!(cancelled["data"]["items"][0]["sku"], "SKU-D1");
    assert!(sys
        .metrics(Which::Order)
        .await?
        .contains("saga_orders_cancelled_total{reason=\"deadline\"}"));
    sys.shutdown().await
}

/// An order-service replica beside the harness's own: same database, same
/// topics, same consumer group.
struct Replica {
    url: String,
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn replica(sys: &System, settings: OrderSettings) -> anyhow::Result<Replica> {
    let app = order_service::build(sys.service_config(Which::Order)?, settings).await?;
    let url = format!("http://127.0.0.1:{}", app.port());
    let token = CancellationToken::new();
    let task = tokio::spawn(app.run(token.clone()));
    Ok(Replica { url, token, task })
}

impl Replica {
    async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.task.await?
    }
}

/// Cancels racing the saga: each order is cancelled the moment it is
/// accepted, through the other of two order-service replicas, so that its
/// `OrderCreated` and `OrderCancelled` are in two relays' hands at once.
/// Every order's events reach each topic in commit order, every order ends
/// CANCELLED and compensated, and the books balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn immediate_cancels_through_another_replica_keep_each_orders_events_in_order(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-RACE", 1_000).await?;
    let other = replica(&sys, OrderSettings::default()).await?;
    let ids = futures::future::try_join_all((0..40).map(|_| async {
        let id = sys.place(items("SKU-RACE", 1)).await?;
        let (status, body) = cancel_at(&sys, &other.url, &id).await?;
        anyhow::ensure!(status == 202, "cancel answered {status}: {body}");
        anyhow::Ok(id)
    }))
    .await?;
    for id in &ids {
        wait_compensated(&sys, id).await?;
    }
    let by_key = |msgs: Vec<TopicMessage>| {
        let mut m: HashMap<String, Vec<TopicMessage>> = HashMap::new();
        for msg in msgs {
            m.entry(msg.key.clone().unwrap_or_default())
                .or_default()
                .push(msg);
        }
        for v in m.values_mut() {
            v.sort_by_key(|x| x.offset);
        }
        m
    };
    // On a fast broker a saga can finish between the accept and the
    // cancel; a CONFIRMED order is cancelled too, so its confirmation may
    // come between the two, never after the cancel.
    let order_events: &[&[&str]] = &[
        &["OrderCreated", "OrderCancelled"],
        &["OrderCreated", "OrderConfirmed", "OrderCancelled"],
    ];
    for (topic, wants) in [
        ("order-events", order_events),
        (
            "payment-events",
            &[&["PaymentSucceeded", "PaymentRefunded"][..]][..],
        ),
        (
            "inventory-events",
            &[&["InventoryReserved", "InventoryReleased"][..]][..],
        ),
    ] {
        let msgs = by_key(sys.read_topic(&sys.topic(topic)).await?);
        for id in &ids {
            let got: Vec<&str> = msgs
                .get(id)
                .map(|v| v.iter().filter_map(|m| m.header("event_type")).collect())
                .unwrap_or_default();
            assert!(
                wants.contains(&got.as_slice()),
                "order {id} on {topic}: {got:?}, want one of {wants:?}"
            );
        }
    }
    assert_eq!(sys.stock_levels("SKU-RACE").await?, (1_000, 0));
    let options = sys.audit_options(17);
    let mut violations = Vec::new();
    let report = audit::run(&options, |v| violations.push(v.clone())).await?;
    assert!(violations.is_empty(), "{violations:?}");
    assert!(report.orders >= 40);
    other.stop().await?;
    sys.shutdown().await
}

/// Cancels racing `InventoryReserved`: each order is cancelled as soon as
/// its charge shows in its history, while inventory is deciding. Whether
/// the cancel lands before or after the confirmation, every order ends
/// CANCELLED, refunded and with its stock back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancels_racing_the_reservation_end_cancelled_and_compensated() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-RACE2", 100).await?;
    let ids = futures::future::try_join_all((0..20).map(|_| async {
        let id = sys.place(items("SKU-RACE2", 2)).await?;
        sys.wait_order(&id, |o| {
            history_types(o).iter().any(|t| t == "PaymentSucceeded")
        })
        .await?;
        let (status, body) = cancel(&sys, &id).await?;
        anyhow::ensure!(status == 202, "cancel answered {status}: {body}");
        anyhow::Ok(id)
    }))
    .await?;
    for id in &ids {
        let o = wait_compensated(&sys, id).await?;
        assert_eq!(o["status"], "CANCELLED", "{o}");
        assert_eq!(sys.payment(id).await?["status"], "REFUNDED");
    }
    assert_eq!(sys.stock_levels("SKU-RACE2").await?, (100, 0));
    sys.shutdown().await
}

/// `n` orders that only their deadline can end (payment-service is
/// stopped), all past it while order-service is stopped too.
async fn due_while_order_service_is_down(
    deadline: OrderSettings,
    n: usize,
) -> anyhow::Result<(System, Vec<String>)> {
    let mut sys = System::start_opts(Options {
        order: deadline,
        ..Options::default()
    })
    .await?;
    sys.settle().await?;
    sys.stop(Which::Payment).await?;
    let ids = futures::future::try_join_all((0..n).map(|_| sys.place(items("SKU-1", 1)))).await?;
    sys.stop(Which::Order).await?;
    let newest = chrono::Utc::now();
    let past =
        newest + chrono::Duration::from_std(deadline.deadline)? + chrono::Duration::seconds(1);
    poll(
        Duration::from_millis(50),
        || async {
            Ok(if chrono::Utc::now() > past {
                Ok(())
            } else {
                Err(())
            })
        },
        |_| anyhow::anyhow!("the clock did not pass the deadline"),
    )
    .await?;
    Ok((sys, ids))
}

/// Deadlines live in the database: orders that fall due while no
/// order-service runs expire once it is back, and with three replicas
/// looking, each order expires exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_fire_after_a_restart_and_once_across_replicas() -> anyhow::Result<()> {
    let deadline = OrderSettings {
        deadline: Duration::from_secs(1),
    };
    let (mut sys, ids) = due_while_order_service_is_down(deadline, 30).await?;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
        .fetch_one(sys.db(Which::Order))
        .await?;
    assert_eq!(pending, 30, "nothing expires while order-service is down");
    // Three replicas at once.
    let a = replica(&sys, deadline).await?;
    let b = replica(&sys, deadline).await?;
    sys.restart(Which::Order).await?;
    for id in &ids {
        let o = sys.wait_order(id, |o| o["status"] != "PENDING").await?;
        assert_eq!(o["failure_reason"], "deadline_exceeded", "{o}");
    }
    let fired: Vec<(String, i64)> = sqlx::query_as(
        "SELECT order_id::text, count(*) FROM order_history
         WHERE event_type = 'OrderCancelled' GROUP BY order_id",
    )
    .fetch_all(sys.db(Which::Order))
    .await?;
    assert_eq!(fired.len(), 30);
    assert!(fired.iter().all(|(_, n)| *n == 1), "{fired:?}");
    // On the topic: once each (read once they are all there).
    let per_order = poll(
        Duration::from_millis(50),
        || async {
            let msgs = sys.read_topic(&sys.topic("order-events")).await?;
            let mut per_order: HashMap<String, usize> = HashMap::new();
            for m in msgs
                .iter()
                .filter(|m| m.header("event_type") == Some("OrderCancelled"))
            {
                *per_order
                    .entry(m.key.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            Ok(if ids.iter().all(|id| per_order.contains_key(id)) {
                Ok(per_order)
            } else {
                Err(per_order.len())
            })
        },
        |n| anyhow::anyhow!("{n} of 30 orders' OrderCancelled published"),
    )
    .await?;
    for id in &ids {
        assert_eq!(per_order.get(id), Some(&1), "order {id}");
    }
    // payment-service comes back: charges and refunds each, in that order.
    sys.restart(Which::Payment).await?;
    for id in &ids {
        wait_compensated(&sys, id).await?;
    }
    a.stop().await?;
    b.stop().await?;
    sys.shutdown().await
}

/// payment-service and inventory-service remember a compensation that came
/// before the event it compensates (that event was dead-lettered and is
/// replayed later): nothing is charged or taken afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compensation_heard_first_prevents_the_charge_and_the_reservation() -> anyhow::Result<()>
{
    let sys = System::start().await?;
    sys.stock("SKU-V", 3).await?;
    let order = events::OrderId::new();
    let correlation = events::CorrelationId::generate();
    let line = events::LineItem {
        sku: events::Sku::parse("SKU-V")?,
        quantity: events::Quantity::new(2)?,
        unit_price: events::Money::from_minor(500),
    };
    let env = |event| events::Envelope::new(order, correlation.clone(), event);
    let send = |topic: &'static str, e: events::Envelope| {
        let sys = &sys;
        async move { sys.publish(topic, &e).await }
    };
    send(
        "order-events",
        env(events::Event::OrderCancelled(events::OrderCancelled {
            reason: events::CancelReason::Deadline,
            order_created_at: chrono::Utc::now(),
            items: vec![line.clone()],
            total: events::Money::from_minor(1_000),
        })),
    )
    .await?;
    let (p, o) = send(
        "order-events",
        env(events::Event::OrderCreated(events::OrderCreated {
            customer_id: events::CustomerId::parse("c-late")?,
            items: vec![line.clone()],
            total: events::Money::from_minor(1_000),
        })),
    )
    .await?;
    sys.wait_committed(Which::Payment, &sys.topic("order-events"), p, o)
        .await?;
    let (status, _) = sys
        .get_json(Which::Payment, &format!("/payments/{order}"))
        .await?;
    assert_eq!(
        status, 404,
        "an order cancelled before its charge was charged"
    );

    send(
        "payment-events",
        env(events::Event::PaymentRefunded(events::PaymentRefunded {
            payment_id: uuid::Uuid::now_v7(),
            amount: events::Money::from_minor(1_000),
            reason: "order cancelled".into(),
        })),
    )
    .await?;
    let (p, o) = send(
        "payment-events",
        env(events::Event::PaymentSucceeded(events::PaymentSucceeded {
            payment_id: uuid::Uuid::now_v7(),
            amount: events::Money::from_minor(1_000),
            items: vec![line],
        })),
    )
    .await?;
    sys.wait_committed(Which::Inventory, &sys.topic("payment-events"), p, o)
        .await?;
    assert_eq!(sys.stock_levels("SKU-V").await?, (3, 0));
    let (status, _) = sys
        .get_json(Which::Inventory, &format!("/reservations/{order}"))
        .await?;
    assert_eq!(status, 404);
    assert!(types_on(&sys, "inventory-events", &order.to_string())
        .await?
        .is_empty());
    sys.shutdown().await
}

/// A replica expiring due orders skips those another replica is expiring
/// at that moment (their rows locked), and never fires them again once
/// that replica has committed: each deadline fires once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_skips_orders_another_replica_is_expiring() -> anyhow::Result<()> {
    let deadline = OrderSettings {
        deadline: Duration::from_secs(1),
    };
    let (mut sys, ids) = due_while_order_service_is_down(deadline, 10).await?;
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse()).collect::<Result<_, _>>()?;
    let (theirs, ours) = uuids.split_at(5);
    // "Another replica" is expiring the first five: their rows are locked.
    let db = sys.db(Which::Order).clone();
    let mut other = db.begin().await?;
    sqlx::query("SELECT order_id FROM orders WHERE order_id = ANY($1) FOR UPDATE")
        .bind(theirs)
        .fetch_all(&mut *other)
        .await?;
    sys.restart(Which::Order).await?;
    for id in ours {
        let o = sys
            .wait_order(&id.to_string(), |o| o["status"] != "PENDING")
            .await?;
        assert_eq!(o["failure_reason"], "deadline_exceeded");
    }
    for id in theirs {
        assert_eq!(sys.order(&id.to_string()).await?["status"], "PENDING");
    }
    // The other replica commits its expiry.
    sqlx::query(
        "WITH h AS (
             INSERT INTO order_history (order_id, event_id, event_type, occurred_at, data)
             SELECT id, gen_random_uuid(), 'OrderCancelled', now(), '{}'::jsonb FROM unnest($1::uuid[]) id)
         UPDATE orders SET status = 'FAILED', failure_reason = 'deadline_exceeded'
         WHERE order_id = ANY($1)",
    )
    .bind(theirs)
    .execute(&mut *other)
    .await?;
    other.commit().await?;
    // A marker falls due after that commit; once it has expired, the
    // replica has looked at the other five again.
    let marker = sys.place(items("SKU-1", 1)).await?;
    sys.wait_order(&marker, |o| o["status"] != "PENDING")
        .await?;
    let fired: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT order_id, count(*) FROM order_history
         WHERE event_type = 'OrderCancelled' AND order_id = ANY($1) GROUP BY order_id",
    )
    .bind(&uuids)
    .fetch_all(&db)
    .await?;
    assert_eq!(fired.len(), 10);
    assert!(fired.iter().all(|(_, n)| *n == 1), "fired twice: {fired:?}");
    sys.shutdown().await
}

/// payment-service hears `OrderCancelled` (order-events) and
/// `InventoryOutOfStock` (inventory-events) on two topics, so they race:
/// in either order of arrival the charge is refunded exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_is_refunded_once_whichever_of_cancel_and_out_of_stock_comes_first(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    for cancel_first in [true, false] {
        let order = events::OrderId::new();
        let correlation = events::CorrelationId::generate();
        let env = |event| events::Envelope::new(order, correlation.clone(), event);
        let send = |topic: &'static str, e: events::Envelope| {
            let sys = &sys;
            async move { sys.publish(topic, &e).await }
        };
        let line = events::LineItem {
            sku: events::Sku::parse("SKU-1")?,
            quantity: events::Quantity::new(1)?,
            unit_price: events::Money::from_minor(700),
        };
        let (p, o) = send(
            "order-events",
            env(events::Event::OrderCreated(events::OrderCreated {
                customer_id: events::CustomerId::parse("c-race")?,
                items: vec![line.clone()],
                total: events::Money::from_minor(700),
            })),
        )
        .await?;
        sys.wait_committed(Which::Payment, &sys.topic("order-events"), p, o)
            .await?;
        assert_eq!(sys.payment(&order.to_string()).await?["status"], "CHARGED");
        let cancelled = env(events::Event::OrderCancelled(events::OrderCancelled {
            reason: events::CancelReason::Customer,
            order_created_at: chrono::Utc::now(),
            items: vec![line],
            total: events::Money::from_minor(700),
        }));
        let short = env(events::Event::InventoryOutOfStock(
            events::InventoryOutOfStock { shortages: vec![] },
        ));
        let (first, second) = if cancel_first {
            (("order-events", cancelled), ("inventory-events", short))
        } else {
            (("inventory-events", short), ("order-events", cancelled))
        };
        let (p1, o1) = send(first.0, first.1).await?;
        sys.wait_committed(Which::Payment, &sys.topic(first.0), p1, o1)
            .await?;
        let (p2, o2) = send(second.0, second.1).await?;
        sys.wait_committed(Which::Payment, &sys.topic(second.0), p2, o2)
            .await?;
        // Everything payment-service wrote is published; then count.
        poll(
            Duration::from_millis(20),
            || async {
                let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                    .fetch_one(sys.db(Which::Payment))
                    .await?;
                Ok(if left == 0 { Ok(()) } else { Err(left) })
            },
            |n| anyhow::anyhow!("{n} payment-service outbox rows unpublished"),
        )
        .await?;
        let refunds = types_on(&sys, "payment-events", &order.to_string())
            .await?
            .iter()
            .filter(|t| *t == "PaymentRefunded")
            .count();
        assert_eq!(refunds, 1, "cancel first: {cancel_first}");
        let payment = sys.payment(&order.to_string()).await?;
        assert_eq!(payment["status"], "REFUNDED");
        let want = if cancel_first {
            "order cancelled"
        } else {
            "out of stock"
        };
        assert_eq!(payment["refund_reason"], want);
    }
    sys.shutdown().await
}

/// Parked events in `w`'s database.
async fn parked(sys: &System, w: Which) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(sys.db(w))
        .await?)
}

/// A rolling upgrade that deploys the producer of an event before one of
/// its consumers: a payment-service of a release that did not know
/// `OrderCancelled` (its build narrowed with `CONSUMER_UNKNOWN_EVENT_TYPES`)
/// beside the current order-service. The older replica acknowledges the
/// cancellation and parks it, nothing is dead-lettered, and the current
/// payment-service that replaces it refunds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_upgrade_refunds_a_cancellation_the_older_payment_service_did_not_know(
) -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    sys.stop(Which::Payment).await?;
    sys.restart_with(Which::Payment, |c| {
        c.unknown_event_types = vec![events::EventType::OrderCancelled];
    })
    .await?;
    sys.stock("SKU-U1", 5).await?;
    let id = sys.place(items("SKU-U1", 2)).await?;
    assert_eq!(sys.wait_terminal(&id).await?["status"], "CONFIRMED");
    assert_eq!(cancel(&sys, &id).await?.0, 202);

    // The older payment-service parks the cancellation, and moves on.
    poll(
        Duration::from_millis(50),
        || async {
            let n = parked(&sys, Which::Payment).await?;
            Ok(if n == 1 { Ok(()) } else { Err(n) })
        },
        |n| anyhow::anyhow!("{n} events parked by payment-service, not 1"),
    )
    .await?;
    let later = sys.place(items("SKU-U1", 1)).await?;
    assert_eq!(sys.wait_terminal(&later).await?["status"], "CONFIRMED");
    assert_eq!(sys.payment(&id).await?["status"], "CHARGED");

    // The current payment-service replaces it, and refunds.
    sys.stop(Which::Payment).await?;
    sys.restart(Which::Payment).await?;
    assert_fully_compensated(&sys, &id, "SKU-U1").await?;
    assert_eq!(sys.payment(&id).await?["refund_reason"], "order cancelled");
    assert_eq!(sys.stock_levels("SKU-U1").await?, (4, 1));
    assert_eq!(parked(&sys, Which::Payment).await?, 0);
    let copies: Vec<TopicMessage> = sys
        .read_topic(&sys.topic("order-events"))
        .await?
        .into_iter()
        .filter(|m| m.key.as_deref() == Some(id.as_str()) && m.header("parked.from").is_some())
        .collect();
    assert_eq!(copies.len(), 1, "the parked cancellation, sent again once");

    for topic in ["order-events", "payment-events", "inventory-events"] {
        let dlq = sys.read_topic(&format!("{}.dlq", sys.topic(topic))).await?;
        assert!(dlq.is_empty(), "dead-lettered on {topic}: {dlq:?}");
    }
    let mut violations = Vec::new();
    audit::run(&sys.audit_options(50), |v| violations.push(v.clone())).await?;
    assert!(violations.is_empty(), "{violations:?}");
    sys.shutdown().await
}

/// Two events of one order parked by an older replica (a cancellation the
/// older build did not know, then what came after it), the first held by
/// another transaction when a replica replays: the second must wait for
/// it, whichever replica publishes the first, and both go out in the order
/// they were parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_event_locked_elsewhere_holds_back_the_later_ones_of_its_order(
) -> anyhow::Result<()> {
    use saga_runtime::parked::{self, Known, Parked};

    let mut sys = System::start().await?;
    // Our replay alone on payment-service's table.
    sys.stop(Which::Payment).await?;
    let db = sys.db(Which::Payment).clone();
    let topic = sys.topic("order-events");
    let key = events::OrderId::new().to_string();
    let rows: Vec<Parked> = (0..2)
        .map(|i| Parked {
            topic: topic.clone(),
            kafka_partition: 0,
            kafka_offset: 1_000 + i,
            event_type: "OrderCancelled".to_owned(),
            message_key: Some(key.clone().into_bytes()),
            payload: b"{}".to_vec(),
            header_names: Vec::new(),
            header_values: Vec::new(),
        })
        .collect();
    parked::park(&db, &rows).await?;
    let known = Known::new(|k| k == events::EventType::OrderCancelled, Vec::new());
    let producer = saga_runtime::kafka::producer(sys.kafka(), "parked-test")?;

    // Another transaction holds the first (as a replica publishing it does).
    let mut other = db.begin().await?;
    sqlx::query("SELECT 1 FROM parked_events WHERE kafka_offset = 1000 FOR UPDATE")
        .execute(&mut *other)
        .await?;
    let replayed = parked::replay(&db, &producer, &known, "parked-test").await?;
    assert_eq!(
        replayed.published, 0,
        "the order's second event went out ahead of its first"
    );
    assert_eq!(parked(&sys, Which::Payment).await?, 2);

    other.rollback().await?;
    let replayed = parked::replay(&db, &producer, &known, "parked-test").await?;
    assert_eq!(replayed.published, 2);
    assert_eq!(parked(&sys, Which::Payment).await?, 0);
    let copies: Vec<String> = sys
        .read_topic(&topic)
        .await?
        .into_iter()
        .filter(|m| m.key.as_deref() == Some(key.as_str()))
        .filter_map(|m| m.header("parked.from").map(str::to_owned))
        .collect();
    assert_eq!(
        copies,
        [format!("{topic}/0@1000"), format!("{topic}/0@1001")],
        "each parked event once, in the order they were parked"
    );
    sys.shutdown().await
}
