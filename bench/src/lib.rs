//! Load generator for the checkout saga.
//!
//! Drives `POST /orders` open-loop (a fixed rate) or closed-loop (a fixed
//! number of requests in flight), and measures for every order the HTTP
//! latency and the end-to-end latency: from sending the POST to the
//! `OrderConfirmed`/`OrderFailed` event on `order-events`, read straight from
//! the broker (no polling of the API).

pub mod floor;
pub mod hops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::mpsc;

/// SKUs restocked with plenty of units before a run (spread to avoid one hot row).
const STOCKED_SKUS: usize = 8;
/// A SKU set to zero units: its orders end out of stock.
const EMPTY_SKU: &str = "BENCH-EMPTY";

/// How orders are sent.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// `rate` orders per second for `duration`, whatever the answers.
    Open { rate: f64, duration: Duration },
    /// `orders` orders with `concurrency` requests in flight.
    Closed { concurrency: usize, orders: u64 },
}

/// Shares (in any unit) of the three outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub confirm: u32,
    pub decline: u32,
    pub out_of_stock: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            confirm: 90,
            decline: 5,
            out_of_stock: 5,
        }
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    /// `confirm=90,decline=5,oos=5` (missing names count 0).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mix = Mix {
            confirm: 0,
            decline: 0,
            out_of_stock: 0,
        };
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected name=share"))?;
            let value: u32 = value
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: share must be a whole number"))?;
            match name.trim() {
                "confirm" => mix.confirm = value,
                "decline" => mix.decline = value,
                "oos" | "out_of_stock" => mix.out_of_stock = value,
                other => return Err(format!("unknown outcome {other:?} (confirm, decline, oos)")),
            }
        }
        if mix.confirm + mix.decline + mix.out_of_stock == 0 {
            return Err("the shares add up to 0".into());
        }
        Ok(mix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Confirm,
    Decline,
    OutOfStock,
}

