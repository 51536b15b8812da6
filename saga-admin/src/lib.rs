//! Operator commands for the checkout saga: the books audit ([`audit`])
//! and the dead letters ([`dlq`]: list, show, redrive); `src/main.rs` is
//! the `saga-admin` command line over them.

pub mod audit;
pub mod dlq;
