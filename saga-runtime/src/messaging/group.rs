//! What a consumer's group membership and progress look like from outside:
//! metrics, never actions.
//!
//! Group membership is the broker's business. A consumer that is slow (a
//! batch held by a row lock, a slow database on one replica) stays a member
//! for up to `max.poll.interval.ms`, and a rebalance waits for it, as Kafka
//! intends; the service never leaves and rejoins on its own, because a
//! rebalance that healthy replicas inflict on one another is an outage of
//! their own making. What this module does instead is show progress:
//!
//! - `saga_consumer_lag{service, topic, partition}`: for each partition this
//!   consumer holds, the high watermark minus the group's committed offset.
//!   librdkafka serves its statistics only while the consumer is polled, so
//!   a consumer stuck in a batch would show a frozen lag just when it
//!   matters: [`watch_progress`] also asks the broker for the high
//!   watermarks every [`WATCH_EVERY`] from another thread, and the larger
//!   figure counts.
//! - `saga_consumer_partition_stalled_seconds{service, topic, partition}`:
//!   for every partition of the consumer's topics, held by this replica or
//!   not, how long the group's committed offset has stood still while
//!   messages wait after it ([`Progress`]). A partition nobody reads, or
//!   whose reader is stuck, grows; the `SagaConsumerStalled` alert fires on
//!   it.
//! - `saga_consumer_rebalances_total{service}`: partition assignments this
//!   consumer received, so that a rebalance nobody asked for shows.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;

use crate::env::{var, ConfigError};
use crate::metrics::{self, LagLabels};

/// How often librdkafka reports statistics (`statistics.interval.ms`).
pub const STATS_EVERY: Duration = Duration::from_secs(1);

/// How often [`watch_progress`] asks the broker for offsets.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The consumer's librdkafka context: publishes the lag of the partitions
/// it holds and counts its rebalances.
#[derive(Debug)]
pub struct GroupContext {
    service: &'static str,
    /// What is known of each assigned partition's offsets, and the lag
    /// gauges set from them last time.
    offsets: Mutex<Offsets>,
}

/// Per assigned partition, by `(topic, partition)`.
#[derive(Debug, Default)]
struct Offsets {
    known: HashMap<(String, i32), PartitionOffsets>,
    published: HashSet<LagLabels>,
}

/// One partition's offsets, from the statistics and from the broker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    /// The group's committed offset (negative: none yet).
    pub committed: i64,
    /// The partition's first offset (negative: unknown).
    pub low: i64,
    /// High watermark as of the last statistics (negative: unknown).
    pub high_stats: i64,
    /// High watermark as of the last direct query (negative: unknown).
    pub high_listed: i64,
}

impl PartitionOffsets {
    /// Messages not committed yet; `None` while no high watermark is known.
    /// A partition the group never committed on is read from its start
    /// (`auto.offset.reset=earliest`), so all of it counts.
    pub fn lag(&self) -> Option<i64> {
        let high = self.high_stats.max(self.high_listed);
        if high < 0 {
            return None;
        }
        let from = if self.committed >= 0 {
            self.committed
        } else {
            self.low.max(0)
        };
        Some((high - from).max(0))
    }
}

impl GroupContext {
    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            offsets: Mutex::new(Offsets::default()),
        }
    }

    /// Takes the statistics' view of the assigned partitions.
    fn record_offsets(&self, statistics: &Statistics) {
        let mut o = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        let mut assigned = HashMap::new();
        for (topic, t) in &statistics.topics {
            for (&id, p) in &t.partitions {
                // -1 is librdkafka's internal "unassigned" partition.
                if id < 0 || !p.desired {
                    continue;
                }
                let key = (topic.clone(), id);
                let before = o.known.get(&key).copied().unwrap_or(PartitionOffsets {
                    high_listed: -1,
                    ..PartitionOffsets::default()
                });
                assigned.insert(
                    key,
                    PartitionOffsets {
                        committed: p.committed_offset,
                        low: p.lo_offset,
                        high_stats: p.hi_offset,
                        high_listed: before.high_listed,
                    },
                );
            }
        }
        o.known = assigned;
        self.publish(&mut o);
    }

    /// Takes a high watermark asked of the broker directly.
    pub fn record_high_watermark(&self, topic: &str, partition: i32, high: i64) {
        let mut o = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = o.known.get_mut(&(topic.to_owned(), partition)) {
            p.high_listed = p.high_listed.max(high);
        }
        self.publish(&mut o);
    }

    /// The partitions this consumer holds, as its statistics last said.
    pub fn assigned(&self) -> Vec<(String, i32)> {
        let o = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        o.known.keys().cloned().collect()
    }

    /// Sets the lag gauge of every partition held, and drops those of
    /// partitions no longer held.
    fn publish(&self, o: &mut Offsets) {
        let family = &metrics::global().consumer_lag;
        let mut now = HashSet::new();
        for ((topic, partition), offsets) in &o.known {
            let Some(lag) = offsets.lag() else {
                continue;
            };
            let labels = LagLabels {
                service: self.service.to_owned(),
                topic: topic.clone(),
                partition: partition.to_string(),
            };
            family.get_or_create(&labels).set(lag);
            now.insert(labels);
        }
        for gone in o.published.difference(&now) {
            family.remove(gone);
        }
        o.published = now;
    }
}

