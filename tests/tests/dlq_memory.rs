//! `saga-admin dlq` reads dead-letter topics a page at a time: listing a
//! topic many times larger than a page (redrive reads the same way) keeps
//! the tool's memory near a page's worth instead of the topic's. This file
//! is its own test binary, so the peak memory of the processes it waits
//! for is the tool's alone.

use std::time::Duration;

use anyhow::Context;
use nix::sys::resource::{getrusage, UsageWho};
use rdkafka::producer::FutureRecord;
use saga_tests::procs::bin_dir;
use saga_tests::System;

/// Dead letters written, and the size of each value.
const LETTERS: usize = 150;
const VALUE_BYTES: usize = 900_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_a_large_dead_letter_topic_holds_a_page_not_the_topic() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let dlq = format!("{}.dlq", sys.topic("order-events"));
    let producer = sys.producer()?;
    let value = vec![b'x'; VALUE_BYTES];
    for i in 0..LETTERS {
        let key = format!("big-{i}");
        producer
            .send(
                FutureRecord::to(&dlq).key(&key).payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| anyhow::Error::new(e).context("writing a dead letter"))?;
    }
    let kafka = sys.kafka();
    let out = tokio::task::spawn_blocking({
        let (brokers, prefix) = (kafka.brokers.clone(), kafka.topic_prefix.clone());
        move || -> anyhow::Result<std::process::Output> {
            std::process::Command::new(bin_dir()?.join("saga-admin"))
                .args(["dlq", "list", "--topic", "order-events"])
                .env("KAFKA_BROKERS", brokers)
                .env("KAFKA_TOPIC_PREFIX", prefix)
                .env("RUST_LOG", "warn")
                .output()
                .context("running saga-admin")
        }
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{LETTERS} dead letters")),
        "{stdout}"
    );
    // Peak resident memory of the children waited for (KiB on Linux).
    let peak_mib = getrusage(UsageWho::RUSAGE_CHILDREN)?.max_rss() / 1024;
    let topic_mib = (LETTERS * VALUE_BYTES) as i64 >> 20;
    println!("saga-admin dlq list: peak {peak_mib} MiB for a {topic_mib} MiB topic");
    assert!(
        peak_mib < topic_mib * 2 / 3,
        "saga-admin held {peak_mib} MiB listing a {topic_mib} MiB topic"
    );
    sys.shutdown().await
}
