//! Watching a consumer's group membership from librdkafka's statistics.
//!
//! A consumer that lost its group session (a broker that stalled past the
//! session timeout), or that joined beside its own dead predecessor (a
//! replica restarted by its supervisor before the broker expired the
//! crashed process), normally gets through a rebalance by itself. Some
//! brokers (tansu 0.6) can leave such a join hanging for good, and the
//! consumer then never receives a message again while everything else
//! looks healthy. The consumer loop asks [`GroupContext::stuck_for`] once a
//! second and rebuilds its consumer when the join has not settled for
//! [`REJOIN_AFTER`]: a fresh client's join lets the broker expire the dead
//! members and re-form the group.
//!
//! The same statistics give each assigned partition's lag (the high
//! watermark minus the group's committed offset), published as
//! `saga_consumer_lag{service, topic, partition}`. librdkafka serves its
//! statistics only while the consumer is polled, so a consumer stuck in a
//! batch (a lock, a slow database) would show a frozen lag just when it
//! matters: [`watch_lag`] also asks the broker for each assigned partition's
//! high watermark every few seconds from another thread, and the larger of
//! the two figures counts. A partition this consumer no longer holds (a
//! rebalance gave it to another replica, the consumer was rebuilt) leaves
//! the gauge, so every replica reports only its own partitions.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::statistics::Statistics;

use crate::metrics::{self, LagLabels};

/// How long a consumer's group join may stay unsettled before the consumer
/// is rebuilt: two session timeouts, longer than a rebalance that is merely
/// waiting for a dead member to expire.
pub const REJOIN_AFTER: Duration = Duration::from_secs(20);

/// How long before an unsettled join is reported on `/ready`.
pub const REPORT_AFTER: Duration = Duration::from_secs(10);

/// How often librdkafka reports statistics (`statistics.interval.ms`).
pub const STATS_EVERY: Duration = Duration::from_secs(1);

/// The consumer's librdkafka context: keeps the group's join state and
/// publishes the lag of the partitions it holds.
#[derive(Debug)]
pub struct GroupContext {
    service: &'static str,
    state: Mutex<JoinState>,
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

#[derive(Debug)]
struct JoinState {
    /// librdkafka's `cgrp.join_state` (`steady` once assigned).
    join_state: String,
    /// Since when it has not been `steady`, if it is not.
    unsettled_since: Option<Instant>,
}

impl GroupContext {
    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            state: Mutex::new(JoinState {
                join_state: "init".to_owned(),
                // Counts from creation: a consumer that never joins is stuck too.
                unsettled_since: Some(Instant::now()),
            }),
            offsets: Mutex::new(Offsets::default()),
        }
    }

    /// How long the group join has been unsettled, if it is.
    pub fn stuck_for(&self) -> Option<(Duration, String)> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.unsettled_since
            .map(|since| (since.elapsed(), s.join_state.clone()))
    }

    fn record(&self, join_state: &str, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if join_state == "steady" {
            s.unsettled_since = None;
        } else if s.unsettled_since.is_none() {
            s.unsettled_since = Some(now);
        }
        if s.join_state != join_state {
            tracing::debug!(from = %s.join_state, to = join_state, "consumer group join state");
            s.join_state = join_state.to_owned();
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

/// How often [`watch_lag`] asks for high watermarks.
pub const WATERMARKS_EVERY: Duration = Duration::from_secs(2);

/// Asks the broker for the high watermark of every partition the current
/// consumer holds, every [`WATERMARKS_EVERY`], until `shutdown`; the
/// consumer in `current` may be replaced (rebuilt) meanwhile.
pub async fn watch_lag<C>(
    current: tokio::sync::watch::Receiver<Weak<C>>,
    shutdown: tokio_util::sync::CancellationToken,
) where
    C: rdkafka::consumer::Consumer<GroupContext> + Send + Sync + 'static,
{
    let mut every = tokio::time::interval(WATERMARKS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(consumer) = current.borrow().upgrade() else {
            continue;
        };
        // Blocking requests to the broker: off the runtime's threads.
        let asked = tokio::task::spawn_blocking(move || {
            for (topic, partition) in consumer.context().assigned() {
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(&topic, partition, Duration::from_secs(1))
                {
                    consumer
                        .context()
                        .record_high_watermark(&topic, partition, high);
                }
            }
        });
        tokio::select! {
            _ = asked => {}
            _ = shutdown.cancelled() => return,
        }
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
        if let Some(cgrp) = &statistics.cgrp {
            self.record(&cgrp.join_state, Instant::now());
        }
        self.record_offsets(&statistics);
    }
}

impl ConsumerContext for GroupContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsettled_until_steady_and_counted_from_the_first_unsettled_report() {
        let ctx = GroupContext::new("test");
        assert!(ctx.stuck_for().is_some(), "not joined yet");
        ctx.record("steady", Instant::now());
        assert!(ctx.stuck_for().is_none());
        let lost = Instant::now();
        ctx.record("wait-join", lost);
        ctx.record("wait-sync", Instant::now());
        let (age, state) = ctx.stuck_for().expect("unsettled");
        assert!(age >= lost.elapsed().saturating_sub(Duration::from_millis(1)));
        assert_eq!(state, "wait-sync");
        ctx.record("steady", Instant::now());
        assert!(ctx.stuck_for().is_none());
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
        // A watermark reported short (tansu) never makes it negative.
        assert_eq!(p(10, 0, 8, -1).lag(), Some(0));
    }
}
