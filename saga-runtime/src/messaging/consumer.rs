//! The idempotent consumer loop every service runs.
//!
//! For each poll it takes the messages that are ready (up to a batch) and
//! handles them in one database transaction:
//!
//! 1. read the envelope's header: an event type the service does not handle
//!    is skipped (and parked, if this build does not know it: see
//!    [`crate::parked`]); the envelope of a handled one is decoded
//!    (malformed → dead-letter topic);
//! 2. record `(consumer, event_id)` in `processed_events` (one statement for
//!    the batch) — already there means a redelivery, which changes nothing;
//! 3. run the service's handler on the batch's new events (it reads what
//!    they touch at once, decides in memory, writes at once), and write all
//!    the events they emit to the outbox (one statement for the batch).
//!
//! Only after the transaction commits are dead letters produced and the
//! messages' offsets stored for the (periodic and shutdown) offset commit.
//! A crash anywhere before that redelivers the batch, which step 2 absorbs.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use events::{Envelope, Event, EventType};
use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{GroupProtocol, KafkaConfig};
use crate::group::GroupContext;
use crate::health::Health;
use crate::kafka::{self, headers, EventProducer};
use crate::outbox::Outbox;
use crate::parked::Parked;
use crate::retry::Backoff;
use crate::{db, metrics, telemetry};

/// One fresh event of a batch, and what the handler made of it.
///
/// Handlers receive a batch's steps in the order the messages arrived and,
/// for each, either [`emit`](Step::emit) the events it causes (none is fine:
/// the event is simply applied) or [`refuse`](Step::refuse) it.
pub struct Step<'a> {
    envelope: &'a Envelope,
    span: tracing::Span,
    verdict: Result<Vec<Envelope>, String>,
}

impl<'a> Step<'a> {
    pub fn new(envelope: &'a Envelope, span: tracing::Span) -> Self {
        Self {
            envelope,
            span,
            verdict: Ok(Vec::new()),
        }
    }

    /// The event to apply.
    pub fn envelope(&self) -> &'a Envelope {
        self.envelope
    }

    /// The event's consumer span (a child of its producer's trace): enter it
    /// while deciding, so the step's log lines carry its trace and order.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Emits `event` as a consequence of this step (same order, correlation
    /// and causation chain). Ignored once the step is refused.
    pub fn emit(&mut self, event: Event) {
        if let Ok(out) = &mut self.verdict {
            out.push(Envelope::caused_by(self.envelope, event));
        }
    }

    /// Refuses the event: it can never be applied (it contradicts this
    /// service's state), so it goes to the dead-letter topic, emits nothing
    /// and stays replayable. The handler must not write anything for it.
    pub fn refuse(&mut self, why: impl Into<String>) {
        self.verdict = Err(why.into());
    }

    /// The orders `steps` are about, sorted and each once: the order to
    /// lock their rows in, so concurrent batches cannot deadlock.
    pub fn order_ids(steps: &[Step<'_>]) -> Vec<uuid::Uuid> {
        let mut ids: Vec<uuid::Uuid> = steps
            .iter()
            .map(|s| s.envelope.order_id.as_uuid())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// What was decided: the events to emit, or why the event was refused.
    pub fn verdict(&self) -> Result<&[Envelope], &str> {
        match &self.verdict {
            Ok(out) => Ok(out),
            Err(why) => Err(why),
        }
    }
}

/// A service's reaction to saga events.
pub trait Handler: Send + Sync + 'static {
    /// Whether this service acts on events of this kind. Others are
    /// acknowledged without reading their data, counted in
    /// `saga_events_skipped_total`, and never dead-lettered; those of a
    /// type this build does not know (a newer producer's, mid rolling
    /// upgrade) are also parked for the build that knows them (see
    /// [`crate::parked`]).
    fn accepts(&self, kind: EventType) -> bool;

    /// Applies a batch of events never seen before, inside the consumer's
    /// transaction, recording on each [`Step`] what it emits or why it is
    /// refused. Events of one order keep their arrival order, and a later
    /// step must see the effects of earlier ones.
    ///
    /// The intended shape, whatever the batch's size: one statement reads
    /// (and locks, in a fixed order) everything the batch touches, the
    /// decisions are made in memory, one statement writes them. A refused
    /// step must leave no writes, since nothing is rolled back for it.
    /// An error rolls the whole batch back for a retry.
    fn handle(
        &self,
        conn: &mut PgConnection,
        steps: &mut [Step<'_>],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Called once the transaction that emitted `emitted` has committed
    /// (for metrics and other effects that must not run twice on a retry).
    fn after_commit(&self, _emitted: &[Envelope]) {}
}

/// Tuning of the loop.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Most messages handled in one transaction.
    pub max_batch: usize,
    /// Attempts before a message whose handling keeps failing is dead-lettered
    /// (database outages are retried without limit).
    pub max_attempts: u32,
    /// Attempts before a batch that keeps failing with a statement
    /// timeout, a lock not granted, a lost race or an exhausted lock table
    /// ([`db::is_contention`]) is split, while the database answers other
    /// queries; a single message is then dead-lettered with the reason.
    pub max_contention_attempts: u32,
    /// Event types treated as unknown to this build
    /// (`CONSUMER_UNKNOWN_EVENT_TYPES`): skipped and parked.
    pub unknown_event_types: Vec<EventType>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            max_batch: 256,
            max_attempts: 5,
            max_contention_attempts: 8,
            unknown_event_types: Vec::new(),
        }
    }
}