impl Drop for GroupContext {
    fn drop(&mut self) {
        let family = &metrics::global().consumer_lag;
        let o = self
            .offsets
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in o.published.drain() {
            family.remove(&gone);
        }
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        self.record_offsets(&statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                metrics::global()
                    .consumer_rebalances
                    .get_or_create(&metrics::Metrics::service(self.service))
                    .inc();
                tracing::info!(
                    service = self.service,
                    partitions = partitions.count(),
                    "partitions assigned"
                );
            }
            Rebalance::Revoke(partitions) => {
                tracing::info!(
                    service = self.service,
                    partitions = partitions.count(),
                    "partitions revoked"
                );
            }
            Rebalance::Error(e) => {
                tracing::warn!(service = self.service, error = %e, "rebalance failed");
            }
        }
    }
}

/// Every [`WATCH_EVERY`] until `shutdown`: asks the broker for the group's
/// committed offset and the high watermark of every partition of `topics`,
/// for the stalled gauge and for the lag of the partitions `group` holds. It asks through a client
/// of its own (`watcher`: the group's ID, never subscribed, so never a
/// member), never through the group's consumer: holding that one, even for
/// a moment, could keep it alive past its loop's end, and its close is what
/// tells the group it has left.
pub async fn watch_progress(
    group: std::sync::Arc<GroupContext>,
    watcher: rdkafka::consumer::BaseConsumer,
    topics: Vec<String>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut every = tokio::time::interval(WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watcher = std::sync::Arc::new(watcher);
    let progress = std::sync::Arc::new(Mutex::new(Progress::default()));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let (group, watcher, topics, progress) = (
            group.clone(),
            watcher.clone(),
            topics.clone(),
            progress.clone(),
        );
        // Blocking requests to the broker: off the runtime's threads.
        // One round of questions serves both gauges: the high watermarks
        // of the partitions held come from the same answers.
        let asked = tokio::task::spawn_blocking(move || {
            let Some(offsets) = group_offsets(watcher.as_ref(), &topics) else {
                return;
            };
            for key in group.assigned() {
                if let Some(&(_, high)) = offsets.get(&key) {
                    group.record_high_watermark(&key.0, key.1, high);
                }
            }
            let mut progress = progress.lock().unwrap_or_else(PoisonError::into_inner);
            let stalled = progress.observe(offsets, Instant::now());
            publish_stalled(group.service, &stalled);
        });
        tokio::select! {
            _ = asked => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Sets `saga_consumer_partition_stalled_seconds` for every partition.
fn publish_stalled(service: &str, stalled: &HashMap<(String, i32), Duration>) {
    let family = &metrics::global().consumer_stalled;
    for ((topic, partition), for_how_long) in stalled {
        let labels = LagLabels {
            service: service.to_owned(),
            topic: topic.clone(),
            partition: partition.to_string(),
        };
        family
            .get_or_create(&labels)
            .set(i64::try_from(for_how_long.as_secs()).unwrap_or(i64::MAX));
    }
}

/// The group's committed offset and the high watermark of every partition
/// of `topics`, or `None` if the broker did not answer all of it. A
/// partition the group never committed on counts from its first offset.
fn group_offsets<C>(consumer: &C, topics: &[String]) -> Option<HashMap<(String, i32), (i64, i64)>>
where
    C: rdkafka::consumer::Consumer,
{
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let timeout = Duration::from_secs(2);
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout).ok()?;
    let mut out = HashMap::new();
    for e in committed.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        };
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .ok()?;
        out.insert(
            (e.topic().to_owned(), e.partition()),
            (offset.max(low), high),
        );
    }
    Some(out)
}

