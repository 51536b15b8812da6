//! Kafka header names, the same for every service and tool.

/// The envelope's `event_type`, readable without parsing the value.
pub const EVENT_TYPE: &str = "event_type";
/// The envelope's `event_id`.
pub const EVENT_ID: &str = "event_id";
/// The envelope's `correlation_id`.
pub const CORRELATION_ID: &str = "correlation_id";
/// W3C trace context of the span that published the event.
pub const TRACEPARENT: &str = "traceparent";
/// `application/json`.
pub const CONTENT_TYPE: &str = "content-type";

/// On a dead letter: the service whose consumer gave up on the message.
pub const DLQ_CONSUMER: &str = "dlq.consumer";
/// On a dead letter: why (`malformed message: …`, the handler's refusal,
/// `unsupported schema_version N`, a SQLSTATE).
pub const DLQ_REASON: &str = "dlq.reason";
/// On a dead letter: where the message was read.
pub const DLQ_TOPIC: &str = "dlq.original.topic";
pub const DLQ_PARTITION: &str = "dlq.original.partition";
pub const DLQ_OFFSET: &str = "dlq.original.offset";
/// On a dead letter: when (RFC 3339).
pub const DLQ_FAILED_AT: &str = "dlq.failed_at";
/// Set to `true` on a copy sent without its value (too large).
pub const DLQ_TRUNCATED: &str = "dlq.truncated";
/// On a copy sent without its value: the value's size in bytes.
pub const DLQ_ORIGINAL_SIZE: &str = "dlq.original.size";

/// On a message redriven from a dead-letter topic (`saga-admin dlq
/// redrive`): the dead letter it came from, `<dlq topic>/<partition>@<offset>`.
pub const REDRIVEN_FROM: &str = "dlq.redriven_from";
/// On a redriven message: when it was redriven (RFC 3339).
pub const REDRIVEN_AT: &str = "dlq.redriven_at";
/// On an event published again from a service's `parked_events` (its type
/// was unknown to the build that read it first): where it had been read,
/// `<topic>/<partition>@<offset>`.
pub const PARKED_FROM: &str = "parked.from";