impl Mix {
    fn pick(&self, n: u64) -> Kind {
        // Deterministic interleaving: order n gets the kind whose share
        // bucket n falls in, so small runs still see every kind.
        let total = u64::from(self.confirm + self.decline + self.out_of_stock);
        let slot = (n.wrapping_mul(7919)) % total;
        if slot < u64::from(self.confirm) {
            Kind::Confirm
        } else if slot < u64::from(self.confirm + self.decline) {
            Kind::Decline
        } else {
            Kind::OutOfStock
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub order_url: String,
    pub inventory_url: String,
    pub brokers: String,
    pub topic_prefix: String,
    /// `fetch.wait.max.ms` of the consumer that watches `order-events`:
    /// the last hop of every measured saga, so set it like the services'.
    pub fetch_wait_ms: u32,
    pub load: Load,
    pub mix: Mix,
    /// How long to wait for outstanding sagas after the last send.
    pub grace: Duration,
    /// Unit price of orders meant to be declined (above the payment limit).
    pub decline_price: String,
    pub progress: bool,
    /// Afterwards, read the event topics back and split the confirmed
    /// orders' time into legs ([`hops`]).
    pub hops: bool,
    /// A bearer token for services with authentication on: an operator's
    /// (scope `saga:admin`), since the run restocks the catalog. Orders are
    /// then placed as the token's subject.
    pub token: Option<String>,
    /// Before the load, measure the floor ([`floor`]) on the same broker
    /// and this database, at the run's rate (200/s for a closed loop).
    pub floor: Option<FloorRun>,
}

/// Where and how long to measure the floor before the run.
#[derive(Debug, Clone)]
pub struct FloorRun {
    pub database_url: String,
    pub duration: Duration,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub count: u64,
}

fn summarize(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
        count: h.len(),
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub mode: String,
    pub sent: u64,
    pub accepted: u64,
    pub http_errors: u64,
    pub confirmed: u64,
    pub failed_payment_declined: u64,
    pub failed_out_of_stock: u64,
    /// Accepted orders with no final event within the grace period.
    pub lost: u64,
    /// Final outcomes that differ from what the mix asked for.
    pub unexpected: u64,
    pub elapsed_s: f64,
    /// Completed sagas per second, first send to last completion.
    pub sagas_per_s: f64,
    pub http: Latency,
    pub end_to_end: Latency,
    /// With `--hops`: the confirmed path, leg by leg.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hops: Option<Vec<hops::Leg>>,
    /// With `--floor`: what Kafka and PostgreSQL themselves need.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<floor::Floor>,
}

impl Report {
    pub fn completed(&self) -> u64 {
        self.confirmed + self.failed_payment_declined + self.failed_out_of_stock
    }

    /// A human-readable summary.
    pub fn render(&self) -> String {
        format!(
            "mode            {}\n\
             orders          sent {} · accepted {} · http errors {}\n\
             outcomes        confirmed {} · payment declined {} · out of stock {} · lost {} · unexpected {}\n\
             throughput      {:.1} completed sagas/s over {:.2} s\n\
             http latency    p50 {:.2} ms · p90 {:.2} ms · p99 {:.2} ms · max {:.2} ms\n\
             end-to-end      p50 {:.2} ms · p90 {:.2} ms · p99 {:.2} ms · max {:.2} ms\n{}",
            self.mode,
            self.sent,
            self.accepted,
            self.http_errors,
            self.confirmed,
            self.failed_payment_declined,
            self.failed_out_of_stock,
            self.lost,
            self.unexpected,
            self.sagas_per_s,
            self.elapsed_s,
            self.http.p50_ms,
            self.http.p90_ms,
            self.http.p99_ms,
            self.http.max_ms,
            self.end_to_end.p50_ms,
            self.end_to_end.p90_ms,
            self.end_to_end.p99_ms,
            self.end_to_end.max_ms,
            self.hops.as_deref().map(hops::render).unwrap_or_default(),
        ) + &self.floor.as_ref().map(|f| self.against(f)).unwrap_or_default()
    }

    /// The floor, and the run's end-to-end latency beside it.
    fn against(&self, floor: &floor::Floor) -> String {
        format!(
            "{}against floor   p50 {:.2} ms is {:.1}× the floor's {:.2} ms · p99 {:.2} ms is {:.1}× its {:.2} ms\n",
            floor.render(),
            self.end_to_end.p50_ms,
            self.end_to_end.p50_ms / floor.saga_p50_ms,
            floor.saga_p50_ms,
            self.end_to_end.p99_ms,
            self.end_to_end.p99_ms / floor.saga_p99_ms,
            floor.saga_p99_ms,
        )
    }
}

enum Note {
    Sent {
        order_id: String,
        at: Instant,
        kind: Kind,
        http: Duration,
    },
    Rejected,
    Final {
        order_id: String,
        at: Instant,
        outcome: (String, String),
    },
}

/// Sets up stock, runs the load, waits for the sagas and reports.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    let http = http_client(&cfg)?;
    restock(&http, &cfg.inventory_url).await?;
    // Measured first, so it also warms the broker and the database up for
    // the run.
    let floor = measure_floor(&cfg).await?;
    let marks = if cfg.hops {
        Some(hops::mark(&cfg).await?)
    } else {
        None
    };
    let (tx, rx) = mpsc::unbounded_channel::<Note>();
    let watcher = watch_final_events(&cfg, tx.clone()).await?;
    let bar = progress_bar(&cfg);
    let mut tally = Tally::new(&cfg, floor)?;
    let sender = tokio::spawn(send_all(cfg.clone(), http, tx));
    let taken = tally.take_notes(rx, sender, cfg.grace, &bar).await;
    watcher.abort();
    bar.finish_and_clear();
    taken?;
    let (mut report, timings) = tally.finish();
    if let Some(marks) = marks {
        report.hops = Some(hops::breakdown(&cfg, marks, &timings).await?);
    }
    Ok(report)
}

/// The load generator's HTTP client, with the bearer token if there is one.
fn http_client(cfg: &Config) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &cfg.token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the token is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()?)
}

/// The floor ([`floor`]) at the run's rate (200/s for a closed loop), if
/// asked for.
async fn measure_floor(cfg: &Config) -> anyhow::Result<Option<floor::Floor>> {
    let Some(run) = &cfg.floor else {
        return Ok(None);
    };
    let rate = match cfg.load {
        Load::Open { rate, .. } => rate,
        Load::Closed { .. } => 200.0,
    };
    let measured = floor::measure(&floor::FloorConfig {
        brokers: cfg.brokers.clone(),
        topic_prefix: cfg.topic_prefix.clone(),
        database_url: run.database_url.clone(),
        rate,
        duration: run.duration,
        fetch_wait_ms: cfg.fetch_wait_ms,
    })
    .await
    .context("measuring the floor")?;
    Ok(Some(measured))
}

