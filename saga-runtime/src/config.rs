//! Configuration from the environment. A bad or missing value stops start-up
//! with one line that names the variable and says why.

use std::str::FromStr;
use std::time::Duration;

use events::EventType;

/// A configuration problem; `Display` is the one line shown to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set: {hint}")]
    Missing { var: String, hint: String },
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: String,
        value: String,
        reason: String,
    },
}

/// Reads a variable; unset and empty count as absent.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A required variable.
pub fn required(name: &str, hint: &str) -> Result<String, ConfigError> {
    var(name).ok_or_else(|| ConfigError::Missing {
        var: name.to_owned(),
        hint: hint.to_owned(),
    })
}

/// A variable parsed with `FromStr`, or `default` when unset.
pub fn parsed<T>(name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e: T::Err| ConfigError::Invalid {
                var: name.to_owned(),
                value: raw.clone(),
                reason: e.to_string(),
            }),
    }
}

/// A yes/no switch: `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`);
/// unset is `false`.
pub fn flag(name: &str) -> Result<bool, ConfigError> {
    match var(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                var: name.to_owned(),
                value: v,
                reason: "expected true or false".to_owned(),
            }),
        },
    }
}

/// A variable checked by `check` after parsing.
pub fn parsed_with<T, F>(name: &str, default: T, check: F) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
    F: FnOnce(&T) -> Result<(), String>,
{
    let value = parsed(name, default)?;
    check(&value).map_err(|reason| ConfigError::Invalid {
        var: name.to_owned(),
        value: var(name).unwrap_or_default(),
        reason,
    })?;
    Ok(value)
}

/// Kafka settings shared by producer, consumer and admin client.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `KAFKA_BROKERS`, comma-separated `host:port` (default `localhost:9092`).
    pub brokers: String,
    /// `KAFKA_TOPIC_PREFIX`: prepended to every topic and consumer group, so
    /// isolated systems (or test runs) can share one broker. Default empty.
    pub topic_prefix: String,
    /// `KAFKA_FETCH_WAIT_MS`: the consumer's `fetch.wait.max.ms` (default
    /// 500, the Java consumer's). Kafka answers a fetch as soon as data
    /// arrives, so this only sets how often an idle consumer asks again:
    /// shorter costs the broker CPU for nothing (measured idle: the broker
    /// at 14% of a core with 100 ms, 6% with 500 ms).
    pub fetch_wait_ms: u32,
    /// `KAFKA_PARTITIONS` for topics this service creates (default 3).
    pub partitions: i32,
    /// `KAFKA_REPLICATION_FACTOR` for topics this service creates (default 1).
    pub replication_factor: i32,
    /// `KAFKA_LINGER_MS`: producer batching delay (default 0: the relay
    /// already sends what committed together as one wave, and under load
    /// librdkafka batches what queues behind a request in flight; 1 ms
    /// cost 2-7 ms of end-to-end p50 at 200 orders/s, docs/performance.md).
    pub linger_ms: u32,
}

impl KafkaConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            brokers: var("KAFKA_BROKERS").unwrap_or_else(|| "localhost:9092".to_owned()),
            topic_prefix: parsed_with("KAFKA_TOPIC_PREFIX", String::new(), |p| {
                if p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    Ok(())
                } else {
                    Err("only letters, digits, '-', '_' and '.' are allowed".into())
                }
            })?,
            fetch_wait_ms: parsed_with("KAFKA_FETCH_WAIT_MS", 500, |v| {
                if (1..=10_000).contains(v) {
                    Ok(())
                } else {
                    Err("must be between 1 and 10000".into())
                }
            })?,
            partitions: parsed_with("KAFKA_PARTITIONS", 3, |v| {
                if (1..=1000).contains(v) {
                    Ok(())
                } else {
                    Err("must be between 1 and 1000".into())
                }
            })?,
            replication_factor: parsed_with("KAFKA_REPLICATION_FACTOR", 1, |v| {
                if (1..=10).contains(v) {
                    Ok(())
                } else {
                    Err("must be between 1 and 10".into())
                }
            })?,
            linger_ms: parsed_with("KAFKA_LINGER_MS", 0, |v| {
                if *v <= 1000 {
                    Ok(())
                } else {
                    Err("must be at most 1000".into())
                }
            })?,
        })
    }

    /// The real name of an (unprefixed) saga topic.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// The consumer group of a service.
    pub fn group_id(&self, service: &str) -> String {
        format!("{}{}", self.topic_prefix, service)
    }
}

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
            max_connections: parsed_with("DATABASE_MAX_CONNECTIONS", 10, |v| {
                if (2..=500).contains(v) {
                    Ok(())
                } else {
                    Err("must be between 2 and 500".into())
                }
            })?,
            kafka: KafkaConfig::from_env()?,
            shutdown_grace: Duration::from_secs(parsed_with("SHUTDOWN_GRACE_SECS", 10u64, |v| {
                if (1..=3600).contains(v) {
                    Ok(())
                } else {
                    Err("must be between 1 and 3600".into())
                }
            })?),
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
    fn from_env() -> Result<Self, ConfigError> {
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
