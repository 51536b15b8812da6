//! Prometheus metrics, served at `GET /metrics` by every service.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabels {
    pub service: String,
    pub event_type: String,
    /// `applied`, `duplicate`, `dead_lettered` or `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub service: String,
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkippedLabels {
    pub service: String,
    pub topic: String,
    /// As the message names it (at most 64 characters).
    pub event_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub service: String,
    /// `permanent` (the broker refuses the message: ACLs, topic, size;
    /// retried until someone fixes it) or `transient`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `CONFIRMED`, `FAILED` or `CANCELLED`.
    pub status: String,
    /// `payment_declined`, `out_of_stock`, `deadline_exceeded`,
    /// `cancelled`, or empty.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    pub service: String,
    pub topic: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CancelLabels {
    /// `customer` (`POST /orders/{id}/cancel`) or `deadline` (expired).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub service: String,
    /// `missing`, `malformed`, `algorithm`, `unknown_key`, `expired`,
    /// `signature`, `issuer_or_audience` or `invalid`.
    pub reason: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn batch_size_histogram() -> Histogram {
    // 1 … 512
    Histogram::new(exponential_buckets(1.0, 2.0, 10))
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub handled: Family<HandlerLabels, Counter>,
    pub handler_seconds: Histograms<HandlerLabels>,
    pub consumer_errors: Family<ServiceLabels, Counter>,
    pub consumer_retries: Family<ServiceLabels, Counter>,
    pub consumer_rebalances: Family<ServiceLabels, Counter>,
    pub consumer_replaced: Family<ServiceLabels, Counter>,
    pub dead_lettered: Family<TopicLabels, Counter>,
    pub events_skipped: Family<SkippedLabels, Counter>,
    pub events_parked: Family<TopicLabels, Counter>,
    pub events_replayed: Family<TopicLabels, Counter>,
    pub dead_letter_failed: Family<TopicLabels, Counter>,
    pub consumer_batch_size: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub consumer_batch_seconds: Histograms<ServiceLabels>,
    pub outbox_published: Family<ServiceLabels, Counter>,
    pub outbox_publish_seconds: Histograms<ServiceLabels>,
    pub outbox_backlog: Family<ServiceLabels, Gauge>,
    pub outbox_refused: Family<ServiceLabels, Gauge>,
    pub outbox_publish_failures: Family<FailureLabels, Counter>,
    pub orders_finished: Family<OutcomeLabels, Counter>,
    pub saga_seconds: Histograms<OutcomeLabels>,
    pub orders_cancelled: Family<CancelLabels, Counter>,
    pub orders_overdue: Family<ServiceLabels, Gauge>,
    pub consumer_lag: Family<LagLabels, Gauge>,
    pub consumer_stalled: Family<LagLabels, Gauge>,
    pub auth_refused: Family<AuthLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("saga");
        let m = Self {
            handled: Family::default(),
            handler_seconds: Family::new_with_constructor(latency_histogram),
            consumer_errors: Family::default(),
            consumer_retries: Family::default(),
            consumer_rebalances: Family::default(),
            consumer_replaced: Family::default(),
            dead_lettered: Family::default(),
            events_skipped: Family::default(),
            events_parked: Family::default(),
            events_replayed: Family::default(),
            dead_letter_failed: Family::default(),
            consumer_batch_size: Family::new_with_constructor(batch_size_histogram),
            consumer_batch_seconds: Family::new_with_constructor(latency_histogram),
            outbox_published: Family::default(),
            outbox_publish_seconds: Family::new_with_constructor(latency_histogram),
            outbox_backlog: Family::default(),
            outbox_refused: Family::default(),
            outbox_publish_failures: Family::default(),
            orders_finished: Family::default(),
            saga_seconds: Family::new_with_constructor(latency_histogram),
            orders_cancelled: Family::default(),
            orders_overdue: Family::default(),
            consumer_lag: Family::default(),
            consumer_stalled: Family::default(),
            auth_refused: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_handled",
            "Consumed events by outcome",
            m.handled.clone(),
        );
        registry.register(
            "handler_duration_seconds",
            "Each consumed event's share of its batch's handling time (handlers work on whole batches)",
            m.handler_seconds.clone(),
        );
        registry.register(
            "consumer_errors",
            "Kafka poll errors",
            m.consumer_errors.clone(),
        );
        registry.register(
            "consumer_retries",
            "Batch transactions retried after a failure",
            m.consumer_retries.clone(),
        );
        registry.register(
            "consumer_rebalances",
            "Partition assignments this consumer received from its group (one per rebalance it took part in)",
            m.consumer_rebalances.clone(),
        );
        registry.register(
            "consumer_replaced",
            "Consumers replaced by a new one after a fatal error (a static member fenced after its session timed out while the broker was away)",
            m.consumer_replaced.clone(),
        );
        registry.register(
            "events_skipped",
            "Well-formed events of a type this service does not handle (or does not know yet), acknowledged without being read",
            m.events_skipped.clone(),
        );
        registry.register(
            "events_parked",
            "Events of a type this build does not know, kept in parked_events until a build that knows the type publishes them again",
            m.events_parked.clone(),
        );
        registry.register(
            "events_replayed",
            "Parked events this build published again to their topic, since it handles their type",
            m.events_replayed.clone(),
        );
        registry.register(
            "dead_lettered_messages",
            "Messages sent to a dead-letter topic",
            m.dead_lettered.clone(),
        );
        registry.register(
            "dead_letter_publish_failures",
            "Failed attempts to publish a dead-letter copy (each is retried until the broker takes it; the message's offset waits)",
            m.dead_letter_failed.clone(),
        );
        registry.register(
            "outbox_publish_failures",
            "Outbox rows whose publication failed, by kind (the rows stay in the outbox and are retried with backoff)",
            m.outbox_publish_failures.clone(),
        );
        registry.register(
            "consumer_batch_size",
            "Messages taken from Kafka per consumer batch",
            m.consumer_batch_size.clone(),
        );
        registry.register(
            "consumer_batch_duration_seconds",
            "Time to handle one consumer batch, transaction commit included",
            m.consumer_batch_seconds.clone(),
        );
        registry.register(
            "outbox_published",
            "Outbox rows published to Kafka",
            m.outbox_published.clone(),
        );
        registry.register(
            "outbox_publish_latency_seconds",
            "Time from an outbox row's commit to the broker's acknowledgement",
            m.outbox_publish_seconds.clone(),
        );
        registry.register(
            "outbox_backlog",
            "Outbox rows waiting to be published: the whole table, measured once a second (every replica reports the same table; aggregate with max)",
            m.outbox_backlog.clone(),
        );
        registry.register(
            "outbox_refused",
            "Outbox rows the broker refused for good (too large, no ACL, no topic): their orders' events wait until the cause is fixed",
            m.outbox_refused.clone(),
        );
        registry.register(
            "orders_finished",
            "Orders that reached a final status (order-service)",
            m.orders_finished.clone(),
        );
        registry.register(
            "saga_duration_seconds",
            "Order creation to final status (order-service)",
            m.saga_seconds.clone(),
        );
        registry.register(
            "orders_cancelled",
            "Orders cancelled by the customer or expired at their deadline, by reason (order-service)",
            m.orders_cancelled.clone(),
        );
        registry.register(
            "orders_pending_past_half_deadline",
            "PENDING orders older than half of ORDER_DEADLINE_SECS (order-service)",
            m.orders_overdue.clone(),
        );
        registry.register(
            "consumer_lag",
            "Messages in each partition this consumer holds that its group has not committed yet (high watermark minus committed offset)",
            m.consumer_lag.clone(),
        );
        registry.register(
            "consumer_partition_stalled_seconds",
            "How long the group's committed offset on each partition of this consumer's topics has stood still with messages waiting after it (0: progressing or caught up)",
            m.consumer_stalled.clone(),
        );
        registry.register(
            "http_auth_refused",
            "Requests answered 401 because their bearer token was missing or not acceptable, by reason",
            m.auth_refused.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    pub fn service(service: &str) -> ServiceLabels {
        ServiceLabels {
            service: service.to_owned(),
        }
    }

    pub fn observe_handler(&self, service: &str, event_type: &str, outcome: &str, took: Duration) {
        let labels = HandlerLabels {
            service: service.to_owned(),
            event_type: event_type.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.handled.get_or_create(&labels).inc();
        self.handler_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
