//! Test harness: starts the three services in-process, each on port 0 with a
//! fresh database, on topics and consumer groups with a random prefix, so
//! tests run in parallel against one PostgreSQL server and one broker.
//!
//! Needs `TEST_DATABASE_URL` (any database on the server; test databases are
//! created next to it) and `KAFKA_BROKERS`; `scripts/test.sh` provides both.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use saga_runtime::{App, KafkaConfig, ServiceConfig};
use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod contract;
pub mod events_contract;
pub mod jwt;
pub mod procs;

pub use contract::Contract;

pub use order_service::Settings as OrderSettings;
pub use payment_service::Settings as PaymentSettings;

/// How the services of a [`System`] are configured beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub payment: PaymentSettings,
    pub order: OrderSettings,
    /// Authentication for all three services (off by default).
    pub auth: Option<saga_runtime::auth::AuthConfig>,
}

/// One HTTP answer, already checked against the service's API document.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The JSON body, or `Value::Null` when there was none or it was not JSON.
    pub body: Value,
}

impl Answer {
    /// `w`'s answer to `method path`, checked against its document
    /// (`contract`): an answer the document does not describe is an error.
    pub fn checked(
        w: Which,
        contract: &Contract,
        (method, path): (&str, &str),
        status: u16,
        headers: reqwest::header::HeaderMap,
        bytes: &[u8],
    ) -> anyhow::Result<Self> {
        let body = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        contract
            .check(method, path, status, &body)
            .with_context(|| format!("{} broke its API document", w.name()))?;
        Ok(Self {
            status,
            headers,
            body,
        })
    }

    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Telemetry lives as long as the test process (dropping the guard would
/// shut the tracer down).
static TELEMETRY: std::sync::OnceLock<saga_runtime::telemetry::TelemetryGuard> =
    std::sync::OnceLock::new();

/// How long a saga may take in tests before we call it stuck.
pub const SAGA_DEADLINE: Duration = Duration::from_secs(60);

/// Runs one of Apache Kafka's tools from `$KAFKA_HOME/bin` (the wrappers
/// `scripts/infra.sh` writes beside Kafka's jars; `scripts/test.sh`
/// exports `KAFKA_HOME`): its standard output, or an error with both
/// outputs.
pub async fn kafka_tool(tool: &str, args: Vec<String>) -> anyhow::Result<String> {
    let home = std::env::var_os("KAFKA_HOME").context(
        "KAFKA_HOME is not set: run the tests with ./scripts/test.sh, which fetches Kafka and its CLI",
    )?;
    let path = std::path::PathBuf::from(home).join("bin").join(tool);
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new(&path).args(&args).output())
            .await?
            .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} exited {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sum of every series of metric `name` in a Prometheus text
/// exposition (0 when there is none).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Calls `probe` every `every` until it answers `Ok(value)`. An `Err(state)`
/// means not yet; if that is still the answer at `SAGA_DEADLINE`, the last
/// state goes to `stuck` to explain the failure.
pub async fn poll<T, S, Fut>(
    every: Duration,
    mut probe: impl FnMut() -> Fut,
    stuck: impl FnOnce(S) -> anyhow::Error,
) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<Result<T, S>>>,
{
    let started = Instant::now();
    loop {
        match probe().await? {
            Ok(value) => return Ok(value),
            Err(state) if started.elapsed() > SAGA_DEADLINE => return Err(stuck(state)),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// The three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Order,
    Payment,
    Inventory,
}

impl Which {
    pub fn name(self) -> &'static str {
        match self {
            Which::Order => order_service::SERVICE,
            Which::Payment => payment_service::SERVICE,
            Which::Inventory => inventory_service::SERVICE,
        }
    }
}

/// One running service.
pub struct Running {
    pub url: String,
    pub config: ServiceConfig,
    token: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The whole system, isolated from other tests.
pub struct System {
    pub prefix: String,
    pub kafka: KafkaConfig,
    pub http: reqwest::Client,
    pub payment_settings: PaymentSettings,
    pub options: Options,
    /// Sent as `Authorization: Bearer …` by every helper (see [`System::send`]).
    pub bearer: Option<String>,
    services: [Option<Running>; 3],
    pools: [PgPool; 3],
    /// Each service's `/openapi.json`: every answer is checked against it.
    contracts: [std::sync::Arc<Contract>; 3],
}

fn idx(w: Which) -> usize {
    match w {
        Which::Order => 0,
        Which::Payment => 1,
        Which::Inventory => 2,
    }
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: run the tests with ./scripts/test.sh, which provides PostgreSQL and a broker")
    })
}

/// The URL of database `name` on the test server.
fn database_url(name: &str) -> anyhow::Result<String> {
    let base = std::env::var("TEST_DATABASE_URL").or_else(|_| env("DATABASE_URL"))?;
    let (server, query) = match base.split_once('?') {
        Some((s, q)) => (s.to_owned(), format!("?{q}")),
        None => (base.clone(), String::new()),
    };
    let scheme_end = server.find("://").map(|i| i + 3).unwrap_or(0);
    let server = match server[scheme_end..].find('/') {
        Some(slash) => server[..scheme_end + slash].to_owned(),
        None => server,
    };
    Ok(format!("{server}/{name}{query}"))
}

impl System {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(PaymentSettings::default()).await
    }

    pub async fn start_with(payment_settings: PaymentSettings) -> anyhow::Result<Self> {
        Self::start_opts(Options {
            payment: payment_settings,
            ..Options::default()
        })
        .await
    }

    pub async fn start_opts(options: Options) -> anyhow::Result<Self> {
        let payment_settings = options.payment;
        TELEMETRY.get_or_init(|| {
            saga_runtime::telemetry::init("saga-tests").expect("telemetry configuration")
        });
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let kafka = KafkaConfig {
            brokers: env("KAFKA_BROKERS")?,
            topic_prefix: format!("{prefix}-"),
            fetch_wait_ms: 5,
            partitions: 3,
            replication_factor: 1,
            linger_ms: 1,
        };
        let mut services: [Option<Running>; 3] = [None, None, None];
        let mut pools = Vec::new();
        for w in [Which::Order, Which::Payment, Which::Inventory] {
            let config = service_config(&prefix, &kafka, w)?;
            let running = launch(w, config, options.clone()).await?;
            pools.push(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&running.config.database_url)
                    .await?,
            );
            services[idx(w)] = Some(running);
        }
        let pools: [PgPool; 3] = pools
            .try_into()
            .map_err(|_| anyhow::anyhow!("three pools"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let mut contracts = Vec::new();
        for running in services.iter().flatten() {
            contracts.push(std::sync::Arc::new(
                Contract::fetch(&http, &running.url)
                    .await
                    .with_context(|| {
                        format!("the API document of {}", running.config.service_name)
                    })?,
            ));
        }
        let contracts: [std::sync::Arc<Contract>; 3] = contracts
            .try_into()
            .map_err(|_| anyhow::anyhow!("three API documents"))?;
        Ok(Self {
            prefix,
            kafka,
            http,
            payment_settings,
            options,
            bearer: None,
            services,
            pools,
            contracts,
        })
    }

    fn running(&self, w: Which) -> &Running {
        self.services[idx(w)]
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", w.name()))
    }

    pub fn url(&self, w: Which, path: &str) -> String {
        format!("{}{}", self.running(w).url, path)
    }

    /// A direct connection to a service's database, for assertions.
    pub fn db(&self, w: Which) -> &PgPool {
        &self.pools[idx(w)]
    }

    /// The configuration `w` runs with (its database, topics, a free port).
    pub fn service_config(&self, w: Which) -> anyhow::Result<ServiceConfig> {
        service_config(&self.prefix, &self.kafka, w)
    }

    /// The URL of database `name` on the test server (created on first use
    /// by a service).
    pub fn database_url(&self, name: &str) -> anyhow::Result<String> {
        database_url(name)
    }

    /// The broker settings the services run with (topic prefix included).
    pub fn kafka(&self) -> &KafkaConfig {
        &self.kafka
    }

    /// The real (prefixed) name of a saga topic.
    pub fn topic(&self, name: &str) -> String {
        self.kafka.topic(name)
    }

    /// Stops a service gracefully (as SIGTERM does) and checks it exited cleanly.
    pub async fn stop(&mut self, w: Which) -> anyhow::Result<()> {
        let r = self.services[idx(w)].take().context("not running")?;
        r.token.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), r.task)
            .await
            .context("graceful shutdown took longer than 30 s")?;
        result.context("service task panicked")?
    }

