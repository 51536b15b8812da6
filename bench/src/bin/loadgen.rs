//! `loadgen`: drive the checkout saga and report throughput and latency.
//!
//! ```text
//! loadgen --rate 200/s --duration 30s          # open loop
//! loadgen --concurrency 64 --orders 20000      # closed loop, to find the maximum
//! loadgen --rate 50/s --duration 20s --hops    # and where the time goes, leg by leg
//! loadgen --rate 200/s --duration 30s --floor postgres://…/order  # beside the floor
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use loadgen::{Config, FloorRun, Load, Mix};

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "Load generator for the checkout saga")]
struct Args {
    /// Open loop: orders per second, e.g. `200` or `200/s`.
    #[arg(long, value_parser = parse_rate, conflicts_with_all = ["concurrency", "orders"], requires = "duration")]
    rate: Option<f64>,
    /// Open loop: how long to send, e.g. `30s`, `2m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Closed loop: requests in flight.
    #[arg(long, requires = "orders")]
    concurrency: Option<usize>,
    /// Closed loop: how many orders in all.
    #[arg(long)]
    orders: Option<u64>,
    /// Outcome mix, e.g. `confirm=90,decline=5,oos=5`.
    #[arg(long, default_value = "confirm=90,decline=5,oos=5")]
    mix: Mix,
    #[arg(long, env = "ORDER_URL", default_value = "http://localhost:3000")]
    order_url: String,
    #[arg(long, env = "INVENTORY_URL", default_value = "http://localhost:3002")]
    inventory_url: String,
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// `fetch.wait.max.ms` of the consumer that watches `order-events`
    /// (the services read the same variable).
    #[arg(long, env = "KAFKA_FETCH_WAIT_MS", default_value_t = 500)]
    fetch_wait_ms: u32,
    /// How long to wait for outstanding sagas after the last send.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    grace: Duration,
    /// Unit price of orders meant to be declined (must exceed PAYMENT_LIMIT).
    #[arg(long, default_value = "5000.00")]
    decline_price: String,
    /// Also write the report as JSON to this file (`-` for stdout).
    #[arg(long)]
    json: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Afterwards, read the event topics back and show where the confirmed
    /// orders' time went, leg by leg (clocks of this machine).
    #[arg(long)]
    hops: bool,
    /// Bearer token, for services with authentication on: an operator's
    /// (scope `saga:admin`), since the run restocks the catalog; orders are
    /// placed as its subject.
    #[arg(long, env = "SAGA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// First measure the floor (one Kafka hop, one durable commit) at the
    /// run's rate, against this database and the same broker: a scratch
    /// table `bench_floor` is created there.
    #[arg(long, value_name = "DATABASE_URL")]
    floor: Option<String>,
    /// How long to measure the floor.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    floor_for: Duration,
    /// Only measure the floor (at `--rate`, or 200/s with `--concurrency`),
    /// send no orders: `--json` then holds `{"floor": …}`.
    #[arg(long, requires = "floor")]
    floor_only: bool,
}

/// `--floor-only`: the floor, printed and written as `{"floor": …}`.
async fn floor_only(args: &Args, load: &Load) -> ExitCode {
    let rate = match load {
        Load::Open { rate, .. } => *rate,
        Load::Closed { .. } => 200.0,
    };
    let cfg = loadgen::floor::FloorConfig {
        brokers: args.brokers.clone(),
        topic_prefix: args.topic_prefix.clone(),
        database_url: args.floor.clone().unwrap_or_default(),
        rate,
        duration: args.floor_for,
        fetch_wait_ms: args.fetch_wait_ms,
    };
    let floor = match loadgen::floor::measure(&cfg).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("loadgen: measuring the floor: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", floor.render());
    write_json(args.json.as_deref(), &serde_json::json!({ "floor": floor }))
}

/// Writes `value` as JSON to `path` (`-` for stdout), if there is one.
fn write_json(path: Option<&str>, value: &impl serde::Serialize) -> ExitCode {
    let Some(path) = path else {
        return ExitCode::SUCCESS;
    };
    let json = match serde_json::to_string_pretty(value) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    if path == "-" {
        println!("{json}");
    } else if let Err(e) = std::fs::write(path, json) {
        eprintln!("loadgen: writing {path}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.trim().trim_end_matches("/s");
    match n.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("{s:?} is not a positive rate like 200/s")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let load = match (args.rate, args.duration, args.concurrency, args.orders) {
        (Some(rate), Some(duration), None, None) => Load::Open { rate, duration },
        (None, None, Some(concurrency), Some(orders)) => Load::Closed {
            concurrency,
            orders,
        },
        _ => {
            eprintln!("loadgen: give either --rate and --duration, or --concurrency and --orders");
            return ExitCode::from(2);
        }
    };
    if args.floor_only {
        return floor_only(&args, &load).await;
    }
    let cfg = Config {
        order_url: args.order_url.trim_end_matches('/').to_owned(),
        inventory_url: args.inventory_url.trim_end_matches('/').to_owned(),
        brokers: args.brokers,
        topic_prefix: args.topic_prefix,
        fetch_wait_ms: args.fetch_wait_ms,
        load,
        mix: args.mix,
        grace: args.grace,
        decline_price: args.decline_price,
        progress: !args.quiet,
        hops: args.hops,
        token: args.token,
        floor: args.floor.map(|database_url| FloorRun {
            database_url,
            duration: args.floor_for,
        }),
    };
    let report = match loadgen::run(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.render());
    if write_json(args.json.as_deref(), &report) != ExitCode::SUCCESS {
        return ExitCode::FAILURE;
    }
    if report.lost > 0 {
        eprintln!(
            "loadgen: {} orders lost (no final event within the grace period)",
            report.lost
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
