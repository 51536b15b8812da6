//! Kafka clients: one configuration, topic creation, message headers and the
//! classification of producer errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, FutureRecord, Producer as _, ProducerContext,
};

use crate::env::{parsed_in, parsed_with, var, ConfigError};

/// Kafka settings shared by producer, consumer and admin client.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `KAFKA_BROKERS`, comma-separated `host:port` (default `localhost:9092`).
    pub brokers: String,
    /// `KAFKA_TOPIC_PREFIX`: prepended to every topic and consumer group, so
    /// isolated systems (or test runs) can share one broker. Default empty.
    pub topic_prefix: String,
    /// `KAFKA_FETCH_WAIT_MS`: the consumer's `fetch.wait.max.ms` (default
    /// 500, the Java consumer's). Kafka answers a fetch as soon as data
    /// arrives, so this only sets how often an idle consumer asks again:
    /// shorter costs the broker CPU for nothing (docs/performance.md).
    pub fetch_wait_ms: u32,
    /// `KAFKA_PARTITIONS` for topics this service creates (default 3).
    pub partitions: i32,
    /// `KAFKA_REPLICATION_FACTOR` for topics this service creates (default 1).
    pub replication_factor: i32,
    /// `KAFKA_LINGER_MS`: producer batching delay (default 0: the relay
    /// already sends what committed together as one wave, and under load
    /// librdkafka batches what queues behind a request in flight; a
    /// millisecond of linger per hop only added latency, docs/performance.md).
    pub linger_ms: u32,
}

impl KafkaConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            brokers: var("KAFKA_BROKERS").unwrap_or_else(|| "localhost:9092".to_owned()),
            topic_prefix: parsed_with("KAFKA_TOPIC_PREFIX", String::new(), |p| {
                if p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    Ok(())
                } else {
                    Err("only letters, digits, '-', '_' and '.' are allowed".into())
                }
            })?,
            fetch_wait_ms: parsed_in("KAFKA_FETCH_WAIT_MS", 500, 1..=10_000)?,
            partitions: parsed_in("KAFKA_PARTITIONS", 3, 1..=1000)?,
            replication_factor: parsed_in("KAFKA_REPLICATION_FACTOR", 1, 1..=10)?,
            linger_ms: parsed_in("KAFKA_LINGER_MS", 0, 0..=1000)?,
        })
    }

    /// The real name of an (unprefixed) saga topic.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// The consumer group of a service.
    pub fn group_id(&self, service: &str) -> String {
        format!("{}{}", self.topic_prefix, service)
    }
}

/// Base client configuration shared by producer, consumer and admin client.
pub fn client_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id)
        // Keep librdkafka quiet about brokers that come and go; we log ourselves.
        .set("log_level", "4")
        // TCP_NODELAY, as Kafka's Java clients always set it: with Nagle's
        // algorithm a request sent while an earlier one is unanswered waits
        // for that answer (pipelined produce requests, a fetch beside a
        // commit).
        .set("socket.nagle.disable", "true");
    c
}

/// The idempotent producer used by the outbox relay and the dead-letter path.
pub fn producer(cfg: &KafkaConfig, client_id: &str) -> anyhow::Result<EventProducer> {
    let config = client_config(cfg, client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", "30000")
        .clone();
    EventProducer::create(&config).context("creating the Kafka producer")
}

/// How long one call of the delivery thread waits for librdkafka's events.
/// Events are handled the moment they arrive; this only bounds how long the
/// thread outlives the last handle of its producer.
const DELIVERY_POLL: Duration = Duration::from_secs(1);

/// A producer that returns a future per message, like rdkafka's
/// `FutureProducer`, and serves its delivery reports on a thread of its
/// own. `FutureProducer`'s thread polls for 100 ms at a time, and rdkafka
/// rounds the time left down to whole milliseconds, so the last fraction of
/// each call is spent polling with a zero timeout in a loop, the larger
/// part of an idle service's CPU (librdkafka fixed the same rounding in its
/// own loop, librdkafka#4684; figures in docs/performance.md). Polling for
/// a second at a time leaves one such fraction a second. Cheap to clone;
/// the thread ends within [`DELIVERY_POLL`] after the last clone is
/// dropped.
#[derive(Clone)]
pub struct EventProducer {
    base: Arc<BaseProducer<Deliveries>>,
    _running: Arc<Running>,
}

/// Tells the delivery thread to stop once the last handle is dropped.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Hands each delivery report to the future of its message.
pub struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<oneshot::Sender<OwnedDeliveryResult>>;

    fn delivery(&self, result: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        let owned = match result {
            Ok(m) => Ok(Delivery {
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp(),
            }),
            Err((e, m)) => Err((e.clone(), m.detach())),
        };
        // The sender's future may be gone (its caller gave up): nothing to do.
        let _ = tx.send(owned);
    }
}

/// A message's delivery: resolves once the broker acknowledged it or
/// librdkafka gave up (`Err(Canceled)` if the producer went away first).
pub type DeliveryFuture = oneshot::Receiver<OwnedDeliveryResult>;

