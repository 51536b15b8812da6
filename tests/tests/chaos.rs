//! The chaos suite: the three services as real processes, each test with a
//! PostgreSQL server and a broker of its own, under a steady stream of
//! orders (placed with `Idempotency-Key` retries, as a careful client
//! would), and one real fault per test. Every test ends the same way:
//! every order terminal, `saga-admin audit` reporting no violation, no
//! (order, event type) published under two event IDs, and no service that
//! exited on its own.
//!
//! Runs one test at a time (each starts about eight processes, a Kafka
//! node among them): [`one_at_a_time`] under `cargo test`, and a test
//! group of one thread under nextest (`.config/nextest.toml`).
//! `CHAOS_ORDERS_PER_SEC` and `CHAOS_SECONDS` scale the load (defaults
//! 20/s for 12 s of load around each fault).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use saga_tests::procs::{Cluster, ClusterOptions};
use saga_tests::Which;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// How long every order gets to end once the fault is over.
const SETTLE: Duration = Duration::from_secs(120);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The kinds of order the load mixes: most confirm, some are declined
/// (over the payment limit), some run out of stock (a SKU with little).
fn order_body(n: usize) -> Value {
    let item = match n % 10 {
        0 => json!({"sku": "CHAOS-RARE", "quantity": 1, "unit_price": "5.00"}),
        1 => json!({"sku": "CHAOS-1", "quantity": 1, "unit_price": "2000.00"}),
        _ => json!({"sku": "CHAOS-1", "quantity": 1, "unit_price": "5.00"}),
    };
    json!({"customer_id": format!("chaos-{}", n % 7), "items": [item]})
}

/// Places orders at a steady rate until stopped; returns their IDs.
struct Load {
    stop: Arc<AtomicBool>,
    task: JoinHandle<anyhow::Result<Vec<String>>>,
}

