//! Configuration from the environment, gathered: each concern reads its
//! own settings ([`crate::kafka::KafkaConfig`], [`crate::auth::AuthConfig`],
//! [`crate::group::GroupProtocol`]) with [`crate::env`]; a bad or missing
//! value stops start-up with one line that names the variable and says why.

use std::time::Duration;

use events::EventType;

pub use crate::env::{flag, parsed, parsed_in, parsed_with, required, var, ConfigError};
pub use crate::group::GroupProtocol;
pub use crate::kafka::KafkaConfig;

/// What every service reads from its environment.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub service_name: &'static str,
    /// `PORT`; 0 binds a free port (tests).
    pub port: u16,
    /// `HOST` to bind (default `0.0.0.0`).
    pub host: String,
    /// `DATABASE_URL` of the service's own database; created if missing.
    pub database_url: String,
    /// `DATABASE_MAX_CONNECTIONS` (default 10): the request handlers' pool;
    /// the consumer and the relay have two more connections of their own.
    pub max_connections: u32,
    pub kafka: KafkaConfig,
    /// `SHUTDOWN_GRACE_SECS`: how long in-flight work may take after SIGTERM (default 10).
    pub shutdown_grace: Duration,
    /// `KAFKA_GROUP_INSTANCE_ID`: the consumer's `group.instance.id`
    /// (static group membership, KIP-345), unset by default. On Apache
    /// Kafka, a stable ID per replica (a StatefulSet pod name, say) lets a
    /// replica restarted after a crash take its partitions back at once
    /// instead of waiting for a rebalance. Two live replicas must never
    /// share one. A static member that dies keeps its partitions until its
    /// session times out (10 s) unless it comes back first.
    pub group_instance_id: Option<String>,
    /// `KAFKA_GROUP_PROTOCOL` and `KAFKA_PARTITION_ASSIGNMENT_STRATEGY`:
    /// how the consumer takes part in its group (see [`GroupProtocol`]).
    pub group_protocol: GroupProtocol,
    /// `AUTH_JWKS_URL` / `AUTH_JWKS_FILE`, `AUTH_ISSUER`, `AUTH_AUDIENCE`:
    /// bearer-token authentication, off (`None`) unless a key set is given
    /// (see [`crate::auth`]).
    pub auth: Option<crate::auth::AuthConfig>,
    /// `CONSUMER_UNKNOWN_EVENT_TYPES`: event types (comma-separated) this
    /// replica treats as unknown to its build, as a replica of an older
    /// release would: skipped and parked, never handled (see
    /// [`crate::parked`]). For rehearsing a rolling upgrade, or for holding
    /// back one event type for a while. Empty by default.
    pub unknown_event_types: Vec<EventType>,
}

impl ServiceConfig {
    pub fn from_env(service_name: &'static str, default_port: u16) -> Result<Self, ConfigError> {
        let database_url = required(
            "DATABASE_URL",
            &format!(
                "set it to this service's PostgreSQL database, e.g. postgres://postgres@localhost:5432/{}",
                service_name.replace('-', "_")
            ),
        )?;
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                var: "DATABASE_URL".into(),
                value: database_url,
                reason: "must start with postgres:// or postgresql://".into(),
            });
        }
        Ok(Self {
            service_name,
            port: parsed("PORT", default_port)?,
            host: var("HOST").unwrap_or_else(|| "0.0.0.0".to_owned()),
            database_url,
            max_connections: parsed_in("DATABASE_MAX_CONNECTIONS", 10, 2..=500)?,
            kafka: KafkaConfig::from_env()?,
            shutdown_grace: Duration::from_secs(parsed_in("SHUTDOWN_GRACE_SECS", 10u64, 1..=3600)?),
            group_instance_id: group_instance_id()?,
            group_protocol: GroupProtocol::from_env()?,
            auth: crate::auth::AuthConfig::from_env()?,
            unknown_event_types: match var("CONSUMER_UNKNOWN_EVENT_TYPES") {
                None => Vec::new(),
                Some(raw) => event_types(&raw).map_err(|reason| ConfigError::Invalid {
                    var: "CONSUMER_UNKNOWN_EVENT_TYPES".into(),
                    value: raw.clone(),
                    reason,
                })?,
            },
        })
    }
}

/// A comma-separated list of event type names.
fn event_types(raw: &str) -> Result<Vec<EventType>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            EventType::parse(name).ok_or_else(|| {
                format!(
                    "{name} is not an event type (one of {})",
                    EventType::names()
                )
            })
        })
        .collect()
}

/// See [`ServiceConfig::group_instance_id`].
fn group_instance_id() -> Result<Option<String>, ConfigError> {
    match var("KAFKA_GROUP_INSTANCE_ID") {
        Some(id) if id.len() > 200 || !id.chars().all(|c| c.is_ascii_graphic()) => {
            Err(ConfigError::Invalid {
                var: "KAFKA_GROUP_INSTANCE_ID".into(),
                value: id,
                reason: "must be 1 to 200 printable ASCII characters without spaces".into(),
            })
        }
        id => Ok(id),
    }
}

#[cfg(test)]
mod tests {
    use super::event_types;
    use events::EventType;

    #[test]
    fn event_type_lists_are_names_separated_by_commas() {
        assert_eq!(event_types(""), Ok(vec![]));
        assert_eq!(
            event_types(" OrderCancelled, InventoryReleased ,"),
            Ok(vec![
                EventType::OrderCancelled,
                EventType::InventoryReleased
            ])
        );
        let err = event_types("OrderCancelled,LoyaltyPointsAwarded").unwrap_err();
        assert!(
            err.starts_with("LoyaltyPointsAwarded is not an event type (one of "),
            "{err}"
        );
    }
}