impl EventProducer {
    /// Creates the producer and starts its delivery thread.
    pub fn create(config: &ClientConfig) -> Result<Self, KafkaError> {
        let base: Arc<BaseProducer<Deliveries>> = Arc::new(config.create_with_context(Deliveries)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopped) = (base.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-deliveries".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    polled.poll(DELIVERY_POLL);
                }
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("starting the delivery thread: {e}"))
            })?;
        Ok(Self {
            base,
            _running: Arc::new(Running(stop)),
        })
    }

    /// Enqueues `record`; the future resolves with its delivery. Fails at
    /// once (with the record back) if librdkafka cannot take it: its queue
    /// is full, or the message is too large.
    #[allow(clippy::result_large_err)] // rdkafka's own `send_result` shape
    pub fn send_result<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let (tx, rx) = oneshot::channel();
        let base = BaseRecord {
            topic: record.topic,
            partition: record.partition,
            payload: record.payload,
            key: record.key,
            timestamp: record.timestamp,
            headers: record.headers,
            delivery_opaque: Box::new(tx),
        };
        self.base.send(base).map(|()| rx).map_err(|(e, r)| {
            (
                e,
                FutureRecord {
                    topic: r.topic,
                    partition: r.partition,
                    payload: r.payload,
                    key: r.key,
                    timestamp: r.timestamp,
                    headers: r.headers,
                },
            )
        })
    }

    /// Sends `record` and waits for its delivery. While librdkafka's queue
    /// is full it tries again for up to `queue_timeout`. On failure the
    /// message comes back when librdkafka reported it.
    pub async fn send<K, P>(
        &self,
        mut record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> Result<Delivery, (KafkaError, Option<OwnedMessage>)>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let deadline = Instant::now() + queue_timeout;
        loop {
            match self.send_result(record) {
                Ok(delivery) => {
                    return match delivery.await {
                        Ok(Ok(d)) => Ok(d),
                        Ok(Err((e, m))) => Err((e, Some(m))),
                        Err(oneshot::Canceled) => Err((KafkaError::Canceled, None)),
                    };
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err((e, None)),
            }
        }
    }

    /// Waits until every message enqueued has been delivered or failed.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.base.flush(timeout)
    }

    /// The librdkafka client (its fatal error, its native handle).
    pub fn client(&self) -> &rdkafka::client::Client<Deliveries> {
        self.base.client()
    }
}

/// Creates every topic in `topics` that does not exist yet. Waits for the
/// broker for up to a minute, so services may start before it is ready.
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg, "saga-admin")
        .create()
        .context("creating the Kafka admin client")?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                cfg.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        let outcome = admin.create_topics(&new_topics, &options).await;
        let err = match outcome {
            Ok(results) => {
                let mut failed = Vec::new();
                for r in results {
                    match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((topic, code)) => failed.push(format!("{topic}: {code}")),
                    }
                }
                if failed.is_empty() {
                    return Ok(());
                }
                anyhow::anyhow!("creating topics failed: {}", failed.join(", "))
            }
            Err(e) => anyhow::Error::new(e).context("creating topics"),
        };
        if started.elapsed() > Duration::from_secs(60) {
            return Err(err.context(format!("Kafka at {} not usable after 60 s", cfg.brokers)));
        }
        tracing::warn!(error = %format!("{err:#}"), "Kafka not ready yet, retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(3));
    }
}

/// Producer failures that retrying the same message does not cure by
/// itself: someone has to change the broker (ACLs, the topic) or the
/// message. The relay and the dead-letter path still retry them, with
/// backoff, since an operator may fix the broker; they only log them louder.
pub fn is_permanent(e: &KafkaError) -> bool {
    is_too_large(e)
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::InvalidRecord
                    | RDKafkaErrorCode::InvalidTopic
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownTopicOrPartition
            )
        )
}

/// The message is larger than the producer or the broker takes.
pub fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// The error that makes a librdkafka client unusable for good (a fenced
/// idempotent producer, a fenced static group member), if one was raised:
/// the process must exit so that its supervisor starts a fresh one.
pub fn fatal_error<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
) -> Option<String> {
    client
        .fatal_error()
        .map(|(code, reason)| format!("{code}: {reason}"))
}

/// `hdrs` with each `(name, value)` pair of `pairs` appended.
pub fn with_headers<'a>(
    mut hdrs: OwnedHeaders,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> OwnedHeaders {
    for (key, value) in pairs {
        hdrs = hdrs.insert(Header {
            key,
            value: Some(value),
        });
    }
    hdrs
}

/// The value of header `name`, as UTF-8, if present.
pub fn header<M: Message>(msg: &M, name: &str) -> Option<String> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Header names on saga messages (defined with the events).
pub use events::headers;

