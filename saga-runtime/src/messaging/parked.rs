//! Events a consumer skipped because its build does not know their type:
//! kept, and sent again once a build that handles them runs.
//!
//! In a rolling upgrade a producer of a new event type may run before its
//! consumers are upgraded. An older consumer acknowledges such an event
//! (its partition must not wait for the upgrade, and the event is not
//! malformed) and *parks* it: the message (topic, position, key, value,
//! headers) goes to `parked_events` in the service's own database before
//! the offset is stored. Every replica of a build that knows the type
//! looks at the table at start and every [`EVERY`] afterwards: an event it
//! handles is published again to its topic, whole, with
//! [`headers::PARKED_FROM`](crate::kafka::headers::PARKED_FROM), as a
//! dead-letter redrive would be (the consumers' inbox absorbs it wherever
//! it was handled already); one it knows but does not handle is forgotten.
//! Rows of a type still unknown stay for [`crate::retention::PARKED_RETENTION`].
//!
//! Events of a known type that a service does not handle are skipped
//! without parking: they are none of its business in any release.

use std::time::Duration;

use events::EventType;
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::kafka::EventProducer;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::kafka::{self, headers};
use crate::metrics;

/// How often a running replica looks for parked events it can now handle
/// (an older replica may park a copy again while the upgrade rolls on).
pub const EVERY: Duration = Duration::from_secs(10);
/// Parked events replayed per transaction.
const CHUNK: i64 = 100;

/// One parked message.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Parked {
    pub topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub event_type: String,
    pub message_key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub header_names: Vec<String>,
    pub header_values: Vec<Vec<u8>>,
}

impl Parked {
    /// The parked copy of `msg`, whose envelope names `event_type`.
    pub fn of(msg: &BorrowedMessage<'_>, event_type: &str) -> Self {
        let (header_names, header_values) = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .unzip()
            })
            .unwrap_or_default();
        Self {
            topic: msg.topic().to_owned(),
            kafka_partition: msg.partition(),
            kafka_offset: msg.offset(),
            event_type: event_type.to_owned(),
            message_key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().unwrap_or_default().to_vec(),
            header_names,
            header_values,
        }
    }

    /// Where it was read: `<topic>/<partition>@<offset>`.
    pub fn position(&self) -> String {
        format!(
            "{}/{}@{}",
            self.topic, self.kafka_partition, self.kafka_offset
        )
    }

    /// The message to publish again: the same topic, key, value and
    /// headers, and where it was parked.
    fn record<'a>(&'a self, from: &'a str) -> FutureRecord<'a, [u8], [u8]> {
        let original = self.header_names.iter().zip(&self.header_values).fold(
            OwnedHeaders::new(),
            |hs, (k, v)| {
                hs.insert(rdkafka::message::Header {
                    key: k,
                    value: Some(v.as_slice()),
                })
            },
        );
        let hs = kafka::with_headers(original, [(headers::PARKED_FROM, from)]);
        let mut record = FutureRecord::to(&self.topic)
            .headers(hs)
            .payload(self.payload.as_slice());
        if let Some(k) = &self.message_key {
            record = record.key(k.as_slice());
        }
        record
    }
}

/// Stores `parked` (a redelivered message is stored once).
pub async fn park(pool: &PgPool, parked: &[Parked]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for p in parked {
        insert(&mut tx, p).await?;
    }
    tx.commit().await
}

async fn insert(conn: &mut PgConnection, p: &Parked) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO parked_events (topic, kafka_partition, kafka_offset, event_type,
             message_key, payload, header_names, header_values)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT DO NOTHING",
    )
    .bind(&p.topic)
    .bind(p.kafka_partition)
    .bind(p.kafka_offset)
    .bind(&p.event_type)
    .bind(&p.message_key)
    .bind(&p.payload)
    .bind(&p.header_names)
    .bind(&p.header_values)
    .execute(conn)
    .await?;
    Ok(())
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Published again to their topics.
    pub published: u64,
    /// Of a type this build knows and does not handle: forgotten.
    pub forgotten: u64,
}

/// Why a replay stopped; the rows it held stay parked.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publishing {position} again: {error}")]
    Publish {
        position: String,
        error: rdkafka::error::KafkaError,
    },
}

/// Which parked events this build can act on: it `handles` some of the
/// types it knows; `unknown` are types it treats as unknown all the same
/// (`CONSUMER_UNKNOWN_EVENT_TYPES`).
#[derive(Debug, Clone)]
pub struct Known {
    pub handles: Vec<EventType>,
    pub unknown: Vec<EventType>,
}