impl Load {
    fn start(cluster: &Arc<Cluster>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rate: f64 = env_or("CHAOS_ORDERS_PER_SEC", 20.0);
        let every = Duration::from_secs_f64(1.0 / rate.max(0.1));
        let (c, s) = (cluster.clone(), stop.clone());
        let run = format!("{}", uuid::Uuid::new_v4().simple());
        let task = tokio::spawn(async move {
            let mut placing = Vec::new();
            let mut tick = tokio::time::interval(every);
            let mut n = 0usize;
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let c = c.clone();
                let key = format!("{run}-{n}");
                let body = order_body(n);
                // Each order retries on its own (same key) through the
                // fault, so one slow order does not slow the load.
                placing.push(tokio::spawn(async move { c.place(&key, &body).await }));
                n += 1;
            }
            let mut ids = Vec::with_capacity(placing.len());
            for p in placing {
                ids.push(p.await??);
            }
            Ok(ids)
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// Held for the whole of each test, so that two never run at once.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the tests running before this one to end.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

async fn start(replicas: usize) -> anyhow::Result<Arc<Cluster>> {
    start_with(replicas, 1).await
}

/// `CHAOS_ENV` (`NAME=value,NAME=value`): extra environment for every
/// service process.
fn chaos_env() -> Vec<(String, String)> {
    std::env::var("CHAOS_ENV")
        .ok()
        .map(|e| {
            e.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// `replicas` of each service on `brokers` Kafka nodes (1 or 3).
async fn start_with(replicas: usize, brokers: usize) -> anyhow::Result<Arc<Cluster>> {
    let env = chaos_env();
    let cluster = Cluster::start(ClusterOptions {
        replicas,
        brokers,
        env,
        ..ClusterOptions::default()
    })
    .await?;
    cluster.stock("CHAOS-1", 1_000_000).await?;
    cluster.stock("CHAOS-RARE", 20).await?;
    Ok(Arc::new(cluster))
}

/// Load for half of `CHAOS_SECONDS`, then `fault` (under the same load),
/// then load for as long again; then the checks every chaos test ends
/// with. `fault` returns the orders it placed itself, if any.
async fn under_load<F, Fut>(cluster: Arc<Cluster>, fault: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Cluster>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<String>>>,
{
    let phase = Duration::from_secs(env_or("CHAOS_SECONDS", 12u64) / 2);
    let load = Load::start(&cluster);
    tokio::time::sleep(phase).await; // load before the fault, not a wait for state
    let mut placed = fault(cluster.clone()).await?;
    tokio::time::sleep(phase).await; // load after the fault
    placed.extend(load.finish().await?);
    verify(cluster, &placed).await
}

/// Every order terminal, the books clean, no event twice, no service gone.
async fn verify(cluster: Arc<Cluster>, ids: &[String]) -> anyhow::Result<()> {
    if let Err(e) = cluster.wait_all_terminal(ids, SETTLE).await {
        bail!(
            "orders did not all end: {e:#}\n{}\n{}\n{}",
            cluster.logs(25).await,
            cluster.probes().await,
            cluster.groups().await
        );
    }
    // Compensations (refunds) may still be on their way: poll the audit
    // until it is clean, and show what it found if it never is.
    let started = Instant::now();
    let (code, out) = loop {
        let (code, out) = cluster.audit()?;
        if code == 0 || started.elapsed() > Duration::from_secs(60) {
            break (code, out);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let last = out.lines().last().unwrap_or_default().to_owned();
    if code != 0 {
        // An order the deadline ended is terminal even if a consumer is
        // stuck: show the same state as for orders that did not end.
        let lines: Vec<&str> = out.lines().collect();
        let shown = if lines.len() > 21 {
            format!(
                "{}\n… {} more …\n{}",
                lines[..20].join("\n"),
                lines.len() - 21,
                lines[lines.len() - 1]
            )
        } else {
            out.clone()
        };
        bail!(
            "saga-admin audit exited {code}:\n{shown}\n{}\n{}\n{}",
            cluster.logs(25).await,
            cluster.probes().await,
            cluster.groups().await
        );
    }
    anyhow::ensure!(
        last == format!("{} orders audited, 0 violations", ids.len()),
        "audit's last line: {last:?} ({} orders placed)",
        ids.len()
    );
    let events = cluster.check_no_double_events().await?;
    cluster.check_none_exited().await?;
    println!(
        "chaos: {} orders, {events} events, audit: {last}; {}",
        ids.len(),
        cluster.rebalances().await
    );
    Ok(())
}

/// A real `kill -9` of each service in turn, each restarted at once (as a
/// supervisor does): it must take its partitions back and go on, although
/// the broker still counts its dead self as a group member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_each_service_in_turn_under_load() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let cluster = start(1).await?;
    under_load(cluster, |cluster| async move {
        let mut probes = Vec::new();
        for which in [Which::Payment, Which::Inventory, Which::Order] {
            probes.push(kill_and_restart(&cluster, which).await?);
        }
        Ok(probes)
    })
    .await
}

/// `kill -9` of replica 0 of `which`, restarted at once; returns the order
/// placed afterwards to prove the saga goes on.
async fn kill_and_restart(cluster: &Arc<Cluster>, which: Which) -> anyhow::Result<String> {
    {
        let p = cluster.process(which, 0);
        let mut p = p.lock().await;
        p.kill9()?;
        p.restart(&cluster.http).await?;
    }
    let restarted = Instant::now();
    // Orders placed from now on need the restarted replica.
    let order = cluster
        .place(&uuid::Uuid::new_v4().to_string(), &order_body(2))
        .await?;
    match cluster
        .wait_all_terminal(std::slice::from_ref(&order), Duration::from_secs(60))
        .await
    {
        Ok(()) => {
            println!(
                "chaos: {} killed and restarted; an order placed then ended {:.1} s later",
                which.name(),
                restarted.elapsed().as_secs_f64()
            );
            Ok(order)
        }
        Err(e) => bail!(
            "no order completes after {} was killed and restarted: {e:#}\n{}",
            which.name(),
            cluster.logs(25).await
        ),
    }
}

/// Two replicas of every service on one database and one consumer group:
/// one payment replica killed, one inventory replica frozen for longer than
/// the session timeout and then woken (a zombie whose partitions moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_survive_a_killed_and_a_frozen_peer() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let cluster = start(2).await?;
    under_load(cluster, |cluster| async move {
        cluster.process(Which::Payment, 1).lock().await.kill9()?;
        let inventory = cluster.process(Which::Inventory, 1);
        inventory.lock().await.freeze()?;
        tokio::time::sleep(Duration::from_secs(15)).await; // the fault: frozen past the 10 s session timeout
        inventory.lock().await.thaw()?;
        cluster
            .process(Which::Payment, 1)
            .lock()
            .await
            .restart(&cluster.http)
            .await?;
        Ok(Vec::new())
    })
    .await
}

/// PostgreSQL stopped (`pg_ctl -m fast`) under load, down for 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_for_ten_seconds_under_load() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let cluster = start(1).await?;
    under_load(cluster, |cluster| async move {
        cluster.pg.down()?;
        tokio::time::sleep(Duration::from_secs(10)).await; // the fault: the database is away
        cluster.pg.up()?;
        Ok(Vec::new())
    })
    .await
}

/// The database read-only for 10 s, with every session ended, as during a
/// failover: nothing may be dead-lettered, and `/ready` must say why the
/// services cannot work meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_read_only_for_ten_seconds_under_load() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let cluster = start(1).await?;
    under_load(cluster, |cluster| async move {
        cluster.pg.read_only(true).await?;
        let read_only_since = Instant::now();
        // /ready turns 503 while the database takes no writes.
        let mut saw_not_ready = false;
        while read_only_since.elapsed() < Duration::from_secs(10) {
            let req = cluster.http.get(cluster.url(Which::Payment, "/ready"));
            if cluster.send(Which::Payment, req).await?.status == 503 {
                saw_not_ready = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await; // probing during the fault
        }
        cluster.pg.read_only(false).await?;
        anyhow::ensure!(
            saw_not_ready,
            "/ready stayed 200 while the database was read-only"
        );
        Ok(Vec::new())
    })
    .await?;
    Ok(())
}

/// The broker frozen (`SIGSTOP`) for longer than the session timeout:
/// every connection stays open and nothing answers, then every session
/// has expired at once when it wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_frozen_past_the_session_timeout_under_load() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let cluster = start(1).await?;
    under_load(cluster, |cluster| async move {
        cluster.broker.freeze()?;
        tokio::time::sleep(Duration::from_secs(12)).await; // the fault: the broker answers nothing
        cluster.broker.thaw()?;
        Ok(Vec::new())
    })
    .await
}

/// The broker killed (`kill -9`) under load and started again on its log
/// directory: producers and consumers reconnect, the relay's unacknowledged
/// rows are sent again (idempotence and the inbox absorb the copies).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_killed_and_restarted_under_load() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let cluster = start(1).await?;
    under_load(cluster, |cluster| async move {
        cluster.broker.kill9()?;
        let killed = Instant::now();
        cluster.broker.up()?;
        println!(
            "chaos: Kafka killed and answering again {:.1} s later",
            killed.elapsed().as_secs_f64()
        );
        Ok(Vec::new())
    })
    .await
}

/// Two replicas of every service, left alone twice: idle for
/// `CHAOS_IDLE_SECONDS` (default 120) after a transactional write ended
/// `payment-events` with a commit marker (a record no consumer receives,
/// so its offset is never committed), then one inventory replica held for
/// 30 s in a batch behind a row lock while orders keep coming. Kafka keeps
/// the groups as they are, and so must the services: the same members
/// throughout, no rebalance, no partition reported stalled while idle, the
/// other replica's partitions flowing during the lock, and every order
/// ending once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_leave_each_other_alone_when_idle_and_behind_a_row_lock() -> anyhow::Result<()> {
    use sqlx::Connection;
    let _serial = one_at_a_time().await;
    let cluster = start(2).await?;
    let sku = "CHAOS-LOCKED";
    cluster.stock(sku, 1_000).await?;
    let first = cluster.place("before-idle", &order_body(2)).await?;
    cluster
        .wait_all_terminal(std::slice::from_ref(&first), SETTLE)
        .await?;
    end_with_a_transaction_marker(&cluster, &first).await?;
    // Both readers of payment-events took the copy for a duplicate.
    saga_tests::poll(
        Duration::from_millis(100),
        || async {
            let seen = duplicates_seen(&cluster).await?;
            Ok(if seen >= 2.0 { Ok(()) } else { Err(seen) })
        },
        |seen| {
            anyhow::anyhow!(
                "the transactional copy was seen {seen} times as a duplicate, not twice"
            )
        },
    )
    .await?;
    // Each group formed, both replicas in it.
    let members = saga_tests::poll(
        Duration::from_millis(200),
        || async {
            Ok(match cluster.group_members().await {
                Ok(m) if m.len() == 6 => Ok(m),
                Ok(m) => Err(format!("{} members: {m:?}", m.len())),
                Err(e) => Err(format!("{e:#}")),
            })
        },
        |last| anyhow::anyhow!("the groups did not settle with two members each: {last}"),
    )
    .await?;
    let rebalances = cluster.rebalance_counts().await;

    let idle = Duration::from_secs(env_or("CHAOS_IDLE_SECONDS", 120u64));
    let idle_since = Instant::now();
    while idle_since.elapsed() < idle {
        // Idle time is the fault under test; meanwhile nothing may stall.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let stalled = stalled_total(&cluster).await?;
        anyhow::ensure!(
            stalled == 0.0,
            "a partition of an idle, healthy group reported stalled ({stalled} s summed)\n{}",
            cluster.probes().await
        );
    }
    anyhow::ensure!(
        cluster.group_members().await? == members,
        "the groups' members changed while idle:\nbefore {members:?}\n{}",
        cluster.groups().await
    );
    anyhow::ensure!(
        cluster.rebalance_counts().await == rebalances,
        "a rebalance while idle: {}",
        cluster.rebalances().await
    );

    // One inventory replica stuck in a batch behind a row lock.
    let db = cluster
        .pg
        .url(&format!("{}_inventory_service", cluster.prefix));
    let mut blocker = sqlx::PgConnection::connect(&db).await?;
    let mut tx = blocker.begin().await?;
    sqlx::query("SELECT 1 FROM products WHERE sku = $1 FOR UPDATE")
        .bind(sku)
        .execute(&mut *tx)
        .await?;
    let locked_body = json!({"customer_id": "chaos-lock", "items": [
        {"sku": sku, "quantity": 1, "unit_price": "5.00"}
    ]});
    let locked = cluster.place("behind-the-lock", &locked_body).await?;
    let watcher = sqlx::PgPool::connect(&db).await?;
    saga_tests::poll(
        Duration::from_millis(50),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            .fetch_one(&watcher)
            .await?;
            Ok(if waiting > 0 { Ok(()) } else { Err(waiting) })
        },
        |_| anyhow::anyhow!("inventory never reached the locked row"),
    )
    .await?;
    let lock_since = Instant::now();
    let mut during = Vec::new();
    let mut confirmed_during = 0usize;
    let mut n = 0usize;
    while lock_since.elapsed() < Duration::from_secs(30) {
        during.push(
            cluster
                .place(&format!("during-lock-{n}"), &order_body(2))
                .await?,
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await; // a steady trickle of orders
        confirmed_during = count_terminal(&cluster, &during).await?;
    }
    let pending = count_terminal(&cluster, std::slice::from_ref(&locked)).await?;
    tx.rollback().await?;
    anyhow::ensure!(
        pending == 0,
        "the order behind the lock ended while the lock was held"
    );
    anyhow::ensure!(
        confirmed_during > 0,
        "no order placed during the lock ended: the unlocked replica's partitions did not flow\n{}",
        cluster.probes().await
    );
    println!(
        "chaos: {confirmed_during} of {} orders placed during the 30 s lock ended while it was held",
        during.len()
    );
    let mut ids = vec![first, locked];
    ids.extend(during);
    verify(cluster.clone(), &ids).await?;
    anyhow::ensure!(
        cluster.group_members().await? == members,
        "the groups' members changed behind the lock:\nbefore {members:?}\n{}",
        cluster.groups().await
    );
    anyhow::ensure!(
        cluster.rebalance_counts().await == rebalances,
        "a rebalance behind the lock: {}",
        cluster.rebalances().await
    );
    Ok(())
}

/// `saga_consumer_partition_stalled_seconds` summed over every replica.
async fn stalled_total(cluster: &Cluster) -> anyhow::Result<f64> {
    summed(cluster, |text| {
        saga_tests::metric_sum(text, "saga_consumer_partition_stalled_seconds")
    })
    .await
}

/// Events every replica counted as duplicates.
async fn duplicates_seen(cluster: &Cluster) -> anyhow::Result<f64> {
    summed(cluster, |text| {
        let lines: String = text
            .lines()
            .filter(|l| l.contains("outcome=\"duplicate\""))
            .map(|l| format!("{l}\n"))
            .collect();
        saga_tests::metric_sum(&lines, "saga_events_handled_total")
    })
    .await
}

/// `read` of every replica's `/metrics` (two of each service), summed.
async fn summed(cluster: &Cluster, read: impl Fn(&str) -> f64) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for which in [Which::Order, Which::Payment, Which::Inventory] {
        for replica in 0..2 {
            let url = cluster.process(which, replica).lock().await.url("/metrics");
            let text = cluster.http.get(url).send().await?.text().await?;
            total += read(&text);
        }
    }
    Ok(total)
}

/// How many of `ids` have ended.
async fn count_terminal(cluster: &Cluster, ids: &[String]) -> anyhow::Result<usize> {
    let mut ended = 0;
    for id in ids {
        let req = cluster
            .http
            .get(cluster.url(Which::Order, &format!("/orders/{id}")));
        let order = cluster.send(Which::Order, req).await?.body;
        if matches!(
            order["status"].as_str(),
            Some("CONFIRMED" | "FAILED" | "CANCELLED")
        ) {
            ended += 1;
        }
    }
    Ok(ended)
}

/// Sends `order`'s `PaymentSucceeded` again, inside a Kafka transaction, so
/// that `payment-events` ends with a commit marker: the consumers take the
/// copy for the duplicate it is.
async fn end_with_a_transaction_marker(cluster: &Cluster, order: &str) -> anyhow::Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let topic = format!("{}-payment-events", cluster.prefix);
    let brokers = cluster.broker.address();
    let order = order.to_owned();
    tokio::task::spawn_blocking(move || {
        let messages = saga_tests::read_topic_at(&brokers, &topic)?;
        let original = messages
            .iter()
            .find(|m| {
                m.key.as_deref() == Some(order.as_str())
                    && m.header("event_type") == Some("PaymentSucceeded")
            })
            .context("the order's PaymentSucceeded")?;
        let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set(
                "transactional.id",
                format!("chaos-{}", uuid::Uuid::new_v4()),
            )
            .create()?;
        let timeout = Duration::from_secs(30);
        producer.init_transactions(timeout)?;
        producer.begin_transaction()?;
        let headers = original
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                })
            });
        producer
            .send(
                BaseRecord::to(&topic)
                    .key(order.as_str())
                    .payload(&original.payload)
                    .partition(original.partition)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)?;
        producer.commit_transaction(timeout)?;
        Ok::<(), anyhow::Error>(())
    })
    .await?
}

