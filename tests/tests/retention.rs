//! Retention of the consumers' inbox: ids older than the cutoff are deleted
//! in chunks, newer ones stay, and the purge's lookup can use the BRIN index
//! instead of reading the whole table.

use saga_runtime::retention::purge_inbox;
use saga_tests::{System, Which};

#[tokio::test]
async fn old_processed_event_ids_are_purged_in_chunks_and_recent_ones_kept() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let db = sys.db(Which::Payment);
    let insert = |n: i32, age: &'static str| {
        sqlx::query(
            "INSERT INTO processed_events (consumer, event_id, processed_at)
             SELECT 'retention-test', gen_random_uuid(), now() - $2::text::interval
             FROM generate_series(1, $1)",
        )
        .bind(n)
        .bind(age)
        .execute(db)
    };
    insert(12, "8 days").await?;
    insert(3, "6 days").await?;

    let cutoff = chrono::Utc::now() - saga_runtime::retention::INBOX_RETENTION;
    // 12 old rows in chunks of 5 take three statements (5, 5, 2); a loop
    // that stopped after a full chunk would leave some behind.
    let deleted = purge_inbox(db, cutoff, 5).await?;
    assert_eq!(deleted, 12);
    let left: Vec<(i64, bool)> = sqlx::query_as(
        "SELECT count(*), bool_and(processed_at > now() - interval '7 days')
         FROM processed_events WHERE consumer = 'retention-test'",
    )
    .fetch_all(db)
    .await?;
    assert_eq!(left, vec![(3, true)]);
    assert_eq!(
        purge_inbox(db, cutoff, 5).await?,
        0,
        "nothing left to purge"
    );

    // The planner may prefer a sequential scan on a small table; forbidding
    // it shows the purge's lookup can be answered from the BRIN index.
    let mut conn = db.acquire().await?;
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await?;
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT ctid FROM processed_events WHERE processed_at < now() LIMIT 5",
    )
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("RESET enable_seqscan")
        .execute(&mut *conn)
        .await?;
    assert!(
        plan.iter()
            .any(|l| l.contains("processed_events_processed_at_brin")),
        "purge lookup does not use the BRIN index: {plan:#?}"
    );
    drop(conn);
    sys.shutdown().await
}