    /// Kills a service at once: its tasks are dropped mid-flight and nothing
    /// more is committed, as with `kill -9`.
    pub async fn crash(&mut self, w: Which) -> anyhow::Result<()> {
        let r = self.services[idx(w)].take().context("not running")?;
        r.task.abort();
        let _ = r.task.await;
        Ok(())
    }

    /// Starts a stopped or crashed service again on the same database and topics.
    pub async fn restart(&mut self, w: Which) -> anyhow::Result<()> {
        self.restart_with(w, |_| {}).await
    }

    /// [`System::restart`] with the configuration changed by `change`.
    pub async fn restart_with(
        &mut self,
        w: Which,
        change: impl FnOnce(&mut ServiceConfig),
    ) -> anyhow::Result<()> {
        let mut config = service_config(&self.prefix, &self.kafka, w)?;
        change(&mut config);
        self.services[idx(w)] = Some(launch(w, config, self.options.clone()).await?);
        Ok(())
    }

    /// Stops everything gracefully.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for w in [Which::Order, Which::Payment, Which::Inventory] {
            if self.services[idx(w)].is_some() {
                self.stop(w).await?;
            }
        }
        Ok(())
    }

    /// Options for `saga_admin::audit::run` against this system: nothing
    /// is in flight (`settle` zero), stuck after 120 s, with
    /// [`System::bearer`] as the token.
    pub fn audit_options(&self, page_size: u16) -> saga_admin::audit::Options {
        saga_admin::audit::Options {
            order_url: self.url(Which::Order, ""),
            payment_url: self.url(Which::Payment, ""),
            inventory_url: self.url(Which::Inventory, ""),
            pending_older_than: Duration::from_secs(120),
            settle: Duration::ZERO,
            page_size,
            token: self.bearer.clone(),
        }
    }

    /// `w`'s API document (the contract every answer is checked against).
    pub fn contract(&self, w: Which) -> &Contract {
        &self.contracts[idx(w)]
    }

    /// Sends `req` (built on [`System::http`] for a URL of `w`), with
    /// `Authorization: Bearer` [`System::bearer`] unless it has an
    /// `Authorization` header already, and checks the answer against `w`'s
    /// API document: a status the document does not list for the route, or
    /// a body that does not match its schema, is an error.
    pub async fn send(&self, w: Which, req: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let mut req = req.build()?;
        if let Some(token) = &self.bearer {
            if !req.headers().contains_key(reqwest::header::AUTHORIZATION) {
                req.headers_mut().insert(
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {token}").parse()?,
                );
            }
        }
        let (method, path) = (req.method().to_string(), req.url().path().to_owned());
        let resp = self.http.execute(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        Answer::checked(
            w,
            self.contract(w),
            (&method, &path),
            status,
            headers,
            &bytes,
        )
    }

    /// `POST /orders`; returns status, headers and JSON body.
    pub async fn post_order(
        &self,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
        let mut req = self.http.post(self.url(Which::Order, "/orders")).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let a = self.send(Which::Order, req).await?;
        Ok((a.status, a.headers, a.body))
    }

    /// Places an order and returns its ID (asserting 202).
    pub async fn place(&self, items: Value) -> anyhow::Result<String> {
        let (status, _, body) = self
            .post_order(
                &serde_json::json!({"customer_id": "c-test", "items": items}),
                &[],
            )
            .await?;
        if status != 202 {
            bail!("POST /orders answered {status}: {body}");
        }
        body["order_id"]
            .as_str()
            .map(str::to_owned)
            .context("no order_id")
    }

    pub async fn get_json(&self, w: Which, path: &str) -> anyhow::Result<(u16, Value)> {
        let a = self.send(w, self.http.get(self.url(w, path))).await?;
        Ok((a.status, a.body))
    }

    /// `GET path`, which must answer 200.
    pub async fn get_ok(&self, w: Which, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get_json(w, path).await?;
        if status != 200 {
            bail!("GET {path} answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn order(&self, id: &str) -> anyhow::Result<Value> {
        self.get_ok(Which::Order, &format!("/orders/{id}")).await
    }

    /// Polls the order until `done` holds for it, or fails at the deadline.
    pub async fn wait_order<F: Fn(&Value) -> bool>(
        &self,
        id: &str,
        done: F,
    ) -> anyhow::Result<Value> {
        let done = &done;
        poll(
            Duration::from_millis(20),
            || async move {
                let order = self.order(id).await?;
                Ok(if done(&order) { Ok(order) } else { Err(order) })
            },
            |order| {
                anyhow::anyhow!(
                    "order {id} did not reach the expected state in {SAGA_DEADLINE:?}: {order}"
                )
            },
        )
        .await
    }

    /// Polls until the order is CONFIRMED or FAILED.
    pub async fn wait_terminal(&self, id: &str) -> anyhow::Result<Value> {
        self.wait_order(id, |o| {
            matches!(
                o["status"].as_str(),
                Some("CONFIRMED" | "FAILED" | "CANCELLED")
            )
        })
        .await
    }

    /// Waits until every running service's consumer holds all the
    /// partitions of its topics (each shows in `saga_consumer_lag`): a test
    /// that stops or crashes a service right after start then knows what
    /// the group looked like before.
    pub async fn settle(&self) -> anyhow::Result<()> {
        for (w, topics) in [
            (Which::Order, order_service::SUBSCRIBES.len()),
            (Which::Payment, payment_service::SUBSCRIBES.len()),
            (Which::Inventory, inventory_service::SUBSCRIBES.len()),
        ] {
            if self.services[idx(w)].is_none() {
                continue;
            }
            let want = topics * self.kafka.partitions as usize;
            let series = format!("saga_consumer_lag{{service=\"{}\"", w.name());
            poll(
                Duration::from_millis(50),
                || async {
                    let metrics = self.metrics(w).await?;
                    let held = metrics.lines().filter(|l| l.starts_with(&series)).count();
                    Ok(if held >= want { Ok(()) } else { Err(held) })
                },
                |held| {
                    anyhow::anyhow!(
                        "{} holds {held} of its {want} partitions after {SAGA_DEADLINE:?}",
                        w.name()
                    )
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Places `n` one-unit orders of SKU-1 at once and waits until every one
    /// is CONFIRMED (an error names any that ended otherwise).
    pub async fn confirm_orders(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let item = serde_json::json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "2.00"}]);
        let ids = futures::future::try_join_all((0..n).map(|_| self.place(item.clone()))).await?;
        for id in &ids {
            let order = self.wait_terminal(id).await?;
            anyhow::ensure!(order["status"] == "CONFIRMED", "order {id} ended {order}");
        }
        Ok(ids)
    }

    /// The Prometheus text of `w`'s `/metrics`.
    pub async fn metrics(&self, w: Which) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(self.url(w, "/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Creates `sku`, or sets it (see [`put_stock`]).
    pub async fn stock(&self, sku: &str, available: i64) -> anyhow::Result<()> {
        let url = self.url(Which::Inventory, &format!("/products/{sku}"));
        let body =
            serde_json::json!({"name": format!("Test product {sku}"), "available": available});
        put_stock(&self.http, &url, &body, async |req| {
            self.send(Which::Inventory, req).await
        })
        .await
    }

    pub async fn product(&self, sku: &str) -> anyhow::Result<Value> {
        self.get_ok(Which::Inventory, &format!("/products/{sku}"))
            .await
    }

    /// `(available, reserved)` units of `sku`, from `GET /products/{sku}`.
    pub async fn stock_levels(&self, sku: &str) -> anyhow::Result<(i64, i64)> {
        let p = self.product(sku).await?;
        match (p["available"].as_i64(), p["reserved"].as_i64()) {
            (Some(available), Some(reserved)) => Ok((available, reserved)),
            _ => bail!("GET /products/{sku}: no stock levels in {p}"),
        }
    }

    pub async fn payment(&self, order_id: &str) -> anyhow::Result<Value> {
        self.get_ok(Which::Payment, &format!("/payments/{order_id}"))
            .await
    }

    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.brokers)
            .set("linger.ms", "1")
            // Room for messages larger than the services may send (their
            // producers keep librdkafka's default, 1,000,000 bytes).
            .set("message.max.bytes", "2000000")
            .create()?)
    }

    /// Produces a raw message, as a misbehaving or replaying producer would.
    pub async fn produce_raw(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> anyhow::Result<(i32, i64)> {
        let producer = self.producer()?;
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        let delivery = producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::Error::new(e).context("producing"))?;
        Ok((delivery.partition, delivery.offset))
    }

    /// Publishes `env` on saga topic `topic` (unprefixed), keyed by its
    /// order, as a replaying or misbehaving producer would; returns where
    /// it landed.
    pub async fn publish(&self, topic: &str, env: &events::Envelope) -> anyhow::Result<(i32, i64)> {
        self.produce_raw(
            &self.topic(topic),
            &env.order_id.to_string(),
            &env.to_json()?,
            OwnedHeaders::new(),
        )
        .await
    }

    /// Every message currently in `topic` (all partitions, from the start).
    pub async fn read_topic(&self, topic: &str) -> anyhow::Result<Vec<TopicMessage>> {
        let brokers = self.kafka.brokers.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || read_topic_at(&brokers, &topic)).await?
    }

    /// The messages of `topic` once there are at least `want`.
    pub async fn wait_topic(&self, topic: &str, want: usize) -> anyhow::Result<Vec<TopicMessage>> {
        poll(
            Duration::from_millis(50),
            || async move {
                let messages = self.read_topic(topic).await?;
                Ok(if messages.len() >= want {
                    Ok(messages)
                } else {
                    Err(messages)
                })
            },
            |messages| {
                anyhow::anyhow!(
                    "{topic} holds {} of {want} messages after {SAGA_DEADLINE:?}: {messages:?}",
                    messages.len()
                )
            },
        )
        .await
    }

    /// Envelopes in `topic` about `order_id`.
    pub async fn events_for(&self, topic: &str, order_id: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .read_topic(topic)
            .await?
            .into_iter()
            .filter(|m| m.key.as_deref() == Some(order_id))
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect())
    }

    /// Waits until `group` has committed an offset past `offset` on `partition`.
    pub async fn wait_committed(
        &self,
        service: Which,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> anyhow::Result<()> {
        let brokers = self.kafka.brokers.clone();
        let group = self.kafka.group_id(service.name());
        let topic = topic.to_owned();
        poll(
            Duration::from_millis(100),
            || {
                let (b, g, t) = (brokers.clone(), group.clone(), topic.clone());
                async move {
                    let committed =
                        tokio::task::spawn_blocking(move || committed_offset(&b, &g, &t, partition))
                            .await??;
                    Ok(if committed.is_some_and(|c| c > offset) {
                        Ok(())
                    } else {
                        Err(committed)
                    })
                }
            },
            |committed| {
                anyhow::anyhow!(
                    "{group} did not commit past {topic}/{partition}@{offset} (committed {committed:?})"
                )
            },
        )
        .await
    }
}

/// The configuration of service `w` in the system named `prefix`: its own
/// database, shared prefixed topics, a free port.
fn service_config(prefix: &str, kafka: &KafkaConfig, w: Which) -> anyhow::Result<ServiceConfig> {
    Ok(ServiceConfig {
        service_name: w.name(),
        port: 0,
        host: "127.0.0.1".into(),
        database_url: database_url(&format!("{prefix}_{}", w.name().replace('-', "_")))?,
        max_connections: 5,
        kafka: kafka.clone(),
        shutdown_grace: Duration::from_secs(10),
        group_instance_id: None,
        group_protocol: saga_runtime::config::GroupProtocol::default(),
        auth: None,
        unknown_event_types: Vec::new(),
    })
}

async fn launch(w: Which, mut config: ServiceConfig, options: Options) -> anyhow::Result<Running> {
    config.auth = options.auth.clone();
    let app: App = match w {
        Which::Order => order_service::build(config.clone(), options.order).await?,
        Which::Payment => payment_service::build(config.clone(), options.payment).await?,
        Which::Inventory => {
            inventory_service::build(config.clone(), inventory_service::Settings::default()).await?
        }
    };
    let url = format!("http://127.0.0.1:{}", app.port());
    let token = CancellationToken::new();
    let task = tokio::spawn(app.run(token.clone()));
    Ok(Running {
        url,
        config,
        token,
        task,
    })
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    pub partition: i32,
    pub offset: i64,
    /// The message's Kafka timestamp (ms since the epoch), if it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// `PUT`s `body` to the product at `url`: creates it, or sets it at the
/// version just read (`If-Match`: the catalog refuses a blind write of an
/// existing product), reading again if a reservation moved it on. `send`
/// sends a request and checks the answer against the API document.
pub async fn put_stock(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    send: impl AsyncFn(reqwest::RequestBuilder) -> anyhow::Result<Answer>,
) -> anyhow::Result<()> {
    for _ in 0..5 {
        let read = send(http.get(url)).await?;
        let mut req = http.put(url).json(body);
        if let Some(etag) = read.header("etag").filter(|_| read.status == 200) {
            req = req.header("If-Match", etag);
        }
        let a = send(req).await?;
        match a.status {
            200..=299 => return Ok(()),
            // A reservation moved it on since the read.
            409 => continue,
            _ => bail!("PUT {url} answered {}: {}", a.status, a.body),
        }
    }
    bail!("PUT {url}: the product kept changing")
}

impl TopicMessage {
    /// Its headers, to produce the very same message again.
    pub fn owned_headers(&self) -> rdkafka::message::OwnedHeaders {
        self.headers
            .iter()
            .fold(rdkafka::message::OwnedHeaders::new(), |h, (k, v)| {
                h.insert(rdkafka::message::Header {
                    key: k,
                    value: Some(v),
                })
            })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every message now in `topic`, read with the runtime's own reader.
/// Every message of `topic` on the broker(s) at `brokers`, read from the
/// start. Blocking.
pub fn read_topic_at(brokers: &str, topic: &str) -> anyhow::Result<Vec<TopicMessage>> {
    let cfg = KafkaConfig {
        brokers: brokers.to_owned(),
        topic_prefix: String::new(),
        fetch_wait_ms: 5,
        partitions: 1,
        replication_factor: 1,
        linger_ms: 1,
    };
    let messages = saga_runtime::kafka::read_to_end(&cfg, topic, Duration::from_secs(30))?;
    messages
        .iter()
        .map(|m| TopicMessage {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                h.value
                                    .map(|v| String::from_utf8_lossy(v).into_owned())
                                    .unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .map(|m| {
            events_contract::check(topic, &m)
                .with_context(|| format!("{topic}/{}@{}", m.partition, m.offset))?;
            Ok(m)
        })
        .collect()
}

fn committed_offset(
    brokers: &str,
    group: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<Option<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .find_partition(topic, partition)
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }))
}

#[cfg(test)]
mod subscription_tests {
    use events::Service;

    /// Each service subscribes to the topics of the events the contract
    /// says it receives (its handler accepts exactly those).
    #[test]
    fn each_service_reads_the_topics_of_what_it_receives() {
        assert_eq!(order_service::SUBSCRIBES, Service::Order.subscribes());
        assert_eq!(payment_service::SUBSCRIBES, Service::Payment.subscribes());
        assert_eq!(
            inventory_service::SUBSCRIBES,
            Service::Inventory.subscribes()
        );
    }
}
