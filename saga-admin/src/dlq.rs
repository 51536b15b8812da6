//! Dead letters: list them, show one, and redrive them to the topic they
//! came from once the cause is fixed.
//!
//! A dead letter is a copy of the failed message (key, value, headers) with
//! `dlq.*` headers saying where it came from and why it failed (see
//! `saga_runtime::consumer`). A redrive produces the original key, value
//! and headers again to the original topic, without the `dlq.*` failure
//! headers and with `dlq.redriven_from` (`<dlq topic>/<partition>@<offset>`)
//! and `dlq.redriven_at`. The consumers' inbox absorbs an event that was
//! applied before; a message that fails again is dead-lettered again.
//!
//! What was redriven is remembered in a topic of its own,
//! `<prefix>saga-admin.redrives` (one record per dead letter, keyed by its
//! position). It lives in the broker beside the dead-letter topics it
//! describes, with the same durability and the same lifetime, so it
//! survives a restart of the tool, and another operator on another machine
//! sees it too. A record is written only once the broker has acknowledged
//! the redriven message: a crash in between leaves a message redriven and
//! not recorded, which a second redrive would repeat, and the consumers'
//! inbox absorbs.
//!
//! Topics are read a page at a time (about [`PAGE_BYTES`]): `list`,
//! `show` and `redrive` hold one page of dead letters, whatever the size of
//! the topic, and the redrive ledger is kept as a small index (position to
//! time), not as its messages.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use saga_runtime::kafka::EventProducer;
use saga_runtime::kafka::{self, headers};
use saga_runtime::KafkaConfig;
use serde::{Deserialize, Serialize};

/// A read of a topic that makes no progress this long fails.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// About how much of a topic (keys and values) is held at once.
pub const PAGE_BYTES: usize = 4 << 20;
/// The (unprefixed) topic that remembers redrives.
pub const REDRIVES_TOPIC: &str = "saga-admin.redrives";
/// Header on a redriven message: the dead letter it came from.
pub const REDRIVEN_FROM: &str = events::headers::REDRIVEN_FROM;
/// Header on a redriven message: when it was redriven (RFC 3339).
pub const REDRIVEN_AT: &str = events::headers::REDRIVEN_AT;

/// Where a message is: `topic/partition@offset`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    /// `topic/partition@offset`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not <topic>/<partition>@<offset>");
        let (topic, rest) = s.rsplit_once('/').ok_or_else(bad)?;
        let (partition, offset) = rest.split_once('@').ok_or_else(bad)?;
        Ok(Self {
            topic: topic.to_owned(),
            partition: partition.parse().map_err(|_| bad())?,
            offset: offset.parse().map_err(|_| bad())?,
        })
    }
}

/// One dead letter, as its headers and value tell.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Where the dead letter is.
    pub at: Position,
    /// Where the failed message was (`dlq.original.*`).
    pub original: Option<Position>,
    /// The service that gave up on it (`dlq.consumer`).
    pub consumer: Option<String>,
    pub reason: Option<String>,
    pub failed_at: Option<DateTime<Utc>>,
    pub key: Option<String>,
    /// From the value, when it parses as an envelope.
    pub order_id: Option<String>,
    pub event_type: Option<String>,
    pub event_id: Option<String>,
    /// Sent without its value (too large); the original is at `original`.
    pub truncated: bool,
    /// When it was redriven, if it was.
    pub redriven_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    message: OwnedMessage,
}

