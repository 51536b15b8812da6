//! Apache Kafka's own command-line tools against a running saga, as a user
//! runs them (the README's recipes): the console consumer tails
//! `order-events` with keys and headers, and `kafka-consumer-groups.sh`
//! describes the services' groups. The tools are the wrappers
//! `scripts/infra.sh` writes beside Kafka's jars (`$KAFKA_HOME/bin`, which
//! `scripts/test.sh` exports).

use std::time::Duration;

use anyhow::Context;
use saga_tests::{kafka_tool, poll, System};

/// Owned arguments for [`kafka_tool`].
fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|&a| a.to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafkas_console_consumer_and_group_tool_show_the_saga() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let ids = sys.confirm_orders(1).await?;
    let id = ids.first().context("one order")?;
    let correlation = sys.order(id).await?["correlation_id"]
        .as_str()
        .map(str::to_owned)
        .context("the order has a correlation_id")?;
    let brokers = sys.kafka().brokers.clone();

    // The README's tail: every event of the order, keyed by its ID, with
    // its headers.
    let topic = sys.topic("order-events");
    let tail = kafka_tool(
        "kafka-console-consumer.sh",
        owned(&[
            "--bootstrap-server",
            &brokers,
            "--topic",
            &topic,
            "--from-beginning",
            "--property",
            "print.key=true",
            "--property",
            "print.headers=true",
            "--property",
            "key.separator= | ",
            "--property",
            "headers.separator=,",
            "--max-messages",
            "2",
            "--timeout-ms",
            "30000",
        ]),
    )
    .await?;
    let lines: Vec<&str> = tail.lines().filter(|l| !l.trim().is_empty()).collect();
    anyhow::ensure!(
        lines.len() == 2,
        "expected OrderCreated and OrderConfirmed:\n{tail}"
    );
    for (line, event) in lines.iter().zip(["OrderCreated", "OrderConfirmed"]) {
        let mut parts = line.splitn(3, " | ");
        let (headers, key, value) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        anyhow::ensure!(key == id, "key {key:?}, not the order's ID {id}: {line}");
        anyhow::ensure!(
            headers.contains(&format!("event_type:{event}"))
                && headers.contains(&format!("correlation_id:{correlation}")),
            "headers of the {event} line: {headers}"
        );
        let value: serde_json::Value =
            serde_json::from_str(value).with_context(|| format!("the value of {line}"))?;
        anyhow::ensure!(value["event_type"] == event, "{value}");
    }

    // The groups settle with nothing left to read.
    let groups: Vec<String> = ["order-service", "payment-service", "inventory-service"]
        .iter()
        .map(|s| sys.kafka().group_id(s))
        .collect();
    let mut args = owned(&["--bootstrap-server", &brokers, "--describe"]);
    for g in &groups {
        args.push("--group".into());
        args.push(g.clone());
    }
    let args = &args;
    let groups = &groups;
    poll(
        Duration::from_millis(500),
        || async move {
            let described = kafka_tool("kafka-consumer-groups.sh", args.clone()).await?;
            Ok(match lag_zero(&described, groups) {
                Ok(()) => Ok(()),
                Err(why) => Err(format!("{why}\n{described}")),
            })
        },
        |last| anyhow::anyhow!("the groups never showed lag 0: {last}"),
    )
    .await?;
    sys.shutdown().await
}

/// Whether `kafka-consumer-groups.sh --describe` shows every group in
/// `groups` with partitions, each with lag 0 (or `-`: nothing ever
/// committed there, as on a partition no message went to).
fn lag_zero(described: &str, groups: &[String]) -> Result<(), String> {
    let mut header: Option<Vec<&str>> = None;
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for line in described.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.first() == Some(&"GROUP") {
            header = Some(cols);
            continue;
        }
        let Some(h) = &header else { continue };
        let (Some(g), Some(lag)) = (
            h.iter()
                .position(|c| *c == "GROUP")
                .and_then(|i| cols.get(i)),
            h.iter().position(|c| *c == "LAG").and_then(|i| cols.get(i)),
        ) else {
            continue;
        };
        if *lag != "0" && *lag != "-" {
            return Err(format!("group {g} has lag {lag}: {line}"));
        }
        *seen.entry(g).or_default() += 1;
    }
    for g in groups {
        if seen.get(g.as_str()).copied().unwrap_or(0) == 0 {
            return Err(format!("group {g} has no partitions listed"));
        }
    }
    Ok(())
}
