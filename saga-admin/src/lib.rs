//! Operator commands for the checkout saga: the books audit ([`audit`]),
//! the dead letters ([`dlq`]: list, show, redrive) and bearer tokens
//! ([`token`]: the operator's, and development tokens); `src/main.rs` is
//! the `saga-admin` command line over them.

pub mod audit;
pub mod dlq;
pub mod token;
