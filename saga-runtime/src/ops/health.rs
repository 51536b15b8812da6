//! What the background work knows about the service's health, for `/ready`.
//!
//! The probes check the database and the broker themselves, but a probe's
//! `SELECT 1` succeeds through outages that still stop the real work (a
//! read-only window, a lock or resource shortage). The consumer loop and
//! the relay report here while they wait such an outage out, so `/ready`
//! says why the service is not doing its work.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Shared, cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Health {
    degraded: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Health {
    /// `component` cannot do its work, because of `why`.
    pub fn degrade(&self, component: &'static str, why: impl Into<String>) {
        self.lock().insert(component, why.into());
    }

    /// `component` works again.
    pub fn recover(&self, component: &'static str) {
        let mut degraded = self.lock();
        if degraded.remove(component).is_some() {
            tracing::info!(component, "recovered");
        }
    }

    /// The components that cannot work now, and why.
    pub fn degraded(&self) -> BTreeMap<&'static str, String> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.degraded.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::Health;

    #[test]
    fn a_component_is_degraded_until_it_recovers() {
        let h = Health::default();
        assert!(h.degraded().is_empty());
        h.degrade("consumer", "database is read-only");
        h.degrade("relay", "broker away");
        h.recover("relay");
        assert_eq!(
            h.degraded().into_iter().collect::<Vec<_>>(),
            vec![("consumer", "database is read-only".to_owned())]
        );
        h.recover("consumer");
        assert!(h.degraded().is_empty());
    }
}