/// Sagas done out of those expected, or nothing without `--progress`.
fn progress_bar(cfg: &Config) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let expected = match cfg.load {
        Load::Open { rate, duration } => (rate * duration.as_secs_f64()).round() as u64,
        Load::Closed { orders, .. } => orders,
    };
    let b = ProgressBar::new(expected);
    b.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} sagas {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

/// What the run has seen: the sender's and the watcher's notes, matched
/// by order.
struct Tally {
    report: Report,
    hops: bool,
    started: Instant,
    started_wall: SystemTime,
    http_hist: Histogram<u64>,
    e2e_hist: Histogram<u64>,
    /// Accepted orders whose final event has not been seen yet.
    pending: HashMap<String, (Instant, Kind)>,
    /// Final events that beat their order's HTTP answer to us.
    early: HashMap<String, (Instant, (String, String))>,
    /// Confirmed orders, with `--hops`: POST sent and final event seen, in
    /// wall-clock microseconds.
    timings: HashMap<String, (i64, i64)>,
    last_completion: Instant,
}

impl Tally {
    /// Starts the clock.
    fn new(cfg: &Config, floor: Option<floor::Floor>) -> anyhow::Result<Self> {
        let started = Instant::now();
        Ok(Self {
            report: Report {
                mode: match cfg.load {
                    Load::Open { rate, duration } => format!(
                        "open loop, {rate}/s for {}",
                        humantime::format_duration(duration)
                    ),
                    Load::Closed {
                        concurrency,
                        orders,
                    } => format!("closed loop, concurrency {concurrency}, {orders} orders"),
                },
                floor,
                ..Report::default()
            },
            hops: cfg.hops,
            started,
            started_wall: SystemTime::now(),
            http_hist: Histogram::<u64>::new(3)?,
            e2e_hist: Histogram::<u64>::new(3)?,
            pending: HashMap::new(),
            early: HashMap::new(),
            timings: HashMap::new(),
            last_completion: started,
        })
    }

    /// Takes notes until every accepted order has ended, or `grace` after
    /// the sender finished.
    async fn take_notes(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<Note>,
        sender: tokio::task::JoinHandle<anyhow::Result<()>>,
        grace: Duration,
        bar: &ProgressBar,
    ) -> anyhow::Result<()> {
        let mut sending_done = false;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut sender = Some(sender);
        loop {
            // The sender finishing can win the race against its last notes
            // (they are queued by then): only an empty queue means all are in.
            if sending_done && self.pending.is_empty() && rx.is_empty() {
                return Ok(());
            }
            let note = tokio::select! {
                n = rx.recv() => n,
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => return Ok(()),
                r = async {
                    match sender.as_mut() {
                        Some(s) => s.await,
                        None => std::future::pending().await,
                    }
                } => {
                    sender = None;
                    r.context("sender task failed")??;
                    sending_done = true;
                    deadline = Some(tokio::time::Instant::now() + grace);
                    continue;
                }
            };
            let Some(note) = note else { return Ok(()) };
            self.take(note, bar);
        }
    }

    fn take(&mut self, note: Note, bar: &ProgressBar) {
        match note {
            Note::Rejected => {
                self.report.sent += 1;
                self.report.http_errors += 1;
            }
            Note::Sent {
                order_id,
                at,
                kind,
                http,
            } => {
                self.report.sent += 1;
                self.report.accepted += 1;
                let _ = self.http_hist.record(http.as_micros() as u64);
                if let Some((done_at, outcome)) = self.early.remove(&order_id) {
                    self.complete(order_id, kind, &outcome, at, done_at, bar);
                } else {
                    self.pending.insert(order_id, (at, kind));
                }
            }
            Note::Final {
                order_id,
                at,
                outcome,
            } => {
                self.last_completion = at;
                if let Some((sent_at, kind)) = self.pending.remove(&order_id) {
                    self.complete(order_id, kind, &outcome, sent_at, at, bar);
                } else {
                    // The event can beat the HTTP answer to us.
                    self.early.insert(order_id, (at, outcome));
                }
            }
        }
    }

    /// An order whose POST was answered and whose final event was seen.
    fn complete(
        &mut self,
        order_id: String,
        kind: Kind,
        outcome: &(String, String),
        sent_at: Instant,
        done_at: Instant,
        bar: &ProgressBar,
    ) {
        let latency = done_at.saturating_duration_since(sent_at);
        let _ = self.e2e_hist.record(latency.as_micros() as u64);
        let report = &mut self.report;
        match (outcome.0.as_str(), outcome.1.as_str()) {
            ("OrderConfirmed", _) => report.confirmed += 1,
            (_, "payment_declined") => report.failed_payment_declined += 1,
            _ => report.failed_out_of_stock += 1,
        }
        let as_expected = matches!(
            (kind, outcome.0.as_str(), outcome.1.as_str()),
            (Kind::Confirm, "OrderConfirmed", _)
                | (Kind::Decline, "OrderFailed", "payment_declined")
                | (Kind::OutOfStock, "OrderFailed", "out_of_stock")
        );
        if !as_expected {
            report.unexpected += 1;
        }
        if self.hops && outcome.0 == "OrderConfirmed" {
            let span = (self.wall_us(sent_at), self.wall_us(done_at));
            self.timings.insert(order_id, span);
        }
        bar.inc(1);
        bar.set_message(format!(
            "confirmed {} · declined {} · out of stock {}",
            self.report.confirmed,
            self.report.failed_payment_declined,
            self.report.failed_out_of_stock
        ));
    }

    /// Wall-clock microseconds of an instant of this run, to compare with
    /// the events' timestamps.
    fn wall_us(&self, at: Instant) -> i64 {
        let since = self.started_wall + at.saturating_duration_since(self.started);
        since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }

    /// The report, and the confirmed orders' timings for the legs.
    fn finish(self) -> (Report, HashMap<String, (i64, i64)>) {
        let mut report = self.report;
        report.lost = self.pending.len() as u64;
        report.elapsed_s = self
            .last_completion
            .saturating_duration_since(self.started)
            .as_secs_f64();
        report.sagas_per_s = if report.elapsed_s > 0.0 {
            report.completed() as f64 / report.elapsed_s
        } else {
            0.0
        };
        report.http = summarize(&self.http_hist);
        report.end_to_end = summarize(&self.e2e_hist);
        (report, self.timings)
    }
}

async fn restock(http: &reqwest::Client, inventory_url: &str) -> anyhow::Result<()> {
    let mut products: Vec<(String, i64)> = (0..STOCKED_SKUS)
        .map(|i| (format!("BENCH-{i}"), 1_000_000_000))
        .collect();
    products.push((EMPTY_SKU.to_owned(), 0));
    for (sku, available) in products {
        set_stock(http, inventory_url, &sku, available)
            .await
            .with_context(|| format!("restocking {sku} at {inventory_url}"))?;
    }
    Ok(())
}

/// Sets `sku`'s available units: creates it, or sets it at the version
/// just read (`If-Match`), reading again if a reservation moved it on.
async fn set_stock(
    http: &reqwest::Client,
    inventory_url: &str,
    sku: &str,
    available: i64,
) -> anyhow::Result<()> {
    let url = format!("{inventory_url}/products/{sku}");
    for _ in 0..5 {
        let read = http.get(&url).send().await?;
        let version = match read.status() {
            reqwest::StatusCode::NOT_FOUND => None,
            s if s.is_success() => read.headers().get("etag").cloned(),
            s => bail!("GET {url}: {s}"),
        };
        let mut put = http
            .put(&url)
            .json(&serde_json::json!({"name": "Benchmark stock", "available": available}));
        if let Some(v) = version {
            put = put.header("If-Match", v);
        }
        let resp = put.send().await?;
        match resp.status() {
            s if s.is_success() => return Ok(()),
            reqwest::StatusCode::CONFLICT => continue,
            s => bail!("PUT {url}: {s}"),
        }
    }
    bail!("PUT {url}: the product kept changing under us")
}

/// Where every partition of `topics` ends now, as the broker answers
/// `ListOffsets`.
fn topic_ends<C: Consumer>(c: &C, topics: &[String]) -> anyhow::Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("reading the partitions of {topic}"))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = c
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .with_context(|| format!("reading the end of {topic}/{}", p.id()))?;
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
            }
        }
    }
    Ok(tpl)
}

