//! What an operator watches: consumer lag on `/metrics`.

use std::time::Duration;

use saga_tests::{poll, System, Which};
use serde_json::json;

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
            // tansu reports a partition's end short by the extra records of
            // its last batch, so the figure may read low there, never zero.
            Ok(if sum >= 1 { Ok(()) } else { Err(sum) })
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