impl DeadLetter {
    fn of(message: OwnedMessage) -> Self {
        let h = |name: &str| kafka::header(&message, name);
        let original = match (
            h(headers::DLQ_TOPIC),
            h(headers::DLQ_PARTITION).and_then(|p| p.parse().ok()),
            h(headers::DLQ_OFFSET).and_then(|o| o.parse().ok()),
        ) {
            (Some(topic), Some(partition), Some(offset)) => Some(Position {
                topic,
                partition,
                offset,
            }),
            _ => None,
        };
        let envelope: Option<serde_json::Value> = message
            .payload()
            .and_then(|p| serde_json::from_slice(p).ok());
        let field = |name: &str| {
            envelope
                .as_ref()
                .and_then(|v| v.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        Self {
            at: Position {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
            },
            original,
            consumer: h(headers::DLQ_CONSUMER),
            reason: h(headers::DLQ_REASON),
            failed_at: h(headers::DLQ_FAILED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            order_id: field("order_id"),
            event_type: field("event_type").or_else(|| h(headers::EVENT_TYPE)),
            event_id: field("event_id").or_else(|| h(headers::EVENT_ID)),
            truncated: h(headers::DLQ_TRUNCATED).as_deref() == Some("true"),
            redriven_at: None,
            message,
        }
    }

    /// Marked with its redrive in `ledger`, if it had one.
    fn with_redrive(mut self, ledger: &Ledger) -> Self {
        self.redriven_at = ledger.get(&self.at).map(|r| r.redriven_at);
        self
    }

    /// The headers, key and value, for `dlq show`.
    pub fn dump(&self) -> String {
        let mut out = format!("dead letter {}\n", self.at);
        out.push_str("headers:\n");
        if let Some(hs) = self.message.headers() {
            for h in hs.iter() {
                let v = h
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_else(|| "(null)".to_owned());
                out.push_str(&format!("  {}: {v}\n", h.key));
            }
        }
        out.push_str(&format!(
            "key: {}\n",
            self.key.as_deref().unwrap_or("(none)")
        ));
        let value = match self.message.payload() {
            None => "(none)".to_owned(),
            Some(p) => match serde_json::from_slice::<serde_json::Value>(p) {
                Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                Err(_) => String::from_utf8_lossy(p).into_owned(),
            },
        };
        out.push_str(&format!("value:\n{value}\n"));
        if let Some(at) = self.redriven_at {
            out.push_str(&format!("redriven at {}\n", at.to_rfc3339()));
        }
        out
    }

    /// One line for `dlq list`.
    pub fn line(&self) -> String {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        format!(
            "{}  from {}  consumer={}  failed_at={}  order={}  event={}{}{}  reason: {}",
            self.at,
            self.original
                .as_ref()
                .map(Position::to_string)
                .unwrap_or_else(|| "-".to_owned()),
            opt(&self.consumer),
            self.failed_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "-".to_owned()),
            self.order_id
                .clone()
                .or_else(|| self.key.clone())
                .unwrap_or_else(|| "-".to_owned()),
            opt(&self.event_type),
            if self.truncated { "  (truncated)" } else { "" },
            self.redriven_at
                .map(|t| format!("  redriven_at={}", t.to_rfc3339()))
                .unwrap_or_default(),
            opt(&self.reason),
        )
    }
}

/// Which dead letters a command is about. Every given filter must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The original topic, unprefixed (`order-events`); `None`: all three.
    pub topic: Option<String>,
    pub consumer: Option<String>,
    /// A piece of the reason (case-insensitive).
    pub reason: Option<String>,
    /// The order ID (the message key, or the envelope's `order_id`).
    pub order: Option<String>,
    /// Failed at or after this time.
    pub since: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        let consumer = self
            .consumer
            .as_ref()
            .is_none_or(|c| d.consumer.as_deref() == Some(c.as_str()));
        let reason = self.reason.as_ref().is_none_or(|r| {
            d.reason
                .as_deref()
                .is_some_and(|why| why.to_lowercase().contains(&r.to_lowercase()))
        });
        let order = self.order.as_ref().is_none_or(|o| {
            d.key.as_deref() == Some(o.as_str()) || d.order_id.as_deref() == Some(o.as_str())
        });
        let since = self
            .since
            .is_none_or(|t| d.failed_at.is_some_and(|at| at >= t));
        consumer && reason && order && since
    }
}

/// Parses `--since`: an RFC 3339 time, or a duration back from now (`1h`).
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration such as 1h"))?;
    chrono::Duration::from_std(ago)
        .map(|d| Utc::now() - d)
        .map_err(|e| e.to_string())
}

/// The dead-letter topics of the saga, and the broker.
pub struct DeadLetters {
    cfg: KafkaConfig,
}

