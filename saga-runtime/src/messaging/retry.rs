//! Capped exponential backoff, for every loop that waits an outage out.

use std::time::Duration;

/// Delays that double from `first` up to `cap`, with up to a quarter of
/// jitter so that replicas retrying the same outage do not move in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            next: first,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.cap);
        base.mul_f64(rand::random_range(0.75..=1.0))
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, base) in delays.iter().zip([100, 200, 400, 800, 1000, 1000]) {
            assert!(
                *d <= ms(base) && *d >= ms(base * 3 / 4),
                "{d:?} vs {base} ms"
            );
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }
}
