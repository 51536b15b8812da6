//! Where a saga's time goes, hop by hop (`loadgen --hops`).
//!
//! After a run, the three event topics are read back from where they ended
//! when the run began. Every event carries two clocks: `occurred_at`, set by
//! the handler that created it (inside its transaction), and the Kafka
//! message timestamp, set when the outbox relay hands it to the producer
//! after the commit. For the orders that were confirmed, the path
//! `OrderCreated → PaymentSucceeded → InventoryReserved → OrderConfirmed`
//! splits into legs whose medians add up to roughly the end-to-end median:
//!
//! - *handler → relay sends*: the rest of the handler's transaction, its
//!   commit and the hand-over to the relay;
//! - *relay sends → next handler*: the producer's linger, the produce
//!   request, the broker, the next consumer's fetch, and that consumer's
//!   loop up to the handler (transaction start, inbox, row lock).
//!
//! All clocks are this machine's (run the load generator beside the
//! services, or on hosts whose clocks agree). Kafka timestamps have
//! millisecond resolution, so each leg is good to about a millisecond;
//! negative differences that rounding produces count as zero.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, TopicPartitionList};
use serde::Serialize;

use crate::{summarize, Config, Latency};

/// The topics read back, without prefix.
const TOPICS: [&str; 3] = ["order-events", "payment-events", "inventory-events"];
/// The confirmed path, event by event.
const PATH: [&str; 4] = [
    "OrderCreated",
    "PaymentSucceeded",
    "InventoryReserved",
    "OrderConfirmed",
];
/// Longest wait for the topics to be read back to where they ended.
const READ_BACK: Duration = Duration::from_secs(60);

/// One leg of the confirmed path.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    pub leg: String,
    #[serde(flatten)]
    pub latency: Latency,
}

/// Where each partition of the event topics ended before the run (events
/// read from there that belong to no order of this run are skipped).
pub struct Marks(TopicPartitionList);

/// One event as read back: its two clocks, in microseconds since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub occurred_us: i64,
    pub sent_us: i64,
}

fn consumer(cfg: &Config) -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("loadgen-hops-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .context("creating the consumer that reads the event topics back")
}

/// Notes where the event topics end, before the run starts.
pub async fn mark(cfg: &Config) -> anyhow::Result<Marks> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        let c = consumer(&cfg)?;
        let topics: Vec<String> = TOPICS
            .iter()
            .map(|t| format!("{}{t}", cfg.topic_prefix))
            .collect();
        Ok(Marks(crate::topic_ends(&c, &topics)?))
    })
    .await?
}

/// Reads back the events written since `marks` for `orders`, by order ID,
/// up to the end of each partition as the broker's fetch answers give it
/// (one topic at a time: the end-of-partition signal names no topic).
async fn read_back(
    cfg: &Config,
    marks: Marks,
    orders: std::collections::HashSet<String>,
) -> anyhow::Result<HashMap<String, HashMap<String, Seen>>> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        let mut seen: HashMap<String, HashMap<String, Seen>> = HashMap::new();
        let started = std::time::Instant::now();
        for name in TOPICS {
            let topic = format!("{}{name}", cfg.topic_prefix);
            let mut tpl = TopicPartitionList::new();
            for e in marks.0.elements_for_topic(&topic) {
                tpl.add_partition_offset(&topic, e.partition(), e.offset())?;
            }
            let mut unfinished: std::collections::HashSet<i32> =
                tpl.elements().iter().map(|e| e.partition()).collect();
            let c = consumer(&cfg)?;
            c.assign(&tpl)
                .with_context(|| format!("assigning {topic}"))?;
            while !unfinished.is_empty() {
                if started.elapsed() > READ_BACK {
                    anyhow::bail!(
                        "reading the event topics back took over {} s ({topic}: partitions {unfinished:?} unfinished)",
                        READ_BACK.as_secs(),
                    );
                }
                let msg = match c.poll(Duration::from_millis(200)) {
                    None => continue,
                    Some(Err(KafkaError::PartitionEOF(p))) => {
                        unfinished.remove(&p);
                        continue;
                    }
                    Some(Err(e)) => {
                        return Err(anyhow::Error::new(e).context(format!("reading {topic} back")))
                    }
                    Some(Ok(m)) => m,
                };
                if let Some((order, event_type, at)) = clocks(&msg, &orders) {
                    seen.entry(order).or_default().insert(event_type, at);
                }
            }
        }
        Ok(seen)
    })
    .await?
}

/// The order, type and clocks of an event of one of `orders`.
fn clocks(
    msg: &rdkafka::message::BorrowedMessage<'_>,
    orders: &std::collections::HashSet<String>,
) -> Option<(String, String, Seen)> {
    let sent_ms = msg.timestamp().to_millis()?;
    let v: serde_json::Value = serde_json::from_slice(msg.payload()?).ok()?;
    let order = v["order_id"].as_str()?;
    if !orders.contains(order) {
        return None;
    }
    let occurred = chrono::DateTime::parse_from_rfc3339(v["occurred_at"].as_str()?).ok()?;
    Some((
        order.to_owned(),
        v["event_type"].as_str()?.to_owned(),
        Seen {
            occurred_us: occurred.timestamp_micros(),
            sent_us: sent_ms * 1000,
        },
    ))
}

