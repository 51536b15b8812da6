//! Operator commands for the checkout saga. The first is the books audit
//! ([`audit`]); `src/main.rs` is the `saga-admin` command line over it.

pub mod audit;