/// What a service consumes.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub kafka: KafkaConfig,
    pub service: &'static str,
    /// `group.instance.id`: with one, the consumer is a static group member
    /// (KIP-345) and, restarted under the same ID, takes its partitions
    /// back at once.
    pub instance_id: Option<String>,
    /// The group protocol and, for the classic one, the assignor.
    pub protocol: GroupProtocol,
    /// Real (prefixed) topic names.
    pub topics: Vec<String>,
}

/// The consumer the loop runs.
pub type SagaConsumer = StreamConsumer<GroupContext>;

impl Subscription {
    /// A client for asking about the group's offsets (the progress watcher,
    /// [`crate::group::watch_progress`]): the group's ID, never subscribed,
    /// so never a member of it.
    pub fn watcher(&self) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
        kafka::client_config(&self.kafka, self.service)
            .set("group.id", self.kafka.group_id(self.service))
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the Kafka client that watches the group")
    }

    /// A new consumer in the service's group, subscribed to the topics; a
    /// static member when the subscription has an instance ID.
    pub fn connect(&self) -> anyhow::Result<SagaConsumer> {
        let cfg = &self.kafka;
        let mut config = kafka::client_config(cfg, self.service);
        if let Some(id) = &self.instance_id {
            config.set("group.instance.id", id);
        }
        match &self.protocol {
            GroupProtocol::Classic {
                assignment_strategy,
            } => {
                config
                    .set("group.protocol", "classic")
                    .set("partition.assignment.strategy", assignment_strategy)
                    .set("session.timeout.ms", "10000")
                    .set("heartbeat.interval.ms", "1000");
            }
            // Session timeout and heartbeats are the broker's to set.
            GroupProtocol::Consumer => {
                config.set("group.protocol", "consumer");
            }
        }
        let consumer: SagaConsumer = config
            .set("group.id", cfg.group_id(self.service))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "500")
            // Offsets are stored by hand, after the database commit.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", cfg.fetch_wait_ms.to_string())
            .set("fetch.min.bytes", "1")
            .set(
                "statistics.interval.ms",
                crate::group::STATS_EVERY.as_millis().to_string(),
            )
            .create_with_context(GroupContext::new(self.service))
            .context("creating the Kafka consumer")?;
        let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .with_context(|| format!("subscribing to {}", names.join(", ")))?;
        Ok(consumer)
    }
}

/// The loop: owns the consumer and applies `H` to every message.
pub struct EventLoop<H> {
    pub service: &'static str,
    pub subscription: Subscription,
    /// Shared with the progress watcher ([`crate::group::watch_progress`]).
    pub consumer: Arc<SagaConsumer>,
    pub pool: PgPool,
    pub outbox: Outbox,
    pub producer: EventProducer,
    pub handler: Arc<H>,
    pub options: ConsumerOptions,
    pub health: Health,
}

/// A batch's events sorted for the handler ([`EventLoop::apply`]).
struct Sorted<'a> {
    /// The fresh events, in arrival order.
    steps: Vec<Step<'a>>,
    /// The item each step came from.
    step_items: Vec<usize>,
    /// The types of the events the inbox had seen.
    duplicates: Vec<&'static str>,
}

/// What the handler decided for a batch's steps.
struct Verdicts {
    /// `(item, reason)` of each refused event, to dead-letter.
    dead: Vec<(usize, String)>,
    /// Their event IDs, to take out of the inbox.
    refused_ids: Vec<uuid::Uuid>,
    /// The events to publish, and beside each the trace context of the
    /// message that caused it.
    emitted: Vec<Envelope>,
    causes: Vec<Option<String>>,
}

