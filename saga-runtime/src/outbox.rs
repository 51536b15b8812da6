//! Transactional outbox: events are written in the same transaction as the
//! state change they describe, and a relay publishes them to Kafka.
//!
//! The relay wakes when a transaction of its process commits (an in-process
//! signal) and polls once a second for rows no live relay announced (a
//! crashed replica's), publishes unpublished rows in batches with the
//! idempotent producer and marks them sent. A crash between publishing and
//! marking republishes; consumers deduplicate by `event_id`. That also makes
//! the mark itself safe to commit without waiting for the disk.

use std::sync::Arc;
use std::time::Duration;

use events::Envelope;
use futures::future::join_all;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::kafka::{self, headers};
use crate::{metrics, telemetry};

/// Rows published per round trip.
const BATCH_SIZE: i64 = 500;
/// Poll for rows no in-process wake-up announced (written by another
/// replica that died before publishing them).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Published rows are kept this long for inspection, then purged.
const RETENTION: &str = "1 hour";

/// Writes events into the outbox and wakes the relay.
#[derive(Clone, Debug)]
pub struct Outbox {
    topic_prefix: Arc<str>,
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn new(kafka: &KafkaConfig) -> Self {
        Self {
            topic_prefix: kafka.topic_prefix.as_str().into(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Adds `events` to the outbox inside the caller's transaction. The
    /// current span's trace context is stored with each row.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        events: &[Envelope],
    ) -> Result<(), sqlx::Error> {
        let traceparent = telemetry::current_traceparent();
        let traced: Vec<(&Envelope, Option<&str>)> =
            events.iter().map(|e| (e, traceparent.as_deref())).collect();
        self.enqueue_traced(conn, &traced).await
    }

    /// Adds events to the outbox in one statement, each with the W3C
    /// `traceparent` of the span that caused it (consumer batches write the
    /// events of many traces at once).
    pub async fn enqueue_traced(
        &self,
        conn: &mut PgConnection,
        events: &[(&Envelope, Option<&str>)],
    ) -> Result<(), sqlx::Error> {
        let n = events.len();
        let mut ids = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut correlations = Vec::with_capacity(n);
        let mut traceparents: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        for &(e, traceparent) in events {
            ids.push(e.event_id);
            topics.push(format!("{}{}", self.topic_prefix, e.event.topic()));
            keys.push(e.order_id.to_string());
            types.push(e.event_type().to_owned());
            correlations.push(e.correlation_id.to_string());
            traceparents.push(traceparent);
            payloads.push(
                e.to_json()
                    .map_err(|err| sqlx::Error::Encode(Box::new(err)))?,
            );
        }
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO outbox (event_id, topic, message_key, event_type, correlation_id, traceparent, payload)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[])",
        )
        .bind(&ids)
        .bind(&topics)
        .bind(&keys)
        .bind(&types)
        .bind(&correlations)
        .bind(&traceparents)
        .bind(&payloads)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Tells the relay that new rows committed. Call after `commit()`.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Publishes outbox rows to Kafka until cancelled.
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    outbox: Outbox,
    service: &'static str,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    topic: String,
    message_key: String,
    event_type: String,
    event_id: uuid::Uuid,
    correlation_id: String,
    traceparent: Option<String>,
    payload: Vec<u8>,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        producer: FutureProducer,
        outbox: Outbox,
        service: &'static str,
    ) -> Self {
        Self {
            pool,
            producer,
            outbox,
            service,
        }
    }

