//! The consumer's and relay's connections plan each statement once, and
//! never as a sequential scan for a batch's keys: on an empty table, a plan
//! made by the default rules scans it, and a cached one kept doing so as the
//! table grew.

use saga_tests::{System, Which};
use sqlx::PgConnection;

/// The generic plan of `query` (one array parameter) on `conn`.
async fn generic_plan(conn: &mut PgConnection, query: &str) -> anyhow::Result<String> {
    sqlx::query(&format!("PREPARE lock_plan AS {query}"))
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await?;
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE lock_plan('{}')")
        .fetch_all(&mut *conn)
        .await?;
    sqlx::query("DEALLOCATE lock_plan")
        .execute(&mut *conn)
        .await?;
    Ok(plan.join("\n"))
}

#[tokio::test]
async fn background_connections_lock_a_batch_through_the_index_even_on_empty_tables(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    for (which, table, query) in [
        (
            Which::Payment,
            "payments",
            "SELECT order_id FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
        ),
        (
            Which::Order,
            "orders",
            "SELECT order_id FROM orders WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
        ),
    ] {
        let db = sys.db(which);
        // As autovacuum does soon after start: statistics of an empty table.
        sqlx::query(&format!("ANALYZE {table}")).execute(db).await?;
        // The trap: a plain connection's generic plan scans the empty table.
        let mut plain = db.acquire().await?;
        let plan = generic_plan(&mut plain, query).await?;
        assert!(
            plan.contains("Seq Scan"),
            "{}: expected the trap, got\n{plan}",
            which.name()
        );
        drop(plain);

        let background = saga_runtime::db::background_pool(db);
        let mut conn = background.acquire().await?;
        let plan = generic_plan(&mut conn, query).await?;
        assert!(
            plan.contains("Index") && !plan.contains("Seq Scan"),
            "{}: the consumer's connection plans its lock as\n{plan}",
            which.name()
        );
    }
    sys.shutdown().await
}