/// What a redrive did, or would do, with one dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Redriven {
    pub from: Position,
    /// Where the message went (`None` in a dry run or when skipped).
    pub to: Option<Position>,
    /// `redriven`, `would redrive`, or why it was skipped.
    pub outcome: String,
}

/// A redrive's producer and ledger.
struct RedriveRun {
    producer: EventProducer,
    ledger_topic: String,
    ledger: Ledger,
}

/// What was redriven, by dead-letter position: the latest record of each.
type Ledger = HashMap<Position, Record>;

/// One record of the redrive ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    from: Position,
    to: Position,
    redriven_at: DateTime<Utc>,
    forced: bool,
}

impl DeadLetters {
    pub fn new(cfg: KafkaConfig) -> Self {
        Self { cfg }
    }

    /// The real name of a dead-letter topic given as `order-events`,
    /// `order-events.dlq`, or already prefixed.
    pub fn dlq_topic(&self, name: &str) -> String {
        let name = name
            .strip_suffix(events::topics::DLQ_SUFFIX)
            .unwrap_or(name);
        let full = if self.cfg.topic_prefix.is_empty() || name.starts_with(&self.cfg.topic_prefix) {
            name.to_owned()
        } else {
            self.cfg.topic(name)
        };
        events::topics::dlq(&full)
    }

    fn topics(&self, filter: &Filter) -> Vec<String> {
        match &filter.topic {
            Some(t) => vec![self.dlq_topic(t)],
            None => events::topics::ALL
                .iter()
                .map(|t| events::topics::dlq(&self.cfg.topic(t)))
                .collect(),
        }
    }

    /// The messages of `topic`, a page at a time.
    fn pages(&self, topic: &str) -> tokio::sync::mpsc::Receiver<anyhow::Result<Vec<OwnedMessage>>> {
        kafka::pages(&self.cfg, topic, PAGE_BYTES, READ_TIMEOUT)
    }

