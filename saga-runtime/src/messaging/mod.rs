//! Messaging: everything between the database and Kafka.

pub mod consumer;
pub mod group;
pub mod kafka;
pub mod outbox;
pub mod parked;
pub mod retention;
pub mod retry;
