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

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::statistics::Statistics;

/// How long a consumer's group join may stay unsettled before the consumer
/// is rebuilt: two session timeouts, longer than a rebalance that is merely
/// waiting for a dead member to expire.
pub const REJOIN_AFTER: Duration = Duration::from_secs(20);

/// How long before an unsettled join is reported on `/ready`.
pub const REPORT_AFTER: Duration = Duration::from_secs(10);

/// How often librdkafka reports statistics (`statistics.interval.ms`).
pub const STATS_EVERY: Duration = Duration::from_secs(1);

/// The consumer's librdkafka context: keeps the group's join state.
#[derive(Debug)]
pub struct GroupContext {
    state: Mutex<JoinState>,
}

#[derive(Debug)]
struct JoinState {
    /// librdkafka's `cgrp.join_state` (`steady` once assigned).
    join_state: String,
    /// Since when it has not been `steady`, if it is not.
    unsettled_since: Option<Instant>,
}

impl Default for GroupContext {
    fn default() -> Self {
        Self {
            state: Mutex::new(JoinState {
                join_state: "init".to_owned(),
                // Counts from creation: a consumer that never joins is stuck too.
                unsettled_since: Some(Instant::now()),
            }),
        }
    }
}

impl GroupContext {
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
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(cgrp) = statistics.cgrp {
            self.record(&cgrp.join_state, Instant::now());
        }
    }
}

impl ConsumerContext for GroupContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsettled_until_steady_and_counted_from_the_first_unsettled_report() {
        let ctx = GroupContext::default();
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
}