    /// Runs until `shutdown`, then publishes what is left and flushes.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut purge = tokio::time::interval(Duration::from_secs(60));
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.publish_batch().await {
                Ok(n) if n as i64 == BATCH_SIZE => continue,
                Ok(_) => backoff = Duration::from_millis(50),
                Err(e) => {
                    tracing::warn!(service = self.service, error = %format!("{e:#}"), "outbox publish failed; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            tokio::select! {
                _ = self.outbox.wake.notified() => {}
                _ = purge.tick() => self.purge().await,
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        // Graceful stop: whatever committed before shutdown still goes out.
        for _ in 0..10 {
            match self.publish_batch().await {
                Ok(n) if n as i64 == BATCH_SIZE => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "final outbox publish failed; rows stay for the next start");
                    break;
                }
            }
        }
        let producer = self.producer.clone();
        let flushed =
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("producer flush on shutdown did not complete");
        }
    }

    /// Publishes up to one batch; returns how many rows were marked sent.
    pub async fn publish_batch(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, topic, message_key, event_type, event_id, correlation_id, traceparent, payload, created_at
             FROM outbox WHERE published_at IS NULL AND parked_at IS NULL
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(BATCH_SIZE)
        .fetch_all(&mut *tx)
        .await?;
        let m = metrics::global();
        let labels = metrics::Metrics::service(self.service);
        if rows.is_empty() {
            tx.commit().await?;
            m.outbox_backlog.get_or_create(&labels).set(0);
            return Ok(0);
        }
        // Enqueue every message first, then await the deliveries together:
        // awaiting one by one would serialise them behind linger.ms.
        let mut pending = Vec::with_capacity(rows.len());
        let mut retriable: Option<anyhow::Error> = None;
        let mut spans = Vec::with_capacity(rows.len());
        for row in &rows {
            let event_id = row.event_id.to_string();
            // A producer span per message, child of the span that wrote the
            // row; the consumer's span becomes its child through the header.
            let span = tracing::info_span!(
                parent: None,
                "publish",
                otel.name = format!("{} publish", row.topic),
                otel.kind = "producer",
                otel.status_code = tracing::field::Empty,
                otel.status_message = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                service = self.service,
                messaging.system = "kafka",
                messaging.operation = "publish",
                messaging.destination.name = %row.topic,
                messaging.kafka.message.key = %row.message_key,
                messaging.message.id = %event_id,
                messaging.kafka.destination.partition = tracing::field::Empty,
                messaging.kafka.message.offset = tracing::field::Empty,
                event_type = %row.event_type,
                order_id = %row.message_key,
                correlation_id = %row.correlation_id,
            );
            telemetry::set_remote_parent(&span, row.traceparent.as_deref());
            let traceparent = telemetry::traceparent_of(&span).or_else(|| row.traceparent.clone());
            let hdrs = kafka::with_headers(
                OwnedHeaders::new_with_capacity(5),
                [
                    (headers::EVENT_TYPE, row.event_type.as_str()),
                    (headers::EVENT_ID, event_id.as_str()),
                    (headers::CORRELATION_ID, row.correlation_id.as_str()),
                    (headers::CONTENT_TYPE, "application/json"),
                ]
                .into_iter()
                .chain(traceparent.as_deref().map(|tp| (headers::TRACEPARENT, tp))),
            );
            let record = FutureRecord::to(&row.topic)
                .key(row.message_key.as_str())
                .payload(row.payload.as_slice())
                .headers(hdrs);
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    pending.push((row.id, row.created_at, delivery));
                    spans.push(span);
                }
                Err((e, _)) => {
                    // Queue full or similar: publish what is enqueued, retry the rest.
                    telemetry::mark_error(&span, &e.to_string());
                    retriable = Some(anyhow::Error::new(e).context("enqueueing outbox row"));
                    break;
                }
            }
        }
        let (ids, deliveries): (Vec<(i64, chrono::DateTime<chrono::Utc>)>, Vec<_>) = pending
            .into_iter()
            .map(|(id, created_at, d)| ((id, created_at), d))
            .unzip();
        let results = join_all(deliveries).await;
        let mut sent = Vec::with_capacity(results.len());
        let mut sent_created = Vec::with_capacity(results.len());
        let mut dead = Vec::new();
        for (((id, created_at), result), span) in ids.into_iter().zip(results).zip(spans) {
            match &result {
                Ok(Ok(delivery)) => {
                    span.record("messaging.kafka.destination.partition", delivery.partition);
                    span.record("messaging.kafka.message.offset", delivery.offset);
                }
                Ok(Err((e, _))) => telemetry::mark_error(&span, &e.to_string()),
                Err(_) => telemetry::mark_error(&span, "delivery canceled"),
            }
            match result {
                Ok(Ok(_)) => {
                    sent.push(id);
                    sent_created.push(created_at);
                }
                Ok(Err((e, _))) if kafka::is_permanent(&e) => {
                    tracing::error!(outbox_id = id, error = %e, "outbox row can never be published; parking it");
                    dead.push((id, e.to_string()));
                }
                Ok(Err((e, _))) => {
                    retriable.get_or_insert_with(|| {
                        anyhow::Error::new(e).context("publishing outbox row")
                    });
                }
                Err(_canceled) => {
                    retriable.get_or_insert_with(|| anyhow::anyhow!("producer dropped a delivery"));
                }
            }
        }
        if !sent.is_empty() {
            // The broker has the messages; if this mark is lost in a database
            // crash they are published again and consumers drop the
            // duplicates. So this commit need not wait for the WAL flush
            // (`synchronous_commit` off for this transaction only, set in the
            // same round trip).
            sqlx::query(
                "WITH sent AS (UPDATE outbox SET published_at = now() WHERE id = ANY($1))
                 SELECT set_config('synchronous_commit', 'off', true)",
            )
            .bind(&sent)
            .execute(&mut *tx)
            .await?;
        }
        for (id, why) in &dead {
            // Parked rows are marked so they no longer block the relay; they
            // keep their payload for an operator to inspect and replay.
            sqlx::query("UPDATE outbox SET parked_at = now(), last_error = $2 WHERE id = $1")
                .bind(id)
                .bind(why)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let now = chrono::Utc::now();
        m.outbox_published
            .get_or_create(&labels)
            .inc_by(sent.len() as u64);
        {
            let latency = m.outbox_publish_seconds.get_or_create(&labels);
            for at in &sent_created {
                latency.observe((now - *at).num_microseconds().unwrap_or(0) as f64 / 1e6);
            }
        }
        let backlog = if rows.len() as i64 == BATCH_SIZE {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
        } else {
            (rows.len() - sent.len() - dead.len()) as i64
        };
        m.outbox_backlog.get_or_create(&labels).set(backlog);
        match retriable {
            Some(e) if sent.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(error = %format!("{e:#}"), "some outbox rows will be retried");
                Ok(sent.len())
            }
            None => Ok(sent.len()),
        }
    }

    async fn purge(&self) {
        let result = sqlx::query(&format!(
            "DELETE FROM outbox WHERE published_at < now() - interval '{RETENTION}'"
        ))
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "purging published outbox rows failed");
        }
        let result = sqlx::query(
            "DELETE FROM processed_events WHERE processed_at < now() - interval '7 days'",
        )
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "purging old processed-event ids failed");
        }
    }
}