impl Known {
    /// What a build whose handler `accepts` some types knows, with
    /// `unknown` treated as unknown.
    pub fn new(accepts: impl Fn(EventType) -> bool, unknown: Vec<EventType>) -> Self {
        Self {
            handles: EventType::ALL
                .iter()
                .copied()
                .filter(|k| accepts(*k) && !unknown.contains(k))
                .collect(),
            unknown,
        }
    }

    /// The type names whose parked events this build acts on.
    fn names(&self) -> Vec<&'static str> {
        EventType::ALL
            .iter()
            .filter(|k| !self.unknown.contains(k))
            .map(|k| k.as_str())
            .collect()
    }

    fn handles(&self, event_type: &str) -> bool {
        EventType::parse(event_type).is_some_and(|k| self.handles.contains(&k))
    }
}

/// Publishes again (or forgets) the parked events of types this build
/// knows, [`CHUNK`] at a time, each chunk in one transaction: a row is
/// deleted only once the broker has acknowledged its copy. Replicas share
/// the work (`SKIP LOCKED`), and each order's events go out in the order
/// they were parked: a row is taken only with every earlier row of its key
/// (of a type this build acts on) that is still in the table, so a row
/// another replica is publishing, or that someone else holds a lock on,
/// holds back the later rows of its order until it is gone.
pub async fn replay(
    pool: &PgPool,
    producer: &EventProducer,
    known: &Known,
    service: &'static str,
) -> Result<Replayed, ReplayError> {
    let names = known.names();
    let mut done = Replayed::default();
    loop {
        let mut tx = pool.begin().await?;
        // `SKIP LOCKED` passes over rows the snapshot calls free; the
        // `NOT EXISTS` keeps a row whose key has an earlier row this
        // statement did not lock (a key-less event has no order to keep).
        let rows: Vec<Parked> = sqlx::query_as(
            "WITH c AS (
                 SELECT topic, kafka_partition, kafka_offset, message_key, parked_at
                 FROM parked_events WHERE event_type = ANY($1)
                 ORDER BY parked_at, topic, kafka_partition, kafka_offset
                 LIMIT $2 FOR UPDATE SKIP LOCKED),
             gone AS (
                 DELETE FROM parked_events p USING c
                 WHERE (p.topic, p.kafka_partition, p.kafka_offset)
                       = (c.topic, c.kafka_partition, c.kafka_offset)
                   AND NOT (c.message_key IS NOT NULL AND EXISTS (
                       SELECT 1 FROM parked_events e
                       WHERE e.message_key = c.message_key AND e.event_type = ANY($1)
                         AND (e.parked_at, e.topic, e.kafka_partition, e.kafka_offset)
                             < (c.parked_at, c.topic, c.kafka_partition, c.kafka_offset)
                         AND (e.topic, e.kafka_partition, e.kafka_offset) NOT IN (
                             SELECT topic, kafka_partition, kafka_offset FROM c)))
                 RETURNING p.*)
             SELECT topic, kafka_partition, kafka_offset, event_type, message_key, payload,
                    header_names, header_values
             FROM gone ORDER BY parked_at, topic, kafka_partition, kafka_offset",
        )
        .bind(&names)
        .bind(CHUNK)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(done);
        }
        let mut published = 0;
        let mut forgotten = 0;
        for row in &rows {
            if !known.handles(&row.event_type) {
                forgotten += 1;
                continue;
            }
            let from = row.position();
            producer
                .send(row.record(&from), Duration::from_secs(10))
                .await
                .map_err(|(error, _)| ReplayError::Publish {
                    position: from.clone(),
                    error,
                })?;
            metrics::global()
                .events_replayed
                .get_or_create(&metrics::TopicLabels {
                    service: service.to_owned(),
                    topic: row.topic.clone(),
                })
                .inc();
            tracing::info!(service, parked = %from, event_type = %row.event_type, "parked event published again");
            published += 1;
        }
        tx.commit().await?;
        done.published += published;
        done.forgotten += forgotten;
        if rows.len() < usize::try_from(CHUNK).unwrap_or(usize::MAX) {
            return Ok(done);
        }
    }
}

/// Replays at once and then every [`EVERY`] until `shutdown`. `pool` is
/// the request handlers' (a replay holds its connection while the broker
/// acknowledges, which the consumer's and relay's own must not wait for).
pub async fn run(
    pool: PgPool,
    producer: EventProducer,
    known: Known,
    service: &'static str,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let result = tokio::select! {
            r = replay(&pool, &producer, &known, service) => r,
            _ = shutdown.cancelled() => return,
        };
        match result {
            Ok(Replayed {
                published: 0,
                forgotten: 0,
            }) => {}
            Ok(r) => tracing::info!(
                service,
                published = r.published,
                forgotten = r.forgotten,
                "parked events replayed"
            ),
            Err(e) => {
                tracing::warn!(service, error = %e, "replaying parked events failed; retrying later")
            }
        }
    }
}
