//! The floor: what Apache Kafka and PostgreSQL themselves need for the work
//! of one saga, measured on the same broker and database as the run, at
//! the run's rate (`loadgen --floor`).
//!
//! - **One hop**: an idempotent producer with `acks=all` and `linger.ms` 0
//!   sends a small message; a consumer polling with the services'
//!   `fetch.wait.max.ms` receives it. Both clients are in this process, so
//!   one monotonic clock times it. The topic (`<prefix>bench-floor`) has one
//!   partition and the broker's default replication.
//! - **One durable commit**: an `INSERT` of an envelope-sized JSON row,
//!   committed on its own (one round trip and a WAL flush, with whatever
//!   `fsync`/`synchronous_commit` the server has).
//!
//! A confirmed saga needs at least three hops (`OrderCreated` to payment,
//! `PaymentSucceeded` to inventory, `InventoryReserved` to order) and four
//! commits (the order's, the charge's, the reservation's, the
//! confirmation's): its floor is 3 × hop + 4 × commit. The load generator
//! sees `OrderConfirmed` through a fourth hop, which the floor leaves out,
//! so the ratio is a little stricter than it looks.
//!
//! Both are sent at the rate of the run they precede, for `--floor-for`
//! (the first second is left out: it warms the clients, the connections and
//! the broker's JIT up). Hops and commits run side by side, as they do in
//! the saga, so each sees the other's load on the machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::{summarize, Latency};

/// Left out of the figures: clients connecting, the broker warming up.
const WARM_UP: Duration = Duration::from_secs(1);
/// Longest wait for the last hops and commits after the last send.
const DRAIN: Duration = Duration::from_secs(10);

/// What to measure the floor against.
#[derive(Debug, Clone)]
pub struct FloorConfig {
    pub brokers: String,
    pub topic_prefix: String,
    pub database_url: String,
    /// Hops and commits per second.
    pub rate: f64,
    pub duration: Duration,
    /// The consumer's `fetch.wait.max.ms` (the services').
    pub fetch_wait_ms: u32,
}

/// The floor, measured.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub rate: f64,
    pub hop: Latency,
    pub commit: Latency,
    /// 3 hops + 4 commits, at the p50s.
    pub saga_p50_ms: f64,
    /// 3 hops + 4 commits, at the p99s (an upper estimate: a saga rarely
    /// meets the tail at every step).
    pub saga_p99_ms: f64,
}

impl Floor {
    fn new(rate: f64, hop: Latency, commit: Latency) -> Self {
        let saga = |hop: f64, commit: f64| 3.0 * hop + 4.0 * commit;
        Floor {
            rate,
            saga_p50_ms: saga(hop.p50_ms, commit.p50_ms),
            saga_p99_ms: saga(hop.p99_ms, commit.p99_ms),
            hop,
            commit,
        }
    }

    /// A human-readable summary.
    pub fn render(&self) -> String {
        format!(
            "floor at {}/s   one Kafka hop p50 {:.2} ms · p99 {:.2} ms ({} sent)\n\
             \x20               one durable commit p50 {:.2} ms · p99 {:.2} ms ({} made)\n\
             \x20               saga (3 hops + 4 commits) p50 {:.2} ms · p99 {:.2} ms\n",
            self.rate,
            self.hop.p50_ms,
            self.hop.p99_ms,
            self.hop.count,
            self.commit.p50_ms,
            self.commit.p99_ms,
            self.commit.count,
            self.saga_p50_ms,
            self.saga_p99_ms,
        )
    }
}