impl Verdicts {
    /// Logs each step's verdict in its span and takes the emitted events
    /// out of the steps (each keeps an empty `Ok`).
    fn collect(steps: &mut [Step<'_>], step_items: &[usize]) -> Self {
        let mut v = Self {
            dead: Vec::new(),
            refused_ids: Vec::new(),
            emitted: Vec::new(),
            causes: Vec::new(),
        };
        for (step, &i) in steps.iter_mut().zip(step_items) {
            let _entered = step.span.enter();
            match &mut step.verdict {
                Ok(out) if out.is_empty() => tracing::info!("event handled"),
                Ok(out) => {
                    for e in out.iter() {
                        tracing::info!(emitted = e.event_type(), "event handled");
                    }
                    v.causes.resize(
                        v.causes.len() + out.len(),
                        telemetry::traceparent_of(&step.span),
                    );
                    v.emitted.append(out);
                }
                Err(why) => {
                    telemetry::mark_error(&step.span, why);
                    tracing::warn!(reason = %why, "event cannot be applied; dead-lettering");
                    v.refused_ids.push(step.envelope.event_id);
                    v.dead.push((i, why.clone()));
                }
            }
        }
        v
    }

    /// The emitted events with their causes' trace contexts, for the outbox.
    fn traced(&self) -> Vec<(&Envelope, Option<&str>)> {
        self.emitted
            .iter()
            .zip(&self.causes)
            .map(|(e, tp)| (e, tp.as_deref()))
            .collect()
    }
}

/// One polled message, and what it turned out to be.
struct Item<'m> {
    msg: BorrowedMessage<'m>,
    read: Read,
}

/// What a consumer makes of a message value (the tolerant reader): the
/// header first, the event's data only if the service handles its kind.
#[derive(Debug)]
enum Read {
    /// An event this service handles.
    Event(Envelope),
    /// A well-formed envelope of a kind this service does not handle
    /// (`known`), or that this build does not know (parked): acknowledged
    /// and counted, never dead-lettered.
    Skipped { event_type: String, known: bool },
    /// Not an envelope, a `schema_version` this build cannot read (kept in
    /// the dead-letter topic for a redrive after the upgrade), or a handled
    /// event whose data does not fit its schema: dead-lettered.
    Malformed(String),
}

impl Read {
    /// `unknown`: types to treat as if this build did not know them.
    fn of(
        value: Option<&[u8]>,
        accepts: impl Fn(EventType) -> bool,
        unknown: &[EventType],
    ) -> Self {
        let Some(bytes) = value else {
            return Read::Malformed("message has no value".to_owned());
        };
        let header = match Envelope::peek(bytes) {
            Ok(h) => h,
            Err(e) => return Read::Malformed(e.to_string()),
        };
        match header.kind().filter(|k| !unknown.contains(k)) {
            None => {
                return Read::Skipped {
                    event_type: header.event_type,
                    known: false,
                }
            }
            Some(kind) if !accepts(kind) => {
                return Read::Skipped {
                    event_type: header.event_type,
                    known: true,
                }
            }
            Some(_) => {}
        }
        match Envelope::from_json(bytes) {
            Ok(env) => Read::Event(env),
            Err(e) => Read::Malformed(e.to_string()),
        }
    }

    fn envelope(&self) -> Option<&Envelope> {
        match self {
            Read::Event(env) => Some(env),
            _ => None,
        }
    }
}

/// Raised when shutdown interrupts a retry: the batch is left unacknowledged.
struct Interrupted;

/// The consumer's name in [`Health`]: waiting out a database outage.
pub(crate) const HEALTH_COMPONENT: &str = "consumer";
/// What `/ready` calls a consumer stuck on a dead-letter copy.
const DLQ_HEALTH_COMPONENT: &str = "dead-letters";

/// A second fatal consumer error within this long stops the service (see
/// [`EventLoop::replace_fenced_consumer`]).
const FENCED_AGAIN: Duration = Duration::from_secs(60);