/// Per partition: whether its group makes progress (see
/// [`Progress::observe`]).
#[derive(Debug, Default)]
pub struct Progress {
    seen: HashMap<(String, i32), Track>,
}

#[derive(Debug, Clone, Copy)]
struct Track {
    /// The committed offset last seen.
    committed: i64,
    /// The high watermark when the committed offset last moved (or was
    /// first seen).
    high_then: i64,
    /// Since when messages have waited with the committed offset unchanged.
    since: Option<Instant>,
}

impl Progress {
    /// Takes `(committed, high)` per partition; returns, for each, how long
    /// it has been stalled: its committed offset unchanged while messages
    /// wait after it. A single record after the committed offset that was
    /// already there when the offset last moved does not count: that is
    /// how a partition ending in a transaction marker (a control record no
    /// consumer ever receives, so its offset is never committed) looks at
    /// rest. Anything written after the offset last moved, or more than
    /// one record, counts.
    pub fn observe(
        &mut self,
        offsets: HashMap<(String, i32), (i64, i64)>,
        now: Instant,
    ) -> HashMap<(String, i32), Duration> {
        let mut seen = HashMap::with_capacity(offsets.len());
        let mut stalled = HashMap::with_capacity(offsets.len());
        for (key, (committed, high)) in offsets {
            let track = match self.seen.get(&key) {
                Some(t) if t.committed == committed => *t,
                _ => Track {
                    committed,
                    high_then: high,
                    since: None,
                },
            };
            let waiting = high > committed + 1 || (high > committed && high > track.high_then);
            let since = if waiting {
                Some(track.since.unwrap_or(now))
            } else {
                None
            };
            stalled.insert(
                key.clone(),
                since.map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
            );
            seen.insert(key, Track { since, ..track });
        }
        self.seen = seen;
        stalled
    }
}

/// How a consumer takes part in its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupProtocol {
    /// `KAFKA_GROUP_PROTOCOL=classic`: the members agree on an assignment
    /// through the group's leader, with librdkafka's
    /// `partition.assignment.strategy` (`KAFKA_PARTITION_ASSIGNMENT_STRATEGY`:
    /// `cooperative-sticky` by default, which moves only the partitions that
    /// must move; `range` or `roundrobin` stop every member for each
    /// rebalance).
    Classic { assignment_strategy: String },
    /// `KAFKA_GROUP_PROTOCOL=consumer` (KIP-848, Kafka 4.0 and later): the
    /// broker assigns partitions to members one by one; its session
    /// timeout and heartbeat interval are the broker's
    /// (`group.consumer.session.timeout.ms`).
    Consumer,
}

impl Default for GroupProtocol {
    fn default() -> Self {
        Self::Classic {
            assignment_strategy: "cooperative-sticky".to_owned(),
        }
    }
}

