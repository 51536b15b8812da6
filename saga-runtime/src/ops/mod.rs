//! Operations: what a service tells the people who run it.

pub mod health;
pub mod metrics;
pub mod telemetry;