/// Reads `order-events` from its current end and reports every final event.
async fn watch_final_events(
    cfg: &Config,
    tx: mpsc::UnboundedSender<Note>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let topic = format!("{}order-events", cfg.topic_prefix);
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("loadgen-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", cfg.fetch_wait_ms.to_string())
        .create()
        .context("creating the order-events consumer")?;
    let consumer = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let tpl = topic_ends(&consumer, std::slice::from_ref(&topic))?;
        if tpl.count() == 0 {
            bail!("topic {topic} has no partitions (is the system running with this KAFKA_TOPIC_PREFIX?)");
        }
        consumer.assign(&tpl)?;
        Ok(consumer)
    })
    .await??;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(msg) = consumer.recv().await else {
                continue;
            };
            let at = Instant::now();
            let Some(payload) = msg.payload() else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                continue;
            };
            let event_type = v["event_type"].as_str().unwrap_or_default();
            if event_type != "OrderConfirmed" && event_type != "OrderFailed" {
                continue;
            }
            let order_id = v["order_id"].as_str().unwrap_or_default().to_owned();
            let reason = v["data"]["reason"].as_str().unwrap_or_default().to_owned();
            if tx
                .send(Note::Final {
                    order_id,
                    at,
                    outcome: (event_type.to_owned(), reason),
                })
                .is_err()
            {
                return;
            }
        }
    }))
}