impl GroupProtocol {
    pub(crate) fn from_env() -> Result<Self, ConfigError> {
        const STRATEGIES: [&str; 3] = ["range", "roundrobin", "cooperative-sticky"];
        let strategy = var("KAFKA_PARTITION_ASSIGNMENT_STRATEGY");
        match var("KAFKA_GROUP_PROTOCOL").as_deref() {
            None | Some("classic") => {
                let Some(strategy) = strategy else {
                    return Ok(Self::default());
                };
                let known = strategy
                    .split(',')
                    .all(|s| STRATEGIES.contains(&s.trim()));
                if known {
                    Ok(Self::Classic {
                        assignment_strategy: strategy,
                    })
                } else {
                    Err(ConfigError::Invalid {
                        var: "KAFKA_PARTITION_ASSIGNMENT_STRATEGY".into(),
                        value: strategy,
                        reason: "must be range, roundrobin or cooperative-sticky (or a comma-separated list of the first two)".into(),
                    })
                }
            }
            Some("consumer") => match strategy {
                None => Ok(Self::Consumer),
                Some(value) => Err(ConfigError::Invalid {
                    var: "KAFKA_PARTITION_ASSIGNMENT_STRATEGY".into(),
                    value,
                    reason: "the broker assigns partitions with KAFKA_GROUP_PROTOCOL=consumer: leave it unset".into(),
                }),
            },
            Some(other) => Err(ConfigError::Invalid {
                var: "KAFKA_GROUP_PROTOCOL".into(),
                value: other.to_owned(),
                reason: "must be classic or consumer".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(committed: i64, high: i64) -> HashMap<(String, i32), (i64, i64)> {
        HashMap::from([(("t".to_owned(), 0), (committed, high))])
    }

    fn stalled(p: &mut Progress, committed: i64, high: i64, now: Instant) -> Duration {
        p.observe(at(committed, high), now)[&("t".to_owned(), 0)]
    }

    #[test]
    fn a_partition_whose_offset_stands_still_with_messages_waiting_stalls() {
        let mut p = Progress::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(stalled(&mut p, 5, 9, t0), Duration::ZERO, "just seen");
        assert_eq!(stalled(&mut p, 5, 9, t0 + s(10)), s(10));
        assert_eq!(stalled(&mut p, 5, 12, t0 + s(30)), s(30), "more arrived");
        // The offset moved: someone reads it.
        assert_eq!(stalled(&mut p, 6, 12, t0 + s(32)), Duration::ZERO);
        assert_eq!(stalled(&mut p, 6, 12, t0 + s(40)), s(8));
        // Caught up: nothing waits.
        assert_eq!(stalled(&mut p, 12, 12, t0 + s(50)), Duration::ZERO);
        assert_eq!(stalled(&mut p, 12, 12, t0 + s(500)), Duration::ZERO);
    }

    #[test]
    fn a_busy_partition_whose_offset_keeps_moving_never_stalls() {
        let mut p = Progress::default();
        let t0 = Instant::now();
        for i in 0..100 {
            let now = t0 + Duration::from_secs(2 * i);
            let committed = 10 * i64::try_from(i).unwrap_or(0);
            assert_eq!(
                stalled(&mut p, committed, committed + 7, now),
                Duration::ZERO
            );
        }
    }

    #[test]
    fn a_trailing_transaction_marker_on_an_idle_partition_is_not_a_stall() {
        let mut p = Progress::default();
        let t0 = Instant::now();
        // The group committed 41 (after the last message, 40); offset 41 is
        // the marker, so the high watermark is 42, for good.
        stalled(&mut p, 30, 42, t0);
        assert_eq!(
            stalled(&mut p, 41, 42, t0 + Duration::from_secs(2)),
            Duration::ZERO
        );
        let hours = t0 + Duration::from_secs(7200);
        assert_eq!(stalled(&mut p, 41, 42, hours), Duration::ZERO);
        // A message written after that is waited for.
        assert_eq!(stalled(&mut p, 41, 43, hours), Duration::ZERO);
        assert_eq!(
            stalled(&mut p, 41, 43, hours + Duration::from_secs(20)),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn a_single_message_written_after_the_offset_moved_counts() {
        let mut p = Progress::default();
        let t0 = Instant::now();
        assert_eq!(stalled(&mut p, 7, 7, t0), Duration::ZERO);
        assert_eq!(
            stalled(&mut p, 7, 8, t0 + Duration::from_secs(1)),
            Duration::ZERO
        );
        assert_eq!(
            stalled(&mut p, 7, 8, t0 + Duration::from_secs(61)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn lag_takes_the_newer_high_watermark_and_counts_uncommitted_partitions_whole() {
        let p = |committed, low, high_stats, high_listed| PartitionOffsets {
            committed,
            low,
            high_stats,
            high_listed,
        };
        assert_eq!(p(10, 0, 15, -1).lag(), Some(5));
        // Statistics stalled at 15 while the broker says 19.
        assert_eq!(p(10, 0, 15, 19).lag(), Some(9));
        // Never committed: everything from the start counts.
        assert_eq!(p(-1001, 3, 7, -1).lag(), Some(4));
        assert_eq!(p(-1001, -1001, 0, -1).lag(), Some(0));
        // No high watermark yet.
        assert_eq!(p(10, 0, -1001, -1).lag(), None);
    }
}
