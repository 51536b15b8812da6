//! A short load-generator run: a few hundred orders at a low rate, none lost,
//! every outcome the one the mix asked for, every confirmed order's path
//! read back leg by leg, the floor measured before it. (Speed targets live in
//! BENCHMARKS.md, not here.)

use std::time::Duration;

use jsonwebtoken::Algorithm;
use loadgen::{Config, FloorRun, Load, Mix};
use saga_tests::jwt::{JwksServer, SigningKey};
use saga_tests::{Options, System, Which};

/// A run of `load` against `sys`, with the default mix.
fn config(sys: &System, load: Load) -> Config {
    Config {
        order_url: sys.url(Which::Order, ""),
        inventory_url: sys.url(Which::Inventory, ""),
        brokers: sys.kafka.brokers.clone(),
        topic_prefix: sys.kafka.topic_prefix.clone(),
        fetch_wait_ms: sys.kafka.fetch_wait_ms,
        load,
        mix: Mix::default(),
        grace: Duration::from_secs(60),
        decline_price: "5000.00".into(),
        progress: false,
        hops: false,
        token: None,
        floor: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loadgen_smoke_run_loses_nothing() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let report = loadgen::run(Config {
        hops: true,
        floor: Some(FloorRun {
            database_url: sys.service_config(Which::Order)?.database_url,
            duration: Duration::from_secs(3),
        }),
        ..config(
            &sys,
            Load::Open {
                rate: 50.0,
                duration: Duration::from_secs(4),
            },
        )
    })
    .await?;
    println!("{}", report.render());
    assert_eq!(report.sent, 200);
    assert_eq!(report.accepted, 200, "{report:?}");
    assert_eq!(report.lost, 0, "{report:?}");
    assert_eq!(report.unexpected, 0, "{report:?}");
    assert_eq!(report.completed(), 200);
    assert_eq!(report.confirmed, 180);
    assert_eq!(report.failed_payment_declined, 10);
    assert_eq!(report.failed_out_of_stock, 10);
    assert_eq!(report.end_to_end.count, 200);
    // Every confirmed order's four events were read back from the topics
    // and split into the path's eight legs.
    let legs = report.hops.as_deref().unwrap_or_default();
    assert_eq!(legs.len(), 8, "{legs:?}");
    for leg in legs {
        assert_eq!(leg.latency.count, 180, "{leg:?}");
    }
    // The floor: 3 s at 50/s, the first second left out, so 100 hops and
    // 100 commits measured (give or take the one on the boundary), each
    // taking some time, and the saga's floor made of them.
    let floor = report.floor.as_ref().expect("the floor was asked for");
    for (what, l) in [("hop", &floor.hop), ("commit", &floor.commit)] {
        assert!((99..=101).contains(&l.count), "{what}: {l:?}");
        assert!(l.p50_ms > 0.0 && l.p50_ms <= l.p99_ms, "{what}: {l:?}");
    }
    let saga = 3.0 * floor.hop.p50_ms + 4.0 * floor.commit.p50_ms;
    assert!((floor.saga_p50_ms - saga).abs() < 1e-9, "{floor:?}");
    assert!(
        report.render().contains("× the floor's"),
        "{}",
        report.render()
    );
    sys.shutdown().await
}

/// With authentication on, the load generator sends its token: the catalog
/// is restocked as an operator and every order is placed as the token's
/// subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loadgen_sends_its_token_when_authentication_is_on() -> anyhow::Result<()> {
    let key = SigningKey::generate(Algorithm::ES256, "k1")?;
    let jwks = JwksServer::start(&[&key]).await?;
    let sys = System::start_opts(Options {
        auth: Some(jwks.auth_config()),
        ..Options::default()
    })
    .await?;
    let report = loadgen::run(Config {
        token: Some(key.token("bench-operator", true)?),
        ..config(
            &sys,
            Load::Closed {
                concurrency: 4,
                orders: 20,
            },
        )
    })
    .await?;
    assert_eq!(report.accepted, 20, "{report:?}");
    assert_eq!(report.completed(), 20, "{report:?}");
    assert_eq!(report.unexpected, 0, "{report:?}");
    let customers: Vec<String> = sqlx::query_scalar("SELECT DISTINCT customer_id FROM orders")
        .fetch_all(sys.db(Which::Order))
        .await?;
    assert_eq!(customers, ["bench-operator"]);
    sys.shutdown().await
}
