//! A short load-generator run: a few hundred orders at a low rate, none lost,
//! every outcome the one the mix asked for, every confirmed order's path
//! read back leg by leg. (Speed targets live in
//! BENCHMARKS.md, not here.)

use std::time::Duration;

use loadgen::{Config, Load, Mix};
use saga_tests::{System, Which};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loadgen_smoke_run_loses_nothing() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let base = |w: Which| sys.url(w, "");
    let report = loadgen::run(Config {
        order_url: base(Which::Order),
        inventory_url: base(Which::Inventory),
        brokers: sys.kafka.brokers.clone(),
        topic_prefix: sys.kafka.topic_prefix.clone(),
        fetch_wait_ms: sys.kafka.fetch_wait_ms,
        load: Load::Open {
            rate: 50.0,
            duration: Duration::from_secs(4),
        },
        mix: Mix::default(),
        grace: Duration::from_secs(60),
        decline_price: "5000.00".into(),
        progress: false,
        hops: true,
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
    sys.shutdown().await
}
