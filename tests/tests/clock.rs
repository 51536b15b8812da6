//! Deadlines by the database's clock. The test's PostgreSQL runs with its
//! clock two hours ahead of the services' hosts (Debian's libfaketime,
//! preloaded into the real server; `scripts/test.sh` installs it and sets
//! `FAKETIME_LIB`), and payment-service is down so that only the deadline
//! can end an order: the order still fails `ORDER_DEADLINE_SECS` after its
//! creation, not two hours later. (Skewed the other way, a host clock
//! would expire orders early: both ends of the comparison are the
//! database's clock, so neither happens.)

use std::time::Duration;

use anyhow::Context;
use saga_tests::procs::{Cluster, ClusterOptions};
use saga_tests::{poll, Which};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_clock_apart_from_the_databases_neither_delays_nor_hastens_a_deadline(
) -> anyhow::Result<()> {
    let lib = std::env::var("FAKETIME_LIB").context(
        "FAKETIME_LIB (libfaketime.so.1) is not set: run the tests with scripts/test.sh",
    )?;
    let cluster = Cluster::start(ClusterOptions {
        pg_env: vec![
            ("LD_PRELOAD".into(), lib),
            // Two hours ahead, for the wall clock only.
            ("FAKETIME".into(), "+7200".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ],
        service_env: vec![(Which::Order, "ORDER_DEADLINE_SECS".into(), "3".into())],
        ..ClusterOptions::default()
    })
    .await?;
    let db_now: chrono::DateTime<chrono::Utc> = {
        let db = sqlx::PgPool::connect(&cluster.pg.url("postgres")).await?;
        sqlx::query_scalar("SELECT now()").fetch_one(&db).await?
    };
    let ahead = db_now.signed_duration_since(chrono::Utc::now());
    anyhow::ensure!(
        ahead > chrono::Duration::minutes(110),
        "the database's clock is not ahead: {db_now}"
    );

    cluster.stock("CLOCK-1", 10).await?;
    cluster.process(Which::Payment, 0).lock().await.kill9()?;
    let id = cluster
        .place(
            "clock-1",
            &json!({"customer_id": "c-clock", "items": [{"sku": "CLOCK-1", "quantity": 1, "unit_price": "1.00"}]}),
        )
        .await?;
    let order = poll(
        Duration::from_millis(200),
        || async {
            let req = cluster
                .http
                .get(cluster.url(Which::Order, &format!("/orders/{id}")));
            let order = cluster.send(Which::Order, req).await?.body;
            Ok(if order["status"] == "PENDING" {
                Err(order)
            } else {
                Ok(order)
            })
        },
        |order| anyhow::anyhow!("the deadline did not end the order: {order}"),
    )
    .await?;
    anyhow::ensure!(
        order["status"] == "FAILED" && order["failure_reason"] == "deadline_exceeded",
        "{order}"
    );
    Ok(())
}