/// Three Kafka nodes (three controller voters; topics with replication
/// factor 3 and `min.insync.replicas=2`; producers `acks=all` and
/// idempotent): under load, `kill -9` of the node that leads the busiest
/// partition of `order-events`, down until its partitions have new leaders
/// and 5 s more, then started again; once it is back in sync, a
/// preferred-leader election moves leadership back to it. Nothing lost, nothing twice, every order final, the books clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_brokers_lose_the_busiest_leader_and_take_it_back_under_load() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let cluster = start_with(1, 3).await?;
    under_load(cluster, |cluster| async move {
        let topic = format!("{}-order-events", cluster.prefix);
        let (partition, leader) = {
            let (brokers, read) = (cluster.broker.address(), topic.clone());
            let messages =
                tokio::task::spawn_blocking(move || saga_tests::read_topic_at(&brokers, &read))
                    .await??;
            let mut per_partition = std::collections::HashMap::<i32, usize>::new();
            for m in &messages {
                *per_partition.entry(m.partition).or_default() += 1;
            }
            let busiest = per_partition
                .into_iter()
                .max_by_key(|&(_, n)| n)
                .map(|(p, _)| p)
                .context("no message on order-events yet")?;
            (busiest, cluster.broker.leader(&topic, busiest)?)
        };
        cluster.broker.kill9_node(leader)?;
        let killed = Instant::now();
        // The controller fences the node once its broker session expires
        // (broker.session.timeout.ms, 9 s) and hands its partitions to
        // in-sync followers.
        let moved_to = saga_tests::poll(
            Duration::from_millis(250),
            || async {
                let now = cluster.broker.leader(&topic, partition)?;
                Ok(if now == leader { Err(now) } else { Ok(now) })
            },
            |_| anyhow::anyhow!("{topic}/{partition} still names the killed node {leader} as its leader"),
        )
        .await?;
        let moved_after = killed.elapsed();
        tokio::time::sleep(Duration::from_secs(5)).await; // the fault goes on: two nodes of three
        cluster.broker.up()?;
        cluster
            .broker
            .elect_preferred_leaders(Duration::from_secs(90))?;
        let back = cluster.broker.leader(&topic, partition)?;
        println!(
            "chaos: node {leader} (leading {topic}/{partition}) killed; leadership moved to node {moved_to} \
             {:.1} s later, and back to node {back} {:.1} s after the kill",
            moved_after.as_secs_f64(),
            killed.elapsed().as_secs_f64()
        );
        anyhow::ensure!(
            back == leader,
            "the preferred-leader election left {topic}/{partition} with node {back}, not node {leader}"
        );
        Ok(Vec::new())
    })
    .await
}