impl<H: Handler> EventLoop<H> {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut poll_backoff = Duration::from_millis(100);
        // The watcher ends with this loop (the set aborts it when dropped,
        // e.g. when the service's task is aborted), or with its consumer
        // when that is replaced.
        let mut progress = tokio::task::JoinSet::new();
        progress.spawn(self.watch_progress(&shutdown));
        let mut last_fatal: Option<std::time::Instant> = None;
        loop {
            let first = tokio::select! {
                m = self.consumer.recv() => m,
                _ = shutdown.cancelled() => break,
            };
            let first = match first {
                Ok(m) => {
                    poll_backoff = Duration::from_millis(100);
                    m
                }
                Err(e) => {
                    metrics::global()
                        .consumer_errors
                        .get_or_create(&metrics::Metrics::service(self.service))
                        .inc();
                    if let Some(fatal) = kafka::fatal_error(self.consumer.client()) {
                        if !self.replace_fenced_consumer(&fatal, &mut last_fatal) {
                            // Returning ends the service (exit 1).
                            return;
                        }
                        progress.abort_all();
                        progress.spawn(self.watch_progress(&shutdown));
                        continue;
                    }
                    tracing::warn!(service = self.service, error = %e, "Kafka poll failed");
                    tokio::time::sleep(poll_backoff).await;
                    poll_backoff = (poll_backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < self.options.max_batch {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => batch.push(m),
                    _ => break,
                }
            }
            let started = std::time::Instant::now();
            let labels = metrics::Metrics::service(self.service);
            metrics::global()
                .consumer_batch_size
                .get_or_create(&labels)
                .observe(batch.len() as f64);
            let items: Vec<Item<'_>> = batch
                .into_iter()
                .map(|msg| {
                    let read = Read::of(
                        msg.payload(),
                        |kind| self.handler.accepts(kind),
                        &self.options.unknown_event_types,
                    );
                    Item { msg, read }
                })
                .collect();
            if self.process(&items, &shutdown).await.is_err() {
                break;
            }
            metrics::global()
                .consumer_batch_seconds
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
        }
        progress.abort_all();
        // Closing commits what is stored and tells the group this member
        // leaves (a dynamic one: its partitions move at once instead of
        // after its session timeout). It waits on the broker: not on this
        // task's thread, and the caller's grace period still bounds it.
        let consumer = self.consumer;
        let service = self.service;
        let closed = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                // Nothing stored since the last commit is the usual reason.
                tracing::debug!(service, error = %e, "final offset commit");
            }
            drop(consumer);
        });
        if closed.await.is_err() {
            tracing::warn!(service, "closing the Kafka consumer failed");
        }
    }

    /// The progress watcher of the current consumer (see [`crate::group`]).
    fn watch_progress(&self, shutdown: &CancellationToken) -> impl Future<Output = ()> + Send {
        let watcher = self.subscription.watcher();
        let group = self.consumer.context().clone();
        let topics = self.subscription.topics.clone();
        let shutdown = shutdown.child_token();
        async move {
            match watcher {
                Ok(watcher) => crate::group::watch_progress(group, watcher, topics, shutdown).await,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "no client to watch the group's progress: saga_consumer_partition_stalled_seconds stays unset");
                }
            }
        }
    }

    /// After a fatal consumer error: replaces the consumer with a new one
    /// (same group, same `group.instance.id`) and returns true, unless the
    /// last fatal error was less than [`FENCED_AGAIN`] ago.
    ///
    /// The only fatal consumer error is `FENCED_INSTANCE_ID`: the broker
    /// gave this static member's instance ID to another member ID. That
    /// happens to a lone replica too: when its session times out while the
    /// broker is away, librdkafka rejoins under a new member ID, and a
    /// heartbeat still queued under the old one is answered "fenced" once
    /// the broker is back. A new consumer takes the ID back, and the outage
    /// has been waited out. Two live replicas configured with the same ID
    /// fence each other again at once, and that is a mistake a new consumer
    /// cannot mend: the service stops (exit 1), saying so.
    fn replace_fenced_consumer(
        &mut self,
        fatal: &str,
        last_fatal: &mut Option<std::time::Instant>,
    ) -> bool {
        let now = std::time::Instant::now();
        if last_fatal.is_some_and(|t| now.duration_since(t) < FENCED_AGAIN) {
            tracing::error!(service = self.service, error = %fatal, instance_id = ?self.subscription.instance_id, "fatal Kafka consumer error again within {} s: another live replica probably uses the same KAFKA_GROUP_INSTANCE_ID; stopping", FENCED_AGAIN.as_secs());
            return false;
        }
        *last_fatal = Some(now);
        match self.subscription.connect() {
            Ok(fresh) => {
                tracing::error!(service = self.service, error = %fatal, "fatal Kafka consumer error; carrying on with a new consumer");
                metrics::global()
                    .consumer_replaced
                    .get_or_create(&metrics::Metrics::service(self.service))
                    .inc();
                let old = std::mem::replace(&mut self.consumer, Arc::new(fresh));
                // Closing may wait on the broker: not on this task.
                tokio::task::spawn_blocking(move || drop(old));
                true
            }
            Err(e) => {
                tracing::error!(service = self.service, error = %format!("{e:#}"), fatal, "fatal Kafka consumer error, and no new consumer could be made; stopping");
                false
            }
        }
    }

    /// Handles a polled batch to completion, then acknowledges it.
    async fn process(
        &self,
        items: &[Item<'_>],
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let mut dead: Vec<(usize, String)> = Vec::new();
        let mut work: Vec<usize> = Vec::with_capacity(items.len());
        let mut parked: Vec<Parked> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match &item.read {
                Read::Malformed(why) => dead.push((i, format!("malformed message: {why}"))),
                Read::Event(_) => work.push(i),
                Read::Skipped { event_type, known } => {
                    self.skipped(&item.msg, event_type);
                    if !known {
                        parked.push(Parked::of(&item.msg, event_type));
                    }
                }
            }
        }
        if !parked.is_empty() {
            self.park(&parked, shutdown).await?;
        }
        if !work.is_empty() {
            dead.extend(self.apply_with_retries(items, &work, shutdown).await?);
        }
        for (i, reason) in &dead {
            self.dead_letter(&items[*i].msg, reason, shutdown).await?;
        }
        for item in items {
            if let Err(e) = self.consumer.store_offset_from_message(&item.msg) {
                // The partition was revoked meanwhile; its new owner redelivers,
                // and the inbox absorbs the duplicate.
                tracing::debug!(error = %e, "could not store offset");
            }
        }
        Ok(())
    }

    /// Counts a message whose event this service does not handle.
    fn skipped(&self, msg: &BorrowedMessage<'_>, event_type: &str) {
        // The label comes from the message: bounded, so that a stream of
        // made-up names cannot grow the metrics without end.
        let event_type: String = event_type.chars().take(64).collect();
        tracing::debug!(service = self.service, topic = msg.topic(), %event_type, "event type not handled here; skipped");
        metrics::global()
            .events_skipped
            .get_or_create(&metrics::SkippedLabels {
                service: self.service.to_owned(),
                topic: msg.topic().to_owned(),
                event_type,
            })
            .inc();
    }

    /// Stores the batch's events of unknown types (see [`crate::parked`])
    /// before their offsets are, waiting out a database that does not
    /// answer (reported to `/ready` meanwhile).
    async fn park(
        &self,
        parked: &[Parked],
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut reported = false;
        loop {
            match crate::parked::park(&self.pool, parked).await {
                Ok(()) => {
                    if reported {
                        self.health.recover(HEALTH_COMPONENT);
                    }
                    for p in parked {
                        tracing::warn!(service = self.service, parked = %p.position(), event_type = %p.event_type, "event type unknown to this build; parked until a build that knows it runs");
                        metrics::global()
                            .events_parked
                            .get_or_create(&metrics::TopicLabels {
                                service: self.service.to_owned(),
                                topic: p.topic.clone(),
                            })
                            .inc();
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(service = self.service, error = %e, "parking events of unknown types failed; retrying");
                    reported = true;
                    self.health.degrade(
                        HEALTH_COMPONENT,
                        format!("cannot park events of unknown types: {e}"),
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.cancelled() => return Err(Interrupted),
                    }
                }
            }
        }
    }

    /// Applies `work` in one transaction, retrying on failure.
    ///
    /// An outage (the database away, read-only, shutting down, out of
    /// connections: [`db::is_transient`] but not [`db::is_contention`]) is
    /// waited out for as long as it lasts, with capped exponential backoff,
    /// and reported to `/ready` meanwhile: it says nothing about the
    /// events, so it never dead-letters one. Contention (a statement
    /// timeout, a lock not granted, a lost race, the lock table exhausted)
    /// is retried `max_contention_attempts` times; if the database then
    /// answers a probe, the work itself is the trouble and it goes the way
    /// of any other failure, which is retried `max_attempts` times: a batch
    /// that keeps failing is split so one bad message cannot hold back the
    /// others, and a single message that still fails is dead-lettered with
    /// the error.
    async fn apply_with_retries(
        &self,
        items: &[Item<'_>],
        work: &[usize],
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, String)>, Interrupted> {
        let mut attempt = 0u32;
        let mut contended = 0u32;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        // Only a batch that reported an outage clears it: the health lock
        // stays off the path of every other batch.
        let mut reported_outage = false;
        loop {
            match self.apply(items, work).await {
                Ok(dead) => {
                    if reported_outage {
                        self.health.recover(HEALTH_COMPONENT);
                    }
                    return Ok(dead);
                }
                Err(e) => {
                    metrics::global()
                        .consumer_retries
                        .get_or_create(&metrics::Metrics::service(self.service))
                        .inc();
                    if db::is_contention(&e) {
                        contended += 1;
                        tracing::warn!(service = self.service, attempt = contended, error = %e, batch = work.len(), "handling met contention; retrying");
                        if contended >= self.options.max_contention_attempts
                            && self.database_answers().await
                        {
                            tracing::warn!(service = self.service, attempts = contended, error = %e, batch = work.len(), "the same work keeps failing while the database answers other queries; splitting the batch");
                            return self
                                .split_or_give_up(items, work, contended, &e, shutdown)
                                .await;
                        }
                    } else if db::is_transient(&e) {
                        reported_outage = true;
                        self.health
                            .degrade(HEALTH_COMPONENT, format!("waiting for the database: {e}"));
                        tracing::warn!(service = self.service, error = %e, batch = work.len(), "database unavailable; waiting it out");
                    } else {
                        // The database answered, so it is back, whatever
                        // becomes of this batch.
                        if std::mem::take(&mut reported_outage) {
                            self.health.recover(HEALTH_COMPONENT);
                        }
                        attempt += 1;
                        tracing::warn!(service = self.service, attempt, error = %e, batch = work.len(), "handling failed; retrying");
                        if attempt >= self.options.max_attempts {
                            return self
                                .split_or_give_up(items, work, attempt, &e, shutdown)
                                .await;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.cancelled() => return Err(Interrupted),
                    }
                }
            }
        }
    }

    /// Whether the database answers a trivial query now.
    async fn database_answers(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// After `attempts` failures of `work` that were not outages: retry
    /// each message alone, or dead-letter the one message left.
    async fn split_or_give_up(
        &self,
        items: &[Item<'_>],
        work: &[usize],
        attempts: u32,
        e: &sqlx::Error,
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, String)>, Interrupted> {
        if let [one] = work {
            let code = db::sqlstate(e)
                .map(|c| format!(" (SQLSTATE {c})"))
                .unwrap_or_default();
            return Ok(vec![(
                *one,
                format!("handler failed after {attempts} attempts: {e}{code}"),
            )]);
        }
        let mut dead = Vec::new();
        for i in work {
            dead.extend(Box::pin(self.apply_with_retries(items, &[*i], shutdown)).await?);
        }
        Ok(dead)
    }

    /// One transaction over `work`; returns the messages to dead-letter.
    ///
    /// Round trips per batch, not per message: one statement records every
    /// event ID in the inbox, the handler reads and writes the whole batch
    /// (two statements in each service), one statement writes every emitted
    /// event to the outbox. Refused events delete their inbox row (one more
    /// statement, only then), so a replay from the dead-letter topic is not
    /// taken for a duplicate.
    async fn apply(
        &self,
        items: &[Item<'_>],
        work: &[usize],
    ) -> Result<Vec<(usize, String)>, sqlx::Error> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let fresh = self.inbox_insert(&mut tx, items, work).await?;
        let Sorted {
            mut steps,
            step_items,
            duplicates,
        } = self.sort_out(items, work, fresh);
        let db_spans = self.transaction_spans(&steps);
        if !steps.is_empty() {
            if let Err(e) = self.handler.handle(&mut tx, &mut steps).await {
                for span in steps.iter().map(Step::span).chain(&db_spans) {
                    telemetry::mark_error(span, &e.to_string());
                }
                return Err(e);
            }
        }
        let verdicts = Verdicts::collect(&mut steps, &step_items);
        self.inbox_forget(&mut tx, &verdicts.refused_ids).await?;
        let staged = self
            .outbox
            .enqueue_traced(&mut tx, &verdicts.traced())
            .await?;
        tx.commit().await?;
        drop(db_spans);
        self.outbox.committed(staged);
        if !verdicts.emitted.is_empty() {
            self.handler.after_commit(&verdicts.emitted);
        }
        self.observe_batch(&steps, &duplicates, started.elapsed());
        Ok(verdicts.dead)
    }

    /// The inbox: records the event IDs of `work` and returns those not
    /// seen before. An ID seen before (or twice in this batch) comes back
    /// once at most, so every other occurrence is a duplicate.
    async fn inbox_insert(
        &self,
        conn: &mut PgConnection,
        items: &[Item<'_>],
        work: &[usize],
    ) -> Result<HashSet<uuid::Uuid>, sqlx::Error> {
        let event_ids: Vec<uuid::Uuid> = work
            .iter()
            .filter_map(|&i| items[i].read.envelope().map(|e| e.event_id))
            .collect();
        let fresh: Vec<uuid::Uuid> = sqlx::query_scalar(
            "INSERT INTO processed_events (consumer, event_id)
             SELECT $1, unnest($2::uuid[])
             ON CONFLICT DO NOTHING RETURNING event_id",
        )
        .bind(self.service)
        .bind(&event_ids)
        .fetch_all(conn)
        .await?;
        Ok(fresh.into_iter().collect())
    }

    /// Takes refused events out of the inbox, so that a replay from the
    /// dead-letter topic is not taken for a duplicate.
    async fn inbox_forget(
        &self,
        conn: &mut PgConnection,
        refused: &[uuid::Uuid],
    ) -> Result<(), sqlx::Error> {
        if !refused.is_empty() {
            sqlx::query("DELETE FROM processed_events WHERE consumer = $1 AND event_id = ANY($2)")
                .bind(self.service)
                .bind(refused)
                .execute(conn)
                .await?;
        }
        Ok(())
    }

    /// The events of `work` in arrival order: a step (with its message's
    /// span) for each one `fresh` holds, the types of the others
    /// (duplicates, logged as such).
    fn sort_out<'a>(
        &self,
        items: &'a [Item<'_>],
        work: &[usize],
        mut fresh: HashSet<uuid::Uuid>,
    ) -> Sorted<'a> {
        let mut sorted = Sorted {
            steps: Vec::with_capacity(fresh.len()),
            step_items: Vec::with_capacity(fresh.len()),
            duplicates: Vec::new(),
        };
        for &i in work {
            let item = &items[i];
            let Some(env) = item.read.envelope() else {
                continue;
            };
            let span = message_span(self.service, &item.msg, env);
            if fresh.remove(&env.event_id) {
                sorted.steps.push(Step::new(env, span));
                sorted.step_items.push(i);
            } else {
                span.in_scope(|| tracing::info!("duplicate event ignored"));
                sorted.duplicates.push(env.event_type());
            }
        }
        sorted
    }

    /// A span per step for the transaction it shares with the batch, so
    /// that each event's trace shows it.
    fn transaction_spans(&self, steps: &[Step<'_>]) -> Vec<tracing::Span> {
        let database = self.pool.connect_options();
        let database = database.get_database().unwrap_or("postgres");
        steps
            .iter()
            .map(|s| {
                telemetry::db_span(
                    s.span(),
                    database,
                    "transaction",
                    Some(steps.len()),
                    s.envelope(),
                )
            })
            .collect()
    }

    /// Each event's share of the batch's time, by outcome: the handlers
    /// work on the batch as a whole, so no event has a time of its own.
    fn observe_batch(&self, steps: &[Step<'_>], duplicates: &[&'static str], took: Duration) {
        let n = steps.len() + duplicates.len();
        let share = took / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        let m = metrics::global();
        for step in steps {
            let label = if step.verdict.is_ok() {
                "applied"
            } else {
                "dead_lettered"
            };
            m.observe_handler(self.service, step.envelope.event_type(), label, share);
        }
        for event_type in duplicates {
            m.observe_handler(self.service, event_type, "duplicate", share);
        }
    }

    /// Copies `msg` to `<topic>.dlq` with headers saying who gave up and why,
    /// and returns once the broker has acknowledged the copy: only then may
    /// the offset be stored. Every failure is retried with capped backoff
    /// (or until shutdown), logged and counted: a broker that is away, and
    /// a broker that refuses for now (wrong ACLs, topic missing) alike, so
    /// nothing is skipped without its copy in the DLQ. The one refusal that
    /// retrying cannot cure, a message too large for the producer, gets a
    /// copy without its value (headers `dlq.truncated` and
    /// `dlq.original.size` say so; the original stays in its topic at its
    /// offset), so it cannot hold up its partition for good.
    async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let topic = events::topics::dlq(msg.topic());
        let position = DeadLetter {
            service: self.service,
            reason,
            partition: msg.partition().to_string(),
            offset: msg.offset().to_string(),
            failed_at: chrono::Utc::now().to_rfc3339(),
        };
        let labels = metrics::TopicLabels {
            service: self.service.to_owned(),
            topic: msg.topic().to_owned(),
        };
        tracing::warn!(
            service = self.service,
            topic = msg.topic(),
            partition = msg.partition(),
            offset = msg.offset(),
            reason,
            "dead-lettering message"
        );
        self.copy_to_dlq(msg, &topic, &position, &labels, shutdown)
            .await
    }

    /// Publishes the copy of `msg` until the broker acknowledges it (see
    /// [`EventLoop::dead_letter`]).
    async fn copy_to_dlq(
        &self,
        msg: &BorrowedMessage<'_>,
        topic: &str,
        position: &DeadLetter<'_>,
        labels: &metrics::TopicLabels,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let mut truncated = false;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Only a copy that reported its trouble clears it.
        let mut reported = false;
        loop {
            let record = position.record(msg, topic, truncated);
            match self.producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => {
                    metrics::global().dead_lettered.get_or_create(labels).inc();
                    if reported {
                        self.health.recover(DLQ_HEALTH_COMPONENT);
                    }
                    return Ok(());
                }
                Err((e, _)) if !truncated && kafka::is_too_large(&e) => {
                    tracing::error!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), dlq = topic, error = %e, size = msg.payload_len(), "the dead-letter topic cannot take this message whole; sending a copy without its value");
                    truncated = true;
                }
                Err((e, _)) => {
                    metrics::global()
                        .dead_letter_failed
                        .get_or_create(labels)
                        .inc();
                    // The partition waits behind this copy: not ready.
                    reported = true;
                    self.health.degrade(
                        DLQ_HEALTH_COMPONENT,
                        format!(
                            "cannot copy {}/{}@{} to its dead-letter topic {topic}: {e}",
                            msg.topic(),
                            msg.partition(),
                            msg.offset()
                        ),
                    );
                    if kafka::is_permanent(&e) {
                        tracing::error!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), dlq = topic, error = %e, "the broker refuses the dead-letter copy; retrying until it takes it (check the topic and its ACLs)");
                    } else {
                        tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), dlq = topic, error = %e, "dead-letter publish failed; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.cancelled() => return Err(Interrupted),
                    }
                }
            }
        }
    }
}