/// Measures one hop and one commit at `cfg.rate` for `cfg.duration`.
pub async fn measure(cfg: &FloorConfig) -> anyhow::Result<Floor> {
    let topic = format!("{}bench-floor", cfg.topic_prefix);
    create_topic(&cfg.brokers, &topic).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&cfg.database_url)
        .await
        .context("connecting to the database for the floor")?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_floor (
             id bigserial PRIMARY KEY,
             written_at timestamptz NOT NULL DEFAULT now(),
             body jsonb NOT NULL)",
    )
    .execute(&pool)
    .await
    .context("creating the table bench_floor")?;

    let consumer = hop_consumer(cfg, &topic).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        // As the services' clients (saga_runtime::kafka::client_config).
        .set("socket.nagle.disable", "true")
        .create()
        .context("creating the floor's producer")?;

    let base = Instant::now();
    let measured_from = base + WARM_UP;
    let hops = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let commits = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let sends = (cfg.rate * cfg.duration.as_secs_f64()).round() as u64;

    let receiver = {
        let hops = hops.clone();
        tokio::spawn(async move {
            let mut received = 0u64;
            while received < sends {
                let Ok(msg) = consumer.recv().await else {
                    continue;
                };
                let at = Instant::now();
                received += 1;
                let Some(sent_us) = msg
                    .payload()
                    .and_then(|p| <[u8; 8]>::try_from(p).ok())
                    .map(u64::from_be_bytes)
                else {
                    continue;
                };
                let sent = base + Duration::from_micros(sent_us);
                if sent >= measured_from {
                    let _ = hops
                        .lock()
                        .await
                        .record(at.saturating_duration_since(sent).as_micros() as u64);
                }
            }
        })
    };

    let body = serde_json::json!({
        "event_id": uuid::Uuid::new_v4(),
        "event_type": "PaymentSucceeded",
        "order_id": uuid::Uuid::new_v4(),
        "correlation_id": uuid::Uuid::new_v4(),
        "occurred_at": chrono::Utc::now(),
        "data": {"payment_id": uuid::Uuid::new_v4(), "amount_cents": 12_345, "currency": "EUR"},
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / cfg.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut work = tokio::task::JoinSet::new();
    for _ in 0..sends {
        tick.tick().await;
        let sent_at = Instant::now();
        let stamp = sent_at.duration_since(base).as_micros() as u64;
        let payload = stamp.to_be_bytes();
        // Enqueued now; its delivery report is awaited off the ticker.
        let delivery = producer
            .send_result(FutureRecord::to(&topic).key("floor").payload(&payload[..]))
            .map_err(|(e, _)| e)
            .context("sending a floor message")?;
        work.spawn(async move {
            delivery
                .await
                .context("the floor's producer was dropped")?
                .map_err(|(e, _)| e)
                .context("the broker refused a floor message")?;
            anyhow::Ok(())
        });
        let (pool, body, commits) = (pool.clone(), body.clone(), commits.clone());
        work.spawn(async move {
            let started = Instant::now();
            sqlx::query("INSERT INTO bench_floor (body) VALUES ($1)")
                .bind(&body)
                .execute(&pool)
                .await
                .context("a floor commit")?;
            if started >= measured_from {
                let _ = commits
                    .lock()
                    .await
                    .record(started.elapsed().as_micros() as u64);
            }
            anyhow::Ok(())
        });
        // Keep finished work from piling up.
        while let Some(done) = work.try_join_next() {
            done.context("a floor task panicked")??;
        }
    }
    tokio::time::timeout(DRAIN, async {
        while let Some(done) = work.join_next().await {
            done.context("a floor task panicked")??;
        }
        anyhow::Ok(())
    })
    .await
    .context("the floor's last sends and commits did not finish")??;
    tokio::time::timeout(DRAIN, receiver)
        .await
        .context("not every floor message came back")?
        .context("the floor's receiver panicked")?;
    sqlx::query("TRUNCATE bench_floor")
        .execute(&pool)
        .await
        .context("emptying bench_floor")?;
    pool.close().await;
    let hop = summarize(&*hops.lock().await);
    let commit = summarize(&*commits.lock().await);
    Ok(Floor::new(cfg.rate, hop, commit))
}

async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the floor's admin client")?;
    // -1: the broker's default replication factor.
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin
        .create_topics([&new], &options)
        .await
        .with_context(|| format!("creating topic {topic}"))?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => anyhow::bail!("creating topic {t}: {code}"),
        }
    }
    Ok(())
}

/// A consumer of the floor topic's only partition, from its end.
async fn hop_consumer(cfg: &FloorConfig, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set(
            "group.id",
            format!("loadgen-floor-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", cfg.fetch_wait_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("socket.nagle.disable", "true")
        .create()
        .context("creating the floor's consumer")?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<StreamConsumer> {
        // The topic was just created: its leader may take a moment.
        let started = Instant::now();
        let end = loop {
            match consumer.fetch_watermarks(&topic, 0, Duration::from_secs(5)) {
                Ok((_, high)) => break high,
                Err(_) if started.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).with_context(|| format!("reading the end of {topic}")),
            }
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(end))?;
        consumer.assign(&tpl)?;
        Ok(consumer)
    })
    .await
    .context("the floor's consumer set-up panicked")?
}