    /// What was redriven, by dead-letter position (the latest record).
    async fn ledger(&self) -> anyhow::Result<Ledger> {
        let mut out = HashMap::new();
        let mut pages = self.pages(&self.cfg.topic(REDRIVES_TOPIC));
        while let Some(page) = pages.recv().await {
            for m in page? {
                let Some(r) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<Record>(p).ok())
                else {
                    continue;
                };
                out.insert(r.from.clone(), r);
            }
        }
        Ok(out)
    }

    /// Hands `each` the dead letters that match `filter`, in position order
    /// (topic, partition, offset), each marked with its redrive if it had
    /// one, reading a page at a time; returns how many matched.
    pub async fn list_each(
        &self,
        filter: &Filter,
        mut each: impl FnMut(DeadLetter),
    ) -> anyhow::Result<usize> {
        let ledger = self.ledger().await?;
        let mut matched = 0;
        self.each_matching(filter, &ledger, async |d| {
            matched += 1;
            each(d);
        })
        .await?;
        Ok(matched)
    }

    /// Hands `each` the dead letters that match `filter`, in position order
    /// (topic, partition, offset), each marked with its redrive in `ledger`
    /// if it had one, reading a page at a time.
    async fn each_matching(
        &self,
        filter: &Filter,
        ledger: &Ledger,
        mut each: impl AsyncFnMut(DeadLetter),
    ) -> anyhow::Result<()> {
        let mut topics = self.topics(filter);
        topics.sort();
        for topic in topics {
            let mut pages = self.pages(&topic);
            while let Some(page) = pages.recv().await {
                for m in page? {
                    let d = DeadLetter::of(m).with_redrive(ledger);
                    if filter.matches(&d) {
                        each(d).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// [`DeadLetters::list_each`], collected (for a caller that wants them
    /// all at once).
    pub async fn list(&self, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        self.list_each(filter, |d| out.push(d)).await?;
        Ok(out)
    }

    /// The dead letters at `offset` of `topic` (one per partition holding
    /// that offset), or only in `partition`.
    pub async fn show(
        &self,
        topic: &str,
        partition: Option<i32>,
        offset: i64,
    ) -> anyhow::Result<Vec<DeadLetter>> {
        let topic = self.dlq_topic(topic);
        let ledger = self.ledger().await?;
        let mut found = Vec::new();
        let mut pages = self.pages(&topic);
        while let Some(page) = pages.recv().await {
            for m in page? {
                if m.offset() == offset && partition.is_none_or(|p| m.partition() == p) {
                    found.push(DeadLetter::of(m).with_redrive(&ledger));
                }
            }
        }
        Ok(found)
    }

    /// Redrives `letters` (see the module docs). A dead letter redriven
    /// before is skipped unless `force`; `dry_run` only says what would
    /// happen. `progress` is told after each one.
    pub async fn redrive(
        &self,
        letters: &[DeadLetter],
        force: bool,
        dry_run: bool,
        mut progress: impl FnMut(&Redriven),
    ) -> anyhow::Result<Vec<Redriven>> {
        let run = self.redrive_run(dry_run).await?;
        let mut done = Vec::with_capacity(letters.len());
        for d in letters {
            let outcome = self.redrive_letter(&run, d, force, dry_run).await;
            progress(&outcome);
            done.push(outcome);
        }
        Ok(done)
    }

    /// Redrives every dead letter that matches `filter`, as
    /// [`DeadLetters::redrive`] does, reading a page at a time.
    pub async fn redrive_matching(
        &self,
        filter: &Filter,
        force: bool,
        dry_run: bool,
        mut progress: impl FnMut(&Redriven),
    ) -> anyhow::Result<Vec<Redriven>> {
        let run = self.redrive_run(dry_run).await?;
        let mut done = Vec::new();
        self.each_matching(filter, &run.ledger, async |d| {
            let outcome = self.redrive_letter(&run, &d, force, dry_run).await;
            progress(&outcome);
            done.push(outcome);
        })
        .await?;
        Ok(done)
    }

    /// What a redrive needs: a producer, the ledger topic (created unless
    /// a dry run) and the ledger as it is now.
    async fn redrive_run(&self, dry_run: bool) -> anyhow::Result<RedriveRun> {
        let producer = kafka::producer(&self.cfg, "saga-admin")?;
        let ledger_topic = self.cfg.topic(REDRIVES_TOPIC);
        if !dry_run {
            kafka::ensure_topics(&self.cfg, std::slice::from_ref(&ledger_topic)).await?;
        }
        Ok(RedriveRun {
            producer,
            ledger: self.ledger().await?,
            ledger_topic,
        })
    }

    /// Redrives one dead letter, or says why not.
    async fn redrive_letter(
        &self,
        run: &RedriveRun,
        d: &DeadLetter,
        force: bool,
        dry_run: bool,
    ) -> Redriven {
        let (producer, ledger_topic, ledger) = (&run.producer, &run.ledger_topic, &run.ledger);
        {
            let skip = |why: String| Redriven {
                from: d.at.clone(),
                to: None,
                outcome: why,
            };
            let outcome = if let (Some(before), false) = (ledger.get(&d.at), force) {
                skip(format!(
                    "skipped: redriven before at {} (to {}); --force to redrive again",
                    before.redriven_at.to_rfc3339(),
                    before.to
                ))
            } else if let Some(original) = &d.original {
                if dry_run {
                    skip(format!("would redrive to {}", original.topic))
                } else {
                    match self
                        .redrive_one(producer, ledger_topic, d, original, force)
                        .await
                    {
                        Ok(to) => Redriven {
                            from: d.at.clone(),
                            to: Some(to),
                            outcome: "redriven".to_owned(),
                        },
                        Err(e) => skip(format!("failed: {e:#}")),
                    }
                }
            } else {
                skip("skipped: no dlq.original.* headers say where it came from".to_owned())
            };
            outcome
        }
    }

    async fn redrive_one(
        &self,
        producer: &EventProducer,
        ledger_topic: &str,
        d: &DeadLetter,
        original: &Position,
        forced: bool,
    ) -> anyhow::Result<Position> {
        // A copy sent without its value points at the original, which its
        // topic may still hold.
        let source = if d.truncated {
            let (cfg, o) = (self.cfg.clone(), original.clone());
            tokio::task::spawn_blocking(move || {
                kafka::read_one(&cfg, &o.topic, o.partition, o.offset, READ_TIMEOUT)
            })
            .await??
            .with_context(|| {
                format!("its value was too large for the dead-letter topic, and the original at {original} is gone")
            })?
        } else {
            d.message.clone()
        };
        let now = Utc::now();
        let from = d.at.to_string();
        let at = now.to_rfc3339();
        let mut hdrs = OwnedHeaders::new();
        if let Some(hs) = source.headers() {
            for h in hs.iter().filter(|h| !is_failure_header(h.key)) {
                hdrs = hdrs.insert(h);
            }
        }
        let hdrs = hdrs
            .insert(Header {
                key: REDRIVEN_FROM,
                value: Some(from.as_str()),
            })
            .insert(Header {
                key: REDRIVEN_AT,
                value: Some(at.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&original.topic).headers(hdrs);
        if let Some(k) = source.key() {
            record = record.key(k);
        }
        if let Some(p) = source.payload() {
            record = record.payload(p);
        }
        let delivered = producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::Error::new(e).context("producing to the original topic"))?;
        let to = Position {
            topic: original.topic.clone(),
            partition: delivered.partition,
            offset: delivered.offset,
        };
        let entry = serde_json::to_vec(&Record {
            from: d.at.clone(),
            to: to.clone(),
            redriven_at: now,
            forced,
        })?;
        producer
            .send(
                FutureRecord::to(ledger_topic).key(&from).payload(&entry),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| {
                anyhow::Error::new(e).context(format!(
                    "redriven to {to}, but recording it in {ledger_topic} failed"
                ))
            })?;
        Ok(to)
    }
}

/// The headers a consumer adds when it dead-letters a message, and those
/// of an earlier redrive; a redrive leaves them behind (a new failure adds
/// fresh ones).
fn is_failure_header(key: &str) -> bool {
    key.starts_with("dlq.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip() {
        let p: Position = "t-order-events.dlq/2@41".parse().unwrap();
        assert_eq!(
            p,
            Position {
                topic: "t-order-events.dlq".into(),
                partition: 2,
                offset: 41
            }
        );
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        assert!("order-events.dlq@41".parse::<Position>().is_err());
        assert!("order-events.dlq/x@1".parse::<Position>().is_err());
    }

    #[test]
    fn failure_headers_are_left_behind() {
        for k in [
            "dlq.reason",
            "dlq.consumer",
            "dlq.original.topic",
            "dlq.truncated",
            REDRIVEN_FROM,
            REDRIVEN_AT,
        ] {
            assert!(is_failure_header(k), "{k}");
        }
        for k in ["event_type", "event_id", "traceparent", "correlation_id"] {
            assert!(!is_failure_header(k), "{k}");
        }
    }

    #[test]
    fn since_takes_a_time_or_a_duration() {
        let t = parse_since("2026-12-01T10:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-01T10:00:00+00:00");
        let an_hour_ago = parse_since("1h").unwrap();
        let age = Utc::now() - an_hour_ago;
        assert!((age - chrono::Duration::hours(1)).num_seconds().abs() < 5);
        assert!(parse_since("yesterday-ish").is_err());
    }

    #[test]
    fn dlq_topic_names_take_every_spelling() {
        let mut cfg = KafkaConfig {
            brokers: String::new(),
            topic_prefix: "t1-".into(),
            fetch_wait_ms: 5,
            partitions: 1,
            replication_factor: 1,
            linger_ms: 1,
        };
        let d = DeadLetters::new(cfg.clone());
        for name in ["order-events", "order-events.dlq", "t1-order-events.dlq"] {
            assert_eq!(d.dlq_topic(name), "t1-order-events.dlq", "{name}");
        }
        cfg.topic_prefix.clear();
        assert_eq!(
            DeadLetters::new(cfg).dlq_topic("payment-events"),
            "payment-events.dlq"
        );
    }
}