/// A consumer for reading topics outside any group's offsets (operator
/// tools, tests): nothing is committed, and it reports reaching the end of
/// each partition: the high watermark the broker sends with each fetch
/// answer, as of that answer.
fn reader(cfg: &KafkaConfig) -> anyhow::Result<BaseConsumer<ReaderContext>> {
    client_config(cfg, "saga-reader")
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        // A reader goes through a topic once: a small read-ahead (the
        // default is 64 MiB) keeps a large topic out of memory.
        .set("queued.max.messages.kbytes", "8192")
        .create_with_context(ReaderContext)
        .context("creating a Kafka reader")
}

/// The reader's client context. librdkafka hands each end-of-partition
/// event to the context as an error as well as to `poll`; for the reader it
/// is the answer it asked for, so only real errors are logged.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !is_partition_eof(&error) {
            tracing::error!(%error, reason, "Kafka reader error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

fn is_partition_eof(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    )
}

/// Every message in `topic` when the read begins, partition by partition,
/// each in offset order (see [`pages`]), all at once: for topics known to
/// be small (tests). Blocking: call it from `spawn_blocking`. A topic that
/// does not exist reads as empty.
pub fn read_to_end(
    cfg: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    let mut out = Vec::new();
    read_pages(cfg, topic, usize::MAX, timeout, |page| {
        out.extend(page);
        Ok(())
    })?;
    Ok(out)
}

/// Every message in `topic` when the read begins (what is written after
/// is left out, so a caller that writes back into the topic does not read
/// its own writes), in pages of about `page_bytes` (keys and values; a
/// page holds at least one message), partition by partition and each
/// partition in offset order: the caller holds a page at a time
/// however large the topic is, and a reader thread reads at most one page
/// ahead. A topic that does not exist reads as empty. `timeout` bounds a
/// wait without progress, not the whole read. Call from within a Tokio
/// runtime.
pub fn pages(
    cfg: &KafkaConfig,
    topic: &str,
    page_bytes: usize,
    timeout: Duration,
) -> tokio::sync::mpsc::Receiver<anyhow::Result<Vec<rdkafka::message::OwnedMessage>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let (cfg, topic) = (cfg.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let sent = read_pages(&cfg, &topic, page_bytes, timeout, |page| {
            tx.blocking_send(Ok(page))
                .map_err(|_| anyhow::anyhow!("the reader of {topic} went away"))
        });
        if let Err(e) = sent {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// [`pages`], handing each page to `page` on this (blocking) thread.
fn read_pages(
    cfg: &KafkaConfig,
    topic: &str,
    page_bytes: usize,
    timeout: Duration,
    mut page: impl FnMut(Vec<rdkafka::message::OwnedMessage>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use rdkafka::consumer::Consumer;
    let consumer = reader(cfg)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let mut partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    partitions.sort_unstable();
    for partition in partitions {
        // Where the partition ends now: the read stops there.
        let (low, end) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .with_context(|| format!("reading where {topic}/{partition} ends"))?;
        if end <= low {
            continue;
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let (mut held, mut bytes) = (Vec::new(), 0usize);
        let mut progress = Instant::now();
        loop {
            if progress.elapsed() > timeout {
                anyhow::bail!("{topic}/{partition}: no progress for {timeout:?}");
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) if m.partition() == partition => {
                    progress = Instant::now();
                    if m.offset() >= end {
                        break;
                    }
                    bytes += m.payload_len() + m.key().map_or(0, <[u8]>::len);
                    let last = m.offset() + 1 >= end;
                    held.push(m.detach());
                    if last {
                        break;
                    }
                    if bytes >= page_bytes {
                        page(std::mem::take(&mut held))?;
                        bytes = 0;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition => break,
                Some(Ok(_)) | Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                Some(Err(e)) => {
                    return Err(
                        anyhow::Error::new(e).context(format!("reading {topic}/{partition}"))
                    )
                }
            }
        }
        if !held.is_empty() {
            page(held)?;
        }
    }
    Ok(())
}

/// The message at `offset` of `topic`/`partition`, if it is still there.
/// Blocking: call it from `spawn_blocking`.
pub fn read_one(
    cfg: &KafkaConfig,
    topic: &str,
    partition: i32,
    offset: i64,
    timeout: Duration,
) -> anyhow::Result<Option<rdkafka::message::OwnedMessage>> {
    use rdkafka::consumer::Consumer;
    let consumer = reader(cfg)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let started = Instant::now();
    while started.elapsed() < timeout {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.offset() == offset => return Ok(Some(m.detach())),
            // Gone (retention): the first message left comes after it.
            Some(Ok(_)) | Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange))) => {
                return Ok(None)
            }
            Some(Err(e)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("reading {topic}/{partition}@{offset}"))
                )
            }
            None => {}
        }
    }
    anyhow::bail!("{topic}/{partition}@{offset}: no answer within {timeout:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_end_of_a_partition_is_quiet_in_the_reader() {
        assert!(is_partition_eof(&KafkaError::PartitionEOF(3)));
        assert!(is_partition_eof(&KafkaError::Global(
            RDKafkaErrorCode::PartitionEOF
        )));
        assert!(!is_partition_eof(&KafkaError::Global(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!is_partition_eof(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::OffsetOutOfRange
        )));
    }
}
