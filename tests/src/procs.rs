//! Real processes for fault tests: a PostgreSQL server and an Apache Kafka
//! node of the test's own (so they can be stopped, frozen, killed and made
//! read-only without touching other tests), and the three service binaries started
//! as child processes, so a crash is a real `kill -9` and a freeze a real
//! `SIGSTOP`.
//!
//! The binaries are the ones `cargo build --workspace` put next to the test
//! executable (`scripts/test.sh` builds them first). PostgreSQL and Kafka
//! are started through `scripts/infra.sh`, like every other script of the
//! project.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::contract::Contract;
use crate::{Answer, Which};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The directory holding the workspace's binaries (`target/<profile>`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable has no target directory")?
        .to_path_buf();
    for name in [
        "order-service",
        "payment-service",
        "inventory-service",
        "saga-admin",
    ] {
        if !dir.join(name).is_file() {
            bail!(
                "{} is missing: build the workspace first (cargo build --workspace, as scripts/test.sh does)",
                dir.join(name).display()
            );
        }
    }
    Ok(dir)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn signal(pid: u32, sig: Signal) -> anyhow::Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to {pid}"))
}

/// Runs `source scripts/infra.sh; <script>` in bash.
fn infra_sh(script: &str) -> anyhow::Result<()> {
    infra_sh_with(script, &[])
}

/// [`infra_sh`] with extra environment for the script and what it starts.
fn infra_sh_with(script: &str, env: &[(String, String)]) -> anyhow::Result<()> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -e; source scripts/infra.sh; {script}"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(repo_root())
        .output()
        .context("running bash")?;
    if !out.status.success() {
        bail!(
            "`{script}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A PostgreSQL cluster of the test's own.
pub struct Postgres {
    dir: PathBuf,
    pub port: u16,
    /// Extra environment for the server process.
    env: Vec<(String, String)>,
}

impl Postgres {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, Vec::new())
    }

    /// A server whose process gets `env` too (a skewed clock, say).
    pub fn start_with(dir: &Path, env: Vec<(String, String)>) -> anyhow::Result<Self> {
        let pg = Self {
            dir: dir.join("pg"),
            port: free_port()?,
            env,
        };
        pg.up()?;
        Ok(pg)
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn up(&self) -> anyhow::Result<()> {
        infra_sh_with(
            &format!("start_postgres '{}' {}", self.dir.display(), self.port),
            &self.env,
        )
    }

    /// `pg_ctl stop -m fast`: every session is ended, the server is gone.
    pub fn down(&self) -> anyhow::Result<()> {
        infra_sh(&format!("stop_postgres '{}'", self.dir.display()))
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Makes every new transaction read-only and ends the sessions there
    /// are, as a failover's window does; `false` undoes it.
    pub async fn read_only(&self, on: bool) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        sqlx::query("SET default_transaction_read_only = off")
            .execute(&mut c)
            .await?;
        let value = if on { "on" } else { "off" };
        sqlx::query(&format!(
            "ALTER SYSTEM SET default_transaction_read_only = {value}"
        ))
        .execute(&mut c)
        .await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&mut c)
            .await?;
        if on {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            )
            .execute(&mut c)
            .await?;
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

/// Apache Kafka of the test's own, started by `scripts/infra.sh`: one node
/// (`start_kafka`), or three (`start_kafka_cluster`: three controller
/// voters, replication factor 3, `min.insync.replicas=2`), each with its
/// log in a directory of the test's. A node can be frozen, killed and
/// started again on the same data and port.
pub struct Broker {
    nodes: Vec<Node>,
}

struct Node {
    dir: PathBuf,
    port: u16,
}

impl Node {
    fn pid(&self) -> anyhow::Result<u32> {
        let file = self.dir.join("kafka.pid");
        std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} holds no pid", file.display()))
    }

    /// Whether the node's process runs (a zombie does not).
    fn alive(&self) -> bool {
        self.pid().is_ok_and(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !matches!(
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next()),
                None | Some('Z' | 'X')
            )
        })
    }
}