/// Where a dead letter came from and why, as its headers say.
struct DeadLetter<'a> {
    service: &'a str,
    reason: &'a str,
    partition: String,
    offset: String,
    failed_at: String,
}

impl DeadLetter<'_> {
    /// The copy of `msg` for `dlq`: its key, its value (unless `truncated`),
    /// its headers and the `dlq.*` headers.
    fn record<'m>(
        &'m self,
        msg: &'m BorrowedMessage<'_>,
        dlq: &'m str,
        truncated: bool,
    ) -> FutureRecord<'m, [u8], [u8]> {
        let copied = msg
            .headers()
            .map(|original| {
                original
                    .iter()
                    .fold(OwnedHeaders::new(), |hdrs, h| hdrs.insert(h))
            })
            .unwrap_or_default();
        let mut hdrs = kafka::with_headers(
            copied,
            [
                (headers::DLQ_CONSUMER, self.service),
                (headers::DLQ_REASON, self.reason),
                (headers::DLQ_TOPIC, msg.topic()),
                (headers::DLQ_PARTITION, self.partition.as_str()),
                (headers::DLQ_OFFSET, self.offset.as_str()),
                (headers::DLQ_FAILED_AT, self.failed_at.as_str()),
            ],
        );
        if truncated {
            let size = msg.payload_len().to_string();
            hdrs = kafka::with_headers(
                hdrs,
                [
                    (headers::DLQ_TRUNCATED, "true"),
                    (headers::DLQ_ORIGINAL_SIZE, size.as_str()),
                ],
            );
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq).headers(hdrs);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        match msg.payload() {
            Some(p) if !truncated => record.payload(p),
            _ => record,
        }
    }
}