/// Order `n`'s body; with `customer` false it names no customer (with
/// authentication on, the order is the token subject's).
fn order_body(kind: Kind, n: u64, decline_price: &str, customer: bool) -> serde_json::Value {
    let (sku, price) = match kind {
        Kind::Confirm => (format!("BENCH-{}", n as usize % STOCKED_SKUS), "1.00"),
        Kind::Decline => (
            format!("BENCH-{}", n as usize % STOCKED_SKUS),
            decline_price,
        ),
        Kind::OutOfStock => (EMPTY_SKU.to_owned(), "1.00"),
    };
    let mut body = serde_json::json!({
        "items": [{"sku": sku, "quantity": 1, "unit_price": price}],
    });
    if customer {
        body["customer_id"] = serde_json::json!(format!("bench-{}", n % 1000));
    }
    body
}

async fn post_one(http: &reqwest::Client, cfg: &Config, n: u64, tx: &mpsc::UnboundedSender<Note>) {
    let kind = cfg.mix.pick(n);
    let body = order_body(kind, n, &cfg.decline_price, cfg.token.is_none());
    let at = Instant::now();
    let result = http
        .post(format!("{}/orders", cfg.order_url))
        .json(&body)
        .send()
        .await;
    let note = match result {
        Ok(resp) if resp.status().as_u16() == 202 => {
            let http_latency = at.elapsed();
            match resp.json::<serde_json::Value>().await {
                Ok(v) => match v["order_id"].as_str() {
                    Some(id) => Note::Sent {
                        order_id: id.to_owned(),
                        at,
                        kind,
                        http: http_latency,
                    },
                    None => Note::Rejected,
                },
                Err(_) => Note::Rejected,
            }
        }
        _ => Note::Rejected,
    };
    let _ = tx.send(note);
}

async fn send_all(
    cfg: Config,
    http: reqwest::Client,
    tx: mpsc::UnboundedSender<Note>,
) -> anyhow::Result<()> {
    match cfg.load {
        Load::Open { rate, duration } => {
            if rate <= 0.0 {
                bail!("rate must be positive");
            }
            let total = (rate * duration.as_secs_f64()).round() as u64;
            let period = Duration::from_secs_f64(1.0 / rate);
            let start = tokio::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..total {
                // Scheduled send times, independent of how fast answers come.
                tokio::time::sleep_until(start + period.mul_f64(n as f64)).await;
                let (http, cfg, tx) = (http.clone(), cfg.clone(), tx.clone());
                tasks.spawn(async move { post_one(&http, &cfg, n, &tx).await });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
        Load::Closed {
            concurrency,
            orders,
        } => {
            let next = Arc::new(AtomicU64::new(0));
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..concurrency.max(1) {
                let (http, cfg, tx, next) = (http.clone(), cfg.clone(), tx.clone(), next.clone());
                workers.spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= orders {
                            break;
                        }
                        post_one(&http, &cfg, n, &tx).await;
                    }
                });
            }
            while workers.join_next().await.is_some() {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_spreads_kinds() {
        let mix: Mix = "confirm=8,decline=1,oos=1".parse().unwrap();
        let mut counts: HashMap<Kind, u32> = HashMap::new();
        for n in 0..1000 {
            *counts.entry(mix.pick(n)).or_default() += 1;
        }
        assert_eq!(counts[&Kind::Confirm], 800);
        assert_eq!(counts[&Kind::Decline], 100);
        assert_eq!(counts[&Kind::OutOfStock], 100);
        assert!("confirm=0".parse::<Mix>().is_err());
        assert!("bogus=3".parse::<Mix>().is_err());
        assert_eq!("confirm=1".parse::<Mix>().unwrap().pick(5), Kind::Confirm);
    }
}