impl Broker {
    /// One node.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let node = Node {
            dir: dir.join("kafka"),
            port: free_port()?,
        };
        infra_sh(&format!(
            "start_kafka '{}' {}",
            node.dir.display(),
            node.port
        ))?;
        Ok(Self { nodes: vec![node] })
    }

    /// Three nodes: three brokers and a quorum of three controllers.
    pub fn start_three(dir: &Path) -> anyhow::Result<Self> {
        let base = dir.join("kafka");
        let mut nodes = Vec::new();
        for i in 1..=3 {
            nodes.push(Node {
                dir: base.join(format!("node{i}")),
                port: free_port()?,
            });
        }
        infra_sh(&format!(
            "start_kafka_cluster '{}' {} {} {}",
            base.display(),
            nodes[0].port,
            nodes[1].port,
            nodes[2].port
        ))?;
        Ok(Self { nodes })
    }

    /// Starts every node that is not running (after [`Broker::kill9`]) on
    /// its port and data, and waits until it answers.
    pub fn up(&self) -> anyhow::Result<()> {
        for node in self.nodes.iter().filter(|n| !n.alive()) {
            infra_sh(&format!("kafka_run '{}'", node.dir.display()))?;
        }
        Ok(())
    }

    /// The bootstrap servers: every node.
    pub fn address(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `SIGSTOP` to every node: each holds its connections open and
    /// answers nothing.
    pub fn freeze(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            signal(node.pid()?, Signal::SIGSTOP)?;
        }
        Ok(())
    }

    pub fn thaw(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            signal(node.pid()?, Signal::SIGCONT)?;
        }
        Ok(())
    }

    /// A real `kill -9` of every node; returns once they are gone.
    pub fn kill9(&self) -> anyhow::Result<()> {
        for id in 1..=self.nodes.len() {
            self.kill9_node(i32::try_from(id)?)?;
        }
        Ok(())
    }

    /// A real `kill -9` of the node whose `node.id` is `id` (1, 2 or 3;
    /// the node of a single-node broker is 1); returns once it is gone.
    pub fn kill9_node(&self, id: i32) -> anyhow::Result<()> {
        let node = usize::try_from(id - 1)
            .ok()
            .and_then(|i| self.nodes.get(i))
            .with_context(|| format!("no Kafka node {id}"))?;
        let pid = node.pid()?;
        signal(pid, Signal::SIGKILL)?;
        wait_gone(pid, Duration::from_secs(10))
    }

    /// Runs Apache Kafka's `kafka-leader-election.sh` for a preferred-leader
    /// election of every partition, until it succeeds (a restarted node must
    /// first be back in the partitions' in-sync replicas) or `limit` passes.
    pub fn elect_preferred_leaders(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let tried = infra_sh(&format!(
                "\"$(kafka_home)/bin/kafka-leader-election.sh\" --bootstrap-server {} \
                 --election-type PREFERRED --all-topic-partitions",
                self.address()
            ));
            match tried {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() > limit => {
                    return Err(e.context(format!("no preferred-leader election in {limit:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }

    /// The `node.id` leading `topic`/`partition`, as the metadata says.
    pub fn leader(&self, topic: &str, partition: i32) -> anyhow::Result<i32> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.address())
            .create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .find(|p| p.id() == partition)
            .map(|p| p.leader())
            .filter(|&l| l >= 0)
            .with_context(|| format!("{topic}/{partition} has no leader"))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // The test's directory goes with it: no controlled shutdown needed.
        for node in &self.nodes {
            if let Ok(pid) = node.pid() {
                let _ = signal(pid, Signal::SIGCONT);
                let _ = signal(pid, Signal::SIGKILL);
                let _ = wait_gone(pid, Duration::from_secs(10));
            }
        }
    }
}

/// Jaeger v2 of the test's own (`start_jaeger` in `scripts/infra.sh`: the
/// all-in-one binary with in-memory storage), on free ports.
pub struct Jaeger {
    dir: PathBuf,
    /// OTLP over gRPC.
    pub otlp_grpc: u16,
    /// OTLP over HTTP (protobuf or JSON).
    pub otlp_http: u16,
    /// The UI and its query API (`/api/traces`).
    pub ui: u16,
}

impl Jaeger {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let jaeger = Self {
            dir: dir.join("jaeger"),
            otlp_grpc: free_port()?,
            otlp_http: free_port()?,
            ui: free_port()?,
        };
        infra_sh(&format!(
            "start_jaeger '{}' {} {} {}",
            jaeger.dir.display(),
            jaeger.otlp_grpc,
            jaeger.otlp_http,
            jaeger.ui
        ))?;
        Ok(jaeger)
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for the services over HTTP.
    pub fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_http)
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for the services over gRPC.
    pub fn otlp_grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_grpc)
    }

    /// The query API's URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ui)
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = infra_sh(&format!("stop_jaeger '{}'", self.dir.display()));
    }
}