/// A measurement, not a check (run it by name with `--ignored`; see
/// docs/performance.md): the pause orders see when a replica of
/// payment-service leaves its group cleanly (SIGTERM), joins again, and is
/// killed (`kill -9`, not restarted until the end), with two dynamic
/// members per group and steady load. `CHAOS_ENV` picks the membership
/// (`KAFKA_GROUP_PROTOCOL`, `KAFKA_PARTITION_ASSIGNMENT_STRATEGY`). Prints,
/// for the orders created in each phase, the p50 and the worst saga time,
/// from `order-events` (the `OrderCreated` and final events' Kafka
/// timestamps); still ends with every chaos test's checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: cargo test --test chaos -- --ignored --nocapture membership"]
async fn membership_pauses_when_a_replica_leaves_joins_and_dies() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let env = chaos_env();
    let mut env_dynamic = env.clone();
    env_dynamic.push(("KAFKA_GROUP_INSTANCE_ID".into(), String::new()));
    let cluster = Cluster::start(ClusterOptions {
        replicas: 2,
        brokers: 1,
        env: env_dynamic,
        ..ClusterOptions::default()
    })
    .await?;
    cluster.stock("CHAOS-1", 1_000_000).await?;
    cluster.stock("CHAOS-RARE", 20).await?;
    let cluster = Arc::new(cluster);
    let started = Instant::now();
    let load = Load::start(&cluster);
    let phase = Duration::from_secs(12);
    let mut marks = vec![("steady", chrono::Utc::now())];
    tokio::time::sleep(phase).await; // steady load first
    let replica = cluster.process(Which::Payment, 1);
    marks.push(("leaves (SIGTERM)", chrono::Utc::now()));
    replica.lock().await.terminate(Duration::from_secs(15))?;
    tokio::time::sleep(phase).await; // the group without it
    marks.push(("joins again", chrono::Utc::now()));
    replica.lock().await.restart(&cluster.http).await?;
    tokio::time::sleep(phase).await; // the group with it again
    let held = {
        let url = replica.lock().await.url("/metrics");
        let text = cluster.http.get(url).send().await?.text().await?;
        text.lines()
            .filter(|l| l.starts_with("saga_consumer_lag{"))
            .count()
    };
    let described = describe_members(&cluster, "payment-service").await;
    marks.push(("killed (kill -9)", chrono::Utc::now()));
    replica.lock().await.kill9()?;
    tokio::time::sleep(phase + Duration::from_secs(4)).await; // past the session timeout
    let ids = load.finish().await?;
    replica.lock().await.restart(&cluster.http).await?;
    verify(cluster.clone(), &ids).await?;

    let topic = format!("{}-order-events", cluster.prefix);
    let brokers = cluster.broker.address();
    let messages =
        tokio::task::spawn_blocking(move || saga_tests::read_topic_at(&brokers, &topic)).await??;
    let mut created = std::collections::HashMap::new();
    let mut ended = std::collections::HashMap::new();
    for m in &messages {
        let (Some(key), Some(ts)) = (m.key.clone(), m.timestamp_ms) else {
            continue;
        };
        match m.header("event_type") {
            Some("OrderCreated") => {
                created.insert(key, ts);
            }
            Some("OrderConfirmed" | "OrderFailed" | "OrderCancelled") => {
                ended.entry(key).or_insert(ts);
            }
            _ => {}
        }
    }
    let bounds: Vec<i64> = marks.iter().map(|(_, t)| t.timestamp_millis()).collect();
    println!(
        "membership ({}), {} orders over {:.0} s:",
        if env.is_empty() {
            "defaults".to_owned()
        } else {
            env.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        },
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    for (i, (what, _)) in marks.iter().enumerate() {
        let from = bounds[i];
        let to = bounds.get(i + 1).copied().unwrap_or(i64::MAX);
        let mut took: Vec<i64> = created
            .iter()
            .filter(|(_, &c)| c >= from && c < to)
            .filter_map(|(k, &c)| ended.get(k).map(|&e| e - c))
            .collect();
        took.sort_unstable();
        let p50 = took.get(took.len() / 2).copied().unwrap_or_default();
        let worst = took.last().copied().unwrap_or_default();
        println!(
            "  {what:<18} {:>4} orders   p50 {p50:>6} ms   worst {worst:>6} ms",
            took.len()
        );
    }
    println!(
        "  the killed replica reported lag for {held} partitions; {}\n  the group before the kill:\n{described}",
        cluster.rebalances().await
    );
    Ok(())
}