/// The span of one consumed message: a child of the producer's trace context,
/// with the OpenTelemetry messaging attributes and the saga's own keys.
fn message_span(service: &'static str, msg: &BorrowedMessage<'_>, env: &Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "consume",
        otel.name = format!("{} process", msg.topic()),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        service = service,
        messaging.system = "kafka",
        messaging.operation = "process",
        messaging.destination.name = msg.topic(),
        messaging.kafka.message.key = %env.order_id,
        messaging.kafka.destination.partition = msg.partition(),
        messaging.kafka.message.offset = msg.offset(),
        messaging.message.id = %env.event_id,
        event_type = env.event_type(),
        order_id = %env.order_id,
        correlation_id = %env.correlation_id,
    );
    telemetry::set_remote_parent(&span, kafka::header(msg, headers::TRACEPARENT).as_deref());
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{CorrelationId, OrderId, PaymentRefunded};

    fn refund() -> Vec<u8> {
        let event = Event::PaymentRefunded(PaymentRefunded {
            payment_id: uuid::Uuid::new_v4(),
            amount: events::Money::from_minor(100),
            reason: "cancelled".into(),
        });
        Envelope::new(OrderId::new(), CorrelationId::generate(), event)
            .to_json()
            .expect("an envelope serialises")
    }

    fn read(value: &[u8], handled: &[EventType]) -> Read {
        Read::of(Some(value), |kind| handled.contains(&kind), &[])
    }

    #[test]
    fn a_handled_event_is_read_whole() {
        let r = read(&refund(), &[EventType::PaymentRefunded]);
        assert!(
            matches!(r, Read::Event(ref e) if e.event.kind() == EventType::PaymentRefunded),
            "{r:?}"
        );
    }

    #[test]
    fn kinds_not_handled_here_are_skipped_unread_even_unknown_or_with_bad_data() {
        let r = read(&refund(), &[EventType::OrderCreated]);
        assert!(
            matches!(r, Read::Skipped { ref event_type, known: true } if event_type == "PaymentRefunded"),
            "{r:?}"
        );
        let newer = br#"{"event_id":"00000000-0000-0000-0000-000000000000","event_type":"LoyaltyPointsAwarded","schema_version":1,"data":{"points":7}}"#;
        let r = read(newer, EventType::ALL);
        assert!(
            matches!(r, Read::Skipped { ref event_type, known: false } if event_type == "LoyaltyPointsAwarded"),
            "{r:?}"
        );
        let bad_data = br#"{"event_type":"OrderCreated","schema_version":1,"data":{"total":"x"}}"#;
        assert!(matches!(
            read(bad_data, &[EventType::PaymentRefunded]),
            Read::Skipped { known: true, .. }
        ));
    }

    #[test]
    fn a_kind_treated_as_unknown_is_skipped_as_unknown_even_if_handled() {
        let r = Read::of(
            Some(&refund()),
            |_| true,
            &[EventType::OrderCancelled, EventType::PaymentRefunded],
        );
        assert!(
            matches!(r, Read::Skipped { ref event_type, known: false } if event_type == "PaymentRefunded"),
            "{r:?}"
        );
    }

    #[test]
    fn not_an_envelope_a_newer_schema_or_a_handled_event_with_bad_data_is_malformed() {
        let cases: [(&[u8], &str); 4] = [
            (b"not json", "not a valid event envelope"),
            (br#"{"data":{}}"#, "not a valid event envelope"),
            (
                br#"{"event_type":"PaymentRefunded","schema_version":2,"data":{}}"#,
                "unsupported schema_version 2",
            ),
            (
                br#"{"event_type":"PaymentRefunded","schema_version":1,"data":{"amount":"x"}}"#,
                "not a valid event envelope",
            ),
        ];
        for (value, why) in cases {
            let r = read(value, EventType::ALL);
            assert!(
                matches!(r, Read::Malformed(ref w) if w.starts_with(why)),
                "{r:?}"
            );
        }
        assert!(matches!(Read::of(None, |_| true, &[]), Read::Malformed(_)));
    }
}
