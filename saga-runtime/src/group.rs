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
//! A join can also settle wrongly, or a settled consumer stop fetching:
//! after a broker stalled past the session timeout, tansu 0.6 was seen to
//! end a consumer's rejoin with the group "Stable", this consumer its only
//! member, yet holding only some of the partitions (one of three, or
//! none), and another consumer holding all its partitions but never
//! receiving a message again. Either way partitions are read by nobody and
//! everything looks healthy. [`watch_lag`] therefore also watches, while
//! this consumer is settled and not itself waiting out an outage, the
//! group's committed offsets on every partition of its topics: one with
//! messages waiting whose committed offset does not move for
//! [`UNREAD_AFTER`] is read by nobody, and that counts as stuck too (a
//! rebuilt consumer's join re-forms the group, hands the partitions out
//! again and fetches afresh). Partitions another live replica reads move,
//! so the replicas of a healthy group leave each other alone.
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
    /// Partitions assigned to this consumer (`cgrp.assignment_size`).
    assignment_size: i32,
    /// Since when a partition of the subscribed topics has had messages
    /// waiting, with its committed offset unchanged, while this consumer
    /// was settled; and which one.
    unread: Option<(Instant, String)>,
}

impl GroupContext {
    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            state: Mutex::new(JoinState {
                join_state: "init".to_owned(),
                // Counts from creation: a consumer that never joins is stuck too.
                unsettled_since: Some(Instant::now()),
                assignment_size: 0,
                unread: None,
            }),
            offsets: Mutex::new(Offsets::default()),
        }
    }

    /// How long the consumer has been stuck, if it is, and how: its group
    /// join unsettled, or settled while a partition of its topics waits
    /// unread (see the module's docs).
    pub fn stuck_for(&self) -> Option<(Duration, String)> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = s.unsettled_since {
            return Some((since.elapsed(), s.join_state.clone()));
        }
        s.unread.as_ref().map(|(since, what)| {
            (
                since.elapsed(),
                format!(
                    "steady holding {} partitions while {what}, unread",
                    s.assignment_size
                ),
            )
        })
    }

    /// A settled member of its group.
    pub fn settled(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.unsettled_since.is_none()
    }

    /// What [`watch_lag`] found: `Some((since, what))` while a partition
    /// waits for a reader, unread since `since`.
    pub fn record_unread(&self, found: Option<(Instant, String)>) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.unread = found;
    }

    fn record(&self, join_state: &str, assignment_size: i32, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.assignment_size = assignment_size;
        if join_state != "steady" {
            s.unread = None;
        }
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

/// How long a partition may wait, its committed offset unchanged, before
/// it counts as read by nobody. The consumer is rebuilt when it has waited
/// [`REJOIN_AFTER`].
pub const UNREAD_AFTER: Duration = Duration::from_secs(10);

/// Asks the broker for the high watermark of every partition the current
/// consumer holds, every [`WATERMARKS_EVERY`], until `shutdown`; the
/// consumer in `current` may be replaced (rebuilt) meanwhile. While the
/// consumer is settled and `health` reports nothing wrong with it, it also
/// watches the group's committed offsets on every partition of `topics`
/// (see the module's docs).
pub async fn watch_lag<C>(
    current: tokio::sync::watch::Receiver<Weak<C>>,
    topics: Vec<String>,
    health: crate::health::Health,
    shutdown: tokio_util::sync::CancellationToken,
) where
    C: rdkafka::consumer::Consumer<GroupContext> + Send + Sync + 'static,
{
    let mut every = tokio::time::interval(WATERMARKS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let waiting = std::sync::Arc::new(Mutex::new(Waiting::default()));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(consumer) = current.borrow().upgrade() else {
            continue;
        };
        let (topics, waiting) = (topics.clone(), waiting.clone());
        // A consumer waiting out an outage holds its partitions still: the
        // others' partitions standing still then says nothing about them.
        // (Only the consumer's own outage counts: this watch's findings
        // show on `/ready` too, under another name.)
        let healthy = !health
            .degraded()
            .contains_key(crate::consumer::HEALTH_COMPONENT);
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
            let mut waiting = waiting.lock().unwrap_or_else(PoisonError::into_inner);
            if healthy && consumer.context().settled() {
                if let Some(offsets) = group_offsets(consumer.as_ref(), &topics) {
                    let found = waiting.observe(offsets, Instant::now());
                    consumer.context().record_unread(found);
                }
            } else {
                *waiting = Waiting::default();
                consumer.context().record_unread(None);
            }
        });
        tokio::select! {
            _ = asked => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The group's committed offset and the high watermark of every partition
/// of `topics`, or `None` if the broker did not answer all of it.
fn group_offsets<C>(consumer: &C, topics: &[String]) -> Option<HashMap<(String, i32), (i64, i64)>>
where
    C: rdkafka::consumer::Consumer<GroupContext>,
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

/// Per partition: the committed offset last seen, and since when it has
/// stood still with messages after it.
#[derive(Debug, Default)]
struct Waiting {
    seen: HashMap<(String, i32), (i64, Instant)>,
}

impl Waiting {
    /// Takes `(committed, high)` per partition; returns the oldest
    /// partition that has waited [`UNREAD_AFTER`] or more (since when,
    /// and a description), if any.
    fn observe(
        &mut self,
        offsets: HashMap<(String, i32), (i64, i64)>,
        now: Instant,
    ) -> Option<(Instant, String)> {
        let mut seen = HashMap::new();
        let mut oldest: Option<(Instant, String)> = None;
        for ((topic, partition), (committed, high)) in offsets {
            if high <= committed {
                continue;
            }
            let since = match self.seen.get(&(topic.clone(), partition)) {
                Some(&(before, since)) if before == committed => since,
                _ => now,
            };
            seen.insert((topic.clone(), partition), (committed, since));
            if now.duration_since(since) >= UNREAD_AFTER
                && oldest.as_ref().is_none_or(|(o, _)| since < *o)
            {
                oldest = Some((
                    since,
                    format!(
                        "{topic}/{partition} has {} messages waiting at offset {committed}",
                        high - committed
                    ),
                ));
            }
        }
        self.seen = seen;
        oldest
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
            self.record(&cgrp.join_state, cgrp.assignment_size, Instant::now());
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
        ctx.record("steady", 1, Instant::now());
        assert!(ctx.stuck_for().is_none());
        let lost = Instant::now();
        ctx.record("wait-join", 0, lost);
        ctx.record("wait-sync", 0, Instant::now());
        let (age, state) = ctx.stuck_for().expect("unsettled");
        assert!(age >= lost.elapsed().saturating_sub(Duration::from_millis(1)));
        assert_eq!(state, "wait-sync");
        ctx.record("steady", 1, Instant::now());
        assert!(ctx.stuck_for().is_none());
    }

    #[test]
    fn a_partition_waiting_with_its_committed_offset_still_counts_after_a_while() {
        let mut w = Waiting::default();
        let t0 = Instant::now();
        let key = ("t".to_owned(), 0);
        let at = |c, h| HashMap::from([(key.clone(), (c, h))]);
        assert!(w.observe(at(5, 9), t0).is_none(), "just seen");
        assert!(w.observe(at(5, 9), t0 + UNREAD_AFTER / 2).is_none());
        let (since, what) = w
            .observe(at(5, 12), t0 + UNREAD_AFTER)
            .expect("waited long enough with the offset unchanged");
        assert_eq!(since, t0);
        assert!(
            what.contains("t/0 has 7 messages waiting at offset 5"),
            "{what}"
        );
        // The offset moved: someone reads it; counting starts again.
        let t1 = t0 + UNREAD_AFTER * 2;
        assert!(w.observe(at(6, 12), t1).is_none());
        assert!(w.observe(at(6, 12), t1 + UNREAD_AFTER / 2).is_none());
        // Caught up: nothing waits.
        assert!(w.observe(at(12, 12), t1 + UNREAD_AFTER * 3).is_none());
    }

    #[test]
    fn a_partition_nobody_reads_makes_a_settled_consumer_stuck() {
        let ctx = GroupContext::new("test");
        ctx.record("steady", 1, Instant::now());
        assert!(ctx.settled());
        ctx.record_unread(Some((Instant::now(), "t/0 waits".into())));
        let (_, why) = ctx
            .stuck_for()
            .expect("an unread partition counts as stuck");
        assert!(
            why.contains("holding 1 partitions while t/0 waits"),
            "{why}"
        );
        ctx.record_unread(None);
        assert!(ctx.stuck_for().is_none());
        // Rejoining clears it: the new join decides again.
        ctx.record_unread(Some((Instant::now(), "t/0 waits".into())));
        ctx.record("wait-join", 0, Instant::now());
        ctx.record("steady", 3, Instant::now());
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