/// The legs of the confirmed path over `orders` (ID → POST sent and final
/// event seen, microseconds since the epoch) whose events were all seen.
pub fn legs(
    orders: &HashMap<String, (i64, i64)>,
    seen: &HashMap<String, HashMap<String, Seen>>,
) -> anyhow::Result<Vec<Leg>> {
    let names = [
        "order-service: POST sent → relay sends OrderCreated".to_owned(),
        "relay sends → payment-service handler".to_owned(),
        "payment-service: handler → relay sends PaymentSucceeded".to_owned(),
        "relay sends → inventory-service handler".to_owned(),
        "inventory-service: handler → relay sends InventoryReserved".to_owned(),
        "relay sends → order-service handler".to_owned(),
        "order-service: handler → relay sends OrderConfirmed".to_owned(),
        "relay sends → load generator sees OrderConfirmed".to_owned(),
    ];
    let mut hists = names
        .iter()
        .map(|_| Histogram::<u64>::new(3))
        .collect::<Result<Vec<_>, _>>()?;
    for (order, &(posted_us, done_us)) in orders {
        let Some(events) = seen.get(order) else {
            continue;
        };
        let Some(path) = PATH
            .iter()
            .map(|e| events.get(*e).copied())
            .collect::<Option<Vec<Seen>>>()
        else {
            continue;
        };
        let mut points = vec![posted_us];
        for (i, e) in path.iter().enumerate() {
            // The order's own POST is its first event's "handler".
            if i > 0 {
                points.push(e.occurred_us);
            }
            points.push(e.sent_us);
        }
        points.push(done_us);
        for (h, pair) in hists.iter_mut().zip(points.windows(2)) {
            let _ = h.record(u64::try_from(pair[1] - pair[0]).unwrap_or(0));
        }
    }
    Ok(names
        .into_iter()
        .zip(&hists)
        .map(|(leg, h)| Leg {
            leg,
            latency: summarize(h),
        })
        .collect())
}

/// Reads the events of `orders` back and splits their time into legs.
pub async fn breakdown(
    cfg: &Config,
    marks: Marks,
    orders: &HashMap<String, (i64, i64)>,
) -> anyhow::Result<Vec<Leg>> {
    let ids = orders.keys().cloned().collect();
    let seen = read_back(cfg, marks, ids).await?;
    legs(orders, &seen)
}

/// The legs as a table.
pub fn render(legs: &[Leg]) -> String {
    let width = legs
        .iter()
        .map(|l| l.leg.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "where the time goes (confirmed orders, {} seen whole; Kafka timestamps are whole ms)\n",
        legs.first().map_or(0, |l| l.latency.count)
    );
    for l in legs {
        out += &format!(
            "  {:<width$}  p50 {:>7.2} ms · p90 {:>7.2} ms · p99 {:>7.2} ms\n",
            l.leg, l.latency.p50_ms, l.latency.p90_ms, l.latency.p99_ms,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(occurred_us: i64, sent_us: i64) -> Seen {
        Seen {
            occurred_us,
            sent_us,
        }
    }

    #[test]
    fn legs_split_the_confirmed_path_and_skip_incomplete_orders() {
        let mut orders = HashMap::new();
        orders.insert("a".to_owned(), (0, 30_000));
        orders.insert("b".to_owned(), (0, 99_000));
        let mut events = HashMap::new();
        let a: HashMap<String, Seen> = [
            ("OrderCreated", seen(1_000, 2_000)),
            ("PaymentSucceeded", seen(8_000, 9_000)),
            ("InventoryReserved", seen(15_000, 17_000)),
            // The Kafka timestamp rounded down below the handler's clock.
            ("OrderConfirmed", seen(24_500, 24_000)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        events.insert("a".to_owned(), a);
        // "b" was declined: no InventoryReserved, so it is left out.
        events.insert(
            "b".to_owned(),
            [("OrderCreated".to_owned(), seen(1_000, 2_000))]
                .into_iter()
                .collect(),
        );
        let legs = legs(&orders, &events).unwrap();
        let want = [2.0, 6.0, 1.0, 6.0, 2.0, 7.5, 0.0, 6.0];
        for (l, w) in legs.iter().zip(want) {
            // The histogram keeps three significant digits.
            assert!(
                (l.latency.p50_ms - w).abs() < 0.01,
                "{}: {} ms, want {w}",
                l.leg,
                l.latency.p50_ms
            );
            assert_eq!(l.latency.count, 1, "{}", l.leg);
        }
        assert_eq!(legs.len(), want.len());
    }
}
