//! What an operator watches: consumer lag on `/metrics`, and the Grafana
//! dashboard and alerting rules, evaluated by a real Prometheus scraping
//! the services.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use saga_tests::procs::free_port;
use saga_tests::{poll, System, Which};
use serde_json::{json, Value};

/// The sum of `saga_consumer_lag` over the partitions of `topic` that
/// `service` reports, and how many partitions it reports.
fn lag(metrics: &str, service: &str, topic: &str) -> (i64, usize) {
    let (mut sum, mut n) = (0, 0);
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("saga_consumer_lag{") else {
            continue;
        };
        if !rest.contains(&format!("service=\"{service}\""))
            || !rest.contains(&format!("topic=\"{topic}\""))
        {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<i64>().ok()) {
            sum += v;
            n += 1;
        }
    }
    (sum, n)
}

/// A consumer that cannot keep up shows its backlog as lag per partition,
/// and the lag goes back to zero once it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_lag_shows_a_backlog_and_clears_when_it_is_worked_off() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let topic = sys.topic("order-events");
    sys.confirm_orders(1).await?;
    // Every partition payment-service holds is reported once it has
    // committed on it.
    poll(
        Duration::from_millis(100),
        || async {
            let m = sys.metrics(Which::Payment).await?;
            let (sum, n) = lag(&m, "payment-service", &topic);
            Ok(if n == 3 && sum == 0 {
                Ok(())
            } else {
                Err((sum, n))
            })
        },
        |s| anyhow::anyhow!("lag (sum, partitions) of payment-service: {s:?}"),
    )
    .await?;
    // payment-service's handler waits behind a lock: its backlog grows.
    let mut blocker = sys.db(Which::Payment).begin().await?;
    sqlx::query("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await?;
    let item = json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "2.00"}]);
    let ids = futures::future::try_join_all((0..6).map(|_| sys.place(item.clone()))).await?;
    poll(
        Duration::from_millis(100),
        || async {
            let m = sys.metrics(Which::Payment).await?;
            let (sum, _) = lag(&m, "payment-service", &topic);
            // Every OrderCreated waits, the ones in the stuck batch too
            // (nothing of it is committed).
            Ok(if sum >= 6 { Ok(()) } else { Err(sum) })
        },
        |sum| anyhow::anyhow!("payment-service's lag stayed at {sum} with 6 orders waiting"),
    )
    .await?;
    blocker.rollback().await?;
    for id in &ids {
        sys.wait_terminal(id).await?;
    }
    poll(
        Duration::from_millis(100),
        || async {
            let m = sys.metrics(Which::Payment).await?;
            let (sum, _) = lag(&m, "payment-service", &topic);
            Ok(if sum == 0 { Ok(()) } else { Err(sum) })
        },
        |sum| anyhow::anyhow!("payment-service's lag stayed at {sum} after catching up"),
    )
    .await?;
    sys.shutdown().await
}

/// A Prometheus server of the test's own, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`(app, host:port)`) every
    /// second, with the saga's alerting rules loaded.
    fn start(targets: &[(&str, String)]) -> anyhow::Result<Self> {
        let bin = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".to_owned());
        let dir = tempfile::tempdir()?;
        std::fs::copy(
            repo_file("monitoring/prometheus/alerts.yml"),
            dir.path().join("alerts.yml"),
        )
        .context("copying the alerting rules")?;
        let statics: String = targets
            .iter()
            .map(|(app, addr)| {
                format!("      - targets: ['{addr}']\n        labels: {{app: '{app}'}}\n")
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n  - job_name: saga\n    static_configs:\n{statics}"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config)?;
        let port = free_port()?;
        let child = Command::new(&bin)
            .current_dir(dir.path())
            .arg("--config.file=prometheus.yml")
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {bin} (./scripts/test.sh installs Debian's prometheus; or set PROMETHEUS_BIN)")
            })?;
        Ok(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        })
    }

    /// `GET /api/v1/<path>` with `query`; the `data` of a successful answer.
    async fn api(
        &self,
        http: &reqwest::Client,
        path: &str,
        query: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        let body: Value = http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(body["status"] == "success", "{path} {query:?}: {body}");
        Ok(body["data"].clone())
    }
}

/// Every expression of the Grafana dashboard, evaluated by a real
/// Prometheus scraping the three services under a small load of every kind
/// of order, answers without error and with at least one series; every
/// alerting rule evaluates without error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_expression_returns_series_from_a_real_prometheus() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let addr = |w: Which| sys.url(w, "").trim_start_matches("http://").to_owned();
    let prom = Prometheus::start(&[
        ("order-service", addr(Which::Order)),
        ("payment-service", addr(Which::Payment)),
        ("inventory-service", addr(Which::Inventory)),
    ])?;
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo_file(
        "monitoring/grafana/dashboards/saga.json",
    ))?)?;
    let exprs: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|t| {
                    (
                        p["title"].as_str().unwrap_or("?").to_owned(),
                        t["expr"].as_str().unwrap_or("").to_owned(),
                    )
                })
        })
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");

    // Every kind of outcome, a cancellation and a dead letter, then a
    // steady trickle of orders while Prometheus scrapes.
    sys.stock("SKU-OPS", 1).await?;
    let confirmed = sys
        .place(json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "2.00"}]))
        .await?;
    let declined = sys
        .place(json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "5000.00"}]))
        .await?;
    let short = sys
        .place(json!([{"sku": "SKU-OPS", "quantity": 2, "unit_price": "2.00"}]))
        .await?;
    for id in [&confirmed, &declined, &short] {
        sys.wait_terminal(id).await?;
    }
    let resp = sys
        .http
        .post(sys.url(Which::Order, &format!("/orders/{confirmed}/cancel")))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().as_u16() == 202,
        "cancel answered {}",
        resp.status()
    );
    sys.produce_raw(
        &sys.topic("order-events"),
        "ops-poison",
        b"not an event",
        rdkafka::message::OwnedHeaders::new(),
    )
    .await?;
    let trickle = {
        let (http, url) = (sys.http.clone(), sys.url(Which::Order, "/orders"));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            loop {
                every.tick().await;
                let _ = http
                    .post(&url)
                    .json(&json!({"customer_id": "c-ops", "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "2.00"}]}))
                    .send()
                    .await;
            }
        })
    };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let outcome = poll(
        Duration::from_millis(500),
        || async {
            let mut empty = Vec::new();
            for (title, expr) in &exprs {
                let data = match prom.api(&http, "query", &[("query", expr)]).await {
                    Ok(d) => d,
                    // Not up yet: keep waiting; a bad expression is caught below.
                    Err(e) if e.is::<reqwest::Error>() => {
                        empty.push(format!("{title}: Prometheus not answering"));
                        continue;
                    }
                    Err(e) => return Err(e.context(format!("panel {title:?}: {expr}"))),
                };
                if data["result"].as_array().is_none_or(Vec::is_empty) {
                    empty.push(format!("{title}: {expr}"));
                }
            }
            Ok(if empty.is_empty() { Ok(()) } else { Err(empty) })
        },
        |empty| anyhow::anyhow!("dashboard expressions without series: {empty:#?}"),
    )
    .await;
    trickle.abort();
    outcome?;

    // The alerting rules are loaded and evaluate without error.
    let rules = prom.api(&http, "rules", &[]).await?;
    let rules: Vec<&Value> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(rules.len(), 9, "{rules:?}");
    for r in &rules {
        assert_eq!(r["health"], "ok", "rule {}: {}", r["name"], r["lastError"]);
    }
    sys.shutdown().await
}