/// Waits until process `pid` has exited with all its threads, so that
/// its sockets are closed (a zombie left for its reaper counts as gone; a
/// thread-group leader turns zombie before its other threads are gone).
fn wait_gone(pid: u32, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state is the field after the parenthesised command name.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
        match state {
            None => return Ok(()),
            Some('Z' | 'X') if threads <= 1 => return Ok(()),
            _ => {}
        }
        if started.elapsed() > limit {
            bail!("process {pid} still there {limit:?} after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One service replica running as a child process.
pub struct ServiceProcess {
    pub which: Which,
    pub replica: usize,
    pub port: u16,
    env: HashMap<String, String>,
    log: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
}

impl ServiceProcess {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // Telemetry goes only where the test says (not where the
        // environment running the tests points).
        let child = Command::new(&self.bin)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9`, and reaps the process.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("not running")?;
        child.kill().context("kill -9")?;
        child.wait()?;
        Ok(())
    }

    pub fn freeze(&self) -> anyhow::Result<()> {
        signal(self.pid().context("not running")?, Signal::SIGSTOP)
    }

    pub fn thaw(&self) -> anyhow::Result<()> {
        signal(self.pid().context("not running")?, Signal::SIGCONT)
    }

    /// `SIGTERM`, then waits up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<(ExitStatus, Duration)> {
        let mut child = self.child.take().context("not running")?;
        signal(child.id(), Signal::SIGTERM)?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {limit:?} of SIGTERM; log:\n{}",
                    self.which.name(),
                    tail(&self.log(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's exit status if it has exited on its own.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// Starts the (killed or stopped) replica again with the same
    /// configuration: same port, same database, same group instance.
    pub async fn restart(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_up(http).await
    }

    /// Waits until `/health` answers.
    pub async fn wait_up(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited()? {
                bail!(
                    "{} exited at start-up ({status}); log:\n{}",
                    self.which.name(),
                    tail(&self.log(), 30)
                );
            }
            if let Ok(r) = http.get(self.url("/health")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!(
                    "{} not up after 90 s; log:\n{}",
                    self.which.name(),
                    tail(&self.log(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = signal(c.id(), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the `saga-admin audit` binary against the order, payment and
/// inventory URLs, with `extra` arguments; returns its exit code and its
/// output (stdout, then stderr).
pub fn audit_binary(urls: [String; 3], extra: &[&str]) -> anyhow::Result<(i32, String)> {
    let [order, payment, inventory] = urls;
    let mut args = vec![
        "audit",
        "--order-url",
        &order,
        "--payment-url",
        &payment,
        "--inventory-url",
        &inventory,
    ];
    args.extend_from_slice(extra);
    admin_binary(&args, &[])
}

/// Runs the `saga-admin` binary with `args` and `env`; returns its exit
/// code and its output (stdout, then stderr).
pub fn admin_binary(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(bin_dir()?.join("saga-admin"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("running saga-admin {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A whole system of processes: its own PostgreSQL and broker, and
/// `replicas` processes of each service (same database, same group).
/// Shared between a test and its load (hence the locks).
pub struct Cluster {
    pub pg: Postgres,
    pub broker: Broker,
    pub prefix: String,
    pub http: reqwest::Client,
    replicas: Vec<Replica>,
    /// Each service's API document: every answer the cluster's helpers
    /// get is checked against it, outages included.
    contracts: [Contract; 3],
    // Last: removed after the processes and servers using it are gone.
    pub dir: tempfile::TempDir,
}

struct Replica {
    which: Which,
    replica: usize,
    port: u16,
    process: Arc<tokio::sync::Mutex<ServiceProcess>>,
}

/// Options of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub replicas: usize,
    /// Kafka nodes: 1, or 3 (replication factor 3, `min.insync.replicas=2`).
    pub brokers: usize,
    /// Extra environment for every service process.
    pub env: Vec<(String, String)>,
    /// Extra environment for one service's processes, after `env`.
    pub service_env: Vec<(Which, String, String)>,
    /// Extra environment for the PostgreSQL server.
    pub pg_env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            brokers: 1,
            env: Vec::new(),
            service_env: Vec::new(),
            pg_env: Vec::new(),
        }
    }
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Self> {
        let bins = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("saga-chaos-")
            .tempdir()
            .context("creating the test directory")?;
        // PostgreSQL refuses to run as root; infra.sh runs it as `postgres`,
        // which must be able to reach its directory.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let pg = Postgres::start_with(dir.path(), opts.pg_env.clone())?;
        let broker = if opts.brokers >= 3 {
            Broker::start_three(dir.path())?
        } else {
            Broker::start(dir.path())?
        };
        let prefix = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut services = Vec::new();
        for which in [Which::Order, Which::Payment, Which::Inventory] {
            for replica in 0..opts.replicas {
                let port = free_port()?;
                let db = format!("{prefix}_{}", which.name().replace('-', "_"));
                let mut env: HashMap<String, String> = [
                    ("DATABASE_URL", pg.url(&db)),
                    ("DATABASE_MAX_CONNECTIONS", "5".into()),
                    ("KAFKA_BROKERS", broker.address()),
                    ("KAFKA_TOPIC_PREFIX", format!("{prefix}-")),
                    (
                        "KAFKA_REPLICATION_FACTOR",
                        if opts.brokers >= 3 { "3" } else { "1" }.into(),
                    ),
                    (
                        "KAFKA_GROUP_INSTANCE_ID",
                        format!("{}-{replica}", which.name()),
                    ),
                    ("PORT", port.to_string()),
                    ("HOST", "127.0.0.1".into()),
                    ("RUST_LOG", "warn".into()),
                    ("SHUTDOWN_GRACE_SECS", "5".into()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                env.extend(opts.env.iter().cloned());
                env.extend(
                    opts.service_env
                        .iter()
                        .filter(|(w, _, _)| *w == which)
                        .map(|(_, k, v)| (k.clone(), v.clone())),
                );
                let mut p = ServiceProcess {
                    which,
                    replica,
                    port,
                    env,
                    log: dir.path().join(format!("{}-{replica}.log", which.name())),
                    child: None,
                    bin: bins.join(which.name()),
                };
                p.spawn()?;
                services.push(p);
            }
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        for s in &mut services {
            s.wait_up(&http).await?;
        }
        let mut contracts = Vec::new();
        for which in [Which::Order, Which::Payment, Which::Inventory] {
            let first = services
                .iter()
                .find(|s| s.which == which)
                .context("a service without a replica")?;
            contracts.push(
                Contract::fetch(&http, &first.url(""))
                    .await
                    .with_context(|| format!("the API document of {}", which.name()))?,
            );
        }
        let contracts: [Contract; 3] = contracts
            .try_into()
            .map_err(|_| anyhow::anyhow!("three API documents"))?;
        let replicas = services
            .into_iter()
            .map(|s| Replica {
                which: s.which,
                replica: s.replica,
                port: s.port,
                process: Arc::new(tokio::sync::Mutex::new(s)),
            })
            .collect();
        Ok(Self {
            pg,
            broker,
            prefix,
            http,
            replicas,
            contracts,
            dir,
        })
    }

    /// Sends `req` (built on [`Cluster::http`] for a URL of `w`) and checks
    /// the answer against `w`'s document.
    pub async fn send(&self, w: Which, req: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        Ok(self.try_send(w, req).await??)
    }

    /// Sends `req` like [`Cluster::send`], but a transport failure (the
    /// service down or killed mid-answer) is `Ok(Err(_))`, for callers that
    /// retry through outages; an answer the document does not describe is
    /// still an error.
    async fn try_send(
        &self,
        w: Which,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<Result<Answer, reqwest::Error>> {
        let req = req.build()?;
        let (method, path) = (req.method().to_string(), req.url().path().to_owned());
        let resp = match self.http.execute(req).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let contract = &self.contracts[crate::idx(w)];
        Answer::checked(w, contract, (&method, &path), status, headers, &bytes).map(Ok)
    }

    /// Replica `replica` of `which`, to kill, freeze or restart.
    pub fn process(&self, which: Which, replica: usize) -> Arc<tokio::sync::Mutex<ServiceProcess>> {
        self.replicas
            .iter()
            .find(|r| r.which == which && r.replica == replica)
            .map(|r| r.process.clone())
            .unwrap_or_else(|| panic!("no replica {replica} of {}", which.name()))
    }

    /// The first replica's URL of `which`.
    pub fn url(&self, which: Which, path: &str) -> String {
        self.replicas
            .iter()
            .find(|r| r.which == which)
            .map(|r| format!("http://127.0.0.1:{}{path}", r.port))
            .unwrap_or_default()
    }

    /// The last `lines` lines of every replica's log, for a failure message.
    pub async fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            let p = r.process.lock().await;
            out.push_str(&format!(
                "--- {} replica {} ---\n{}\n",
                r.which.name(),
                r.replica,
                tail(&p.log(), lines)
            ));
        }
        out
    }

    /// Each replica's `/ready` answer and its saga metrics, for a failure
    /// message.
    pub async fn probes(&self) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            let get = |path: &str| {
                let url = format!("http://127.0.0.1:{}{path}", r.port);
                let http = self.http.clone();
                async move {
                    match http.get(url).send().await {
                        Ok(resp) => resp.text().await.unwrap_or_default(),
                        Err(e) => e.to_string(),
                    }
                }
            };
            let ready = get("/ready").await;
            let metrics = get("/metrics").await;
            let interesting: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && (l.contains("events_handled_total")
                            || l.contains("outbox_published_total")
                            || l.contains("consumer_rebalances")
                            || l.contains("consumer_partition_stalled")
                            || l.contains("consumer_lag")
                            || l.contains("consumer_errors")
                            || l.contains("outbox_publish_failures"))
                })
                .collect();
            out.push_str(&format!(
                "--- {} replica {} /ready: {ready}\n{}\n",
                r.which.name(),
                r.replica,
                interesting.join("\n")
            ));
        }
        out
    }

    /// `saga_consumer_rebalances_total` of every replica that answers, by
    /// (service, replica): how many partition assignments each received.
    pub async fn rebalance_counts(&self) -> Vec<(Which, usize, u64)> {
        let mut out = Vec::new();
        for r in &self.replicas {
            let url = format!("http://127.0.0.1:{}/metrics", r.port);
            let Ok(resp) = self.http.get(url).send().await else {
                continue;
            };
            let text = resp.text().await.unwrap_or_default();
            let count = crate::metric_sum(&text, "saga_consumer_rebalances_total");
            // Counters are whole numbers.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            out.push((r.which, r.replica, count as u64));
        }
        out
    }

    /// The member IDs of each service's consumer group, as the broker
    /// lists them (sorted): the same list later means nobody left or joined.
    pub async fn group_members(&self) -> anyhow::Result<Vec<String>> {
        let brokers = self.broker.address();
        let groups: Vec<String> = [Which::Order, Which::Payment, Which::Inventory]
            .iter()
            .map(|w| format!("{}-{}", self.prefix, w.name()))
            .collect();
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()?;
            let mut members = Vec::new();
            for g in groups {
                let list = consumer.fetch_group_list(Some(&g), Duration::from_secs(10))?;
                for group in list.groups() {
                    anyhow::ensure!(group.state() == "Stable", "group {g} is {}", group.state());
                    members.extend(group.members().iter().map(|m| format!("{g}/{}", m.id())));
                }
            }
            members.sort();
            Ok(members)
        })
        .await?
    }

    /// The rebalance counts, as a line for a test's output.
    pub async fn rebalances(&self) -> String {
        let counts = self.rebalance_counts().await;
        let each: Vec<String> = counts
            .iter()
            .map(|(w, r, n)| format!("{}-{r}: {n}", w.name()))
            .collect();
        format!("partition assignments: {}", each.join(", "))
    }

    /// What the broker says of each service's consumer group: its state and
    /// members (ID, client, assignment size), for a failure message.
    pub async fn groups(&self) -> String {
        let brokers = self.broker.address();
        let groups: Vec<String> = [Which::Order, Which::Payment, Which::Inventory]
            .iter()
            .map(|w| format!("{}-{}", self.prefix, w.name()))
            .collect();
        let described = tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            for g in groups {
                match consumer.fetch_group_list(Some(&g), Duration::from_secs(5)) {
                    Ok(list) => {
                        for group in list.groups() {
                            out.push_str(&format!(
                                "group {} state {}:",
                                group.name(),
                                group.state()
                            ));
                            for m in group.members() {
                                out.push_str(&format!(
                                    " [{} client {} host {} assignment {} bytes]",
                                    m.id(),
                                    m.client_id(),
                                    m.client_host(),
                                    m.assignment().map_or(0, <[u8]>::len)
                                ));
                            }
                            out.push('\n');
                        }
                    }
                    Err(e) => out.push_str(&format!("group {g}: {e}\n")),
                }
            }
            Ok::<String, String>(out)
        })
        .await;
        match described {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => e,
            Err(e) => e.to_string(),
        }
    }

    /// Fails if any service process exited on its own.
    pub async fn check_none_exited(&self) -> anyhow::Result<()> {
        for r in &self.replicas {
            let mut p = r.process.lock().await;
            if let Some(status) = p.exited()? {
                bail!(
                    "{} replica {} exited on its own ({status}); log:\n{}",
                    r.which.name(),
                    r.replica,
                    tail(&p.log(), 40)
                );
            }
        }
        Ok(())
    }

    /// Stocks `sku` with `units` through the catalog API.
    /// Creates `sku`, or sets it (see [`crate::put_stock`]).
    pub async fn stock(&self, sku: &str, units: i64) -> anyhow::Result<()> {
        let url = self.url(Which::Inventory, &format!("/products/{sku}"));
        let body = json!({"name": format!("Chaos {sku}"), "available": units});
        crate::put_stock(&self.http, &url, &body, async |req| {
            self.send(Which::Inventory, req).await
        })
        .await
    }

    /// Places an order under `key`, retrying (same key) through outages
    /// until order-service accepts it. Returns its ID.
    pub async fn place(&self, key: &str, body: &Value) -> anyhow::Result<String> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(120) {
            let req = self
                .http
                .post(self.url(Which::Order, "/orders"))
                .header("Idempotency-Key", key)
                .json(body);
            match self.try_send(Which::Order, req).await? {
                Ok(a) if (200..300).contains(&a.status) => {
                    return a.body["order_id"]
                        .as_str()
                        .map(str::to_owned)
                        .context("no order_id in the answer");
                }
                Ok(a) if a.status >= 500 => last = format!("{} {}", a.status, a.body),
                Ok(a) => bail!("POST /orders answered {}: {}", a.status, a.body),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("POST /orders (key {key}) not accepted in 120 s: {last}")
    }

    /// Waits until every order in `ids` is CONFIRMED or FAILED.
    pub async fn wait_all_terminal(&self, ids: &[String], limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut pending: Vec<&String> = ids.iter().collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for id in pending {
                let req = self
                    .http
                    .get(self.url(Which::Order, &format!("/orders/{id}")));
                let done = match self.try_send(Which::Order, req).await? {
                    Ok(a) if a.status == 200 => matches!(
                        a.body["status"].as_str(),
                        Some("CONFIRMED" | "FAILED" | "CANCELLED")
                    ),
                    _ => false,
                };
                if !done {
                    still.push(id);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if started.elapsed() > limit {
                bail!(
                    "{} of {} orders not terminal after {limit:?}, e.g. {}",
                    pending.len(),
                    ids.len(),
                    pending[0]
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// Runs `saga-admin audit` against the first replicas; returns its exit
    /// code and output.
    pub fn audit(&self) -> anyhow::Result<(i32, String)> {
        audit_binary(
            [
                self.url(Which::Order, ""),
                self.url(Which::Payment, ""),
                self.url(Which::Inventory, ""),
            ],
            &["--pending-older-than", "120s"],
        )
    }

    /// Every (order, event type) pair on the three saga topics appears
    /// under one `event_id` at most (a duplicate delivery of the same event
    /// is fine; a second event for the same step is not).
    pub async fn check_no_double_events(&self) -> anyhow::Result<usize> {
        let mut seen: HashMap<(String, String), String> = HashMap::new();
        let mut total = 0;
        for t in events::topics::ALL {
            let topic = format!("{}-{t}", self.prefix);
            let brokers = self.broker.address();
            let messages =
                tokio::task::spawn_blocking(move || crate::read_topic_at(&brokers, &topic))
                    .await??;
            for m in messages {
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                    bail!("unparseable message on {t}: {:?}", m.key);
                };
                let key = (
                    v["order_id"].as_str().unwrap_or_default().to_owned(),
                    v["event_type"].as_str().unwrap_or_default().to_owned(),
                );
                let id = v["event_id"].as_str().unwrap_or_default().to_owned();
                total += 1;
                if let Some(other) = seen.insert(key.clone(), id.clone()) {
                    if other != id {
                        bail!("order {} has two {} events: {other} and {id}", key.0, key.1);
                    }
                }
            }
        }
        Ok(total)
    }
}