/// `kafka-consumer-groups.sh --describe --members --verbose` of `service`'s
/// group: who holds which partitions.
async fn describe_members(cluster: &Cluster, service: &str) -> String {
    let args = vec![
        "--bootstrap-server".to_owned(),
        cluster.broker.address(),
        "--describe".into(),
        "--members".into(),
        "--verbose".into(),
        "--group".into(),
        format!("{}-{service}", cluster.prefix),
    ];
    saga_tests::kafka_tool("kafka-consumer-groups.sh", args)
        .await
        .unwrap_or_else(|e| format!("{e:#}"))
}

/// A service down for longer than any session timeout while orders keep
/// coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_down_past_the_session_timeout_while_orders_come() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    let cluster = start(1).await?;
    under_load(cluster, |cluster| async move {
        let inventory = cluster.process(Which::Inventory, 0);
        inventory.lock().await.kill9()?;
        tokio::time::sleep(Duration::from_secs(20)).await; // the fault: inventory is gone
        inventory.lock().await.restart(&cluster.http).await?;
        Ok(Vec::new())
    })
    .await
}

/// Shutdown ends within `SHUTDOWN_GRACE_SECS` with exit 0 even when work
/// is stuck: here inventory's consumer waits for a row lock the test
/// holds, so its batch can neither finish nor free its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_exits_zero_within_the_grace_period_with_work_stuck() -> anyhow::Result<()> {
    let _serial = one_at_a_time().await;
    use sqlx::Connection;
    let cluster = start(1).await?;
    let db = cluster
        .pg
        .url(&format!("{}_inventory_service", cluster.prefix));
    let mut blocker = sqlx::PgConnection::connect(&db).await?;
    let mut tx = blocker.begin().await?;
    sqlx::query("SELECT 1 FROM products WHERE sku = 'CHAOS-1' FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    cluster.place("stuck-behind-a-lock", &order_body(2)).await?;
    // Wait until inventory's consumer is blocked on the lock.
    let mut watcher = sqlx::PgConnection::connect(&db).await?;
    let started = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(&mut watcher)
        .await?;
        if waiting > 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "inventory never reached the locked row"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let process = cluster.process(Which::Inventory, 0);
    let (status, took) = process.lock().await.terminate(Duration::from_secs(8))?;
    tx.rollback().await?;
    // SHUTDOWN_GRACE_SECS is 5 in the cluster.
    anyhow::ensure!(
        took <= Duration::from_millis(5_500),
        "shutdown took {took:?}, over the 5 s grace period"
    );
    anyhow::ensure!(status.success(), "exit status {status} after SIGTERM");
    Ok(())
}
