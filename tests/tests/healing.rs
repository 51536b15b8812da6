//! Self-healing pieces that need no process of their own: a fatal producer
//! error stops the service, replicas seed an empty catalog together, catalog
//! writes cannot lose reservations, and the books audit over the listing
//! endpoints.

use std::time::Duration;

use saga_admin::audit::{self, Options, Violation};
use saga_tests::procs::audit_binary;
use saga_tests::{poll, System, Which};
use serde_json::{json, Value};

/// A fatal librdkafka error (here raised the way librdkafka's own tests
/// do; in production e.g. a fenced idempotent producer) makes the relay's
/// producer useless for good: the service must stop with an error so that
/// its supervisor restarts it, not retry for ever while `/ready` is green.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[allow(unsafe_code)]
async fn a_fatal_producer_error_stops_the_service() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let mut config = sys.service_config(Which::Payment)?;
    config.port = 0;
    let app = payment_service::build(config, sys.payment_settings).await?;
    let producer = app.producer().clone();
    let token = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run(token.clone()));
    {
        let reason = c"test: fenced";
        // SAFETY: the producer is alive (we hold a clone) and the reason is
        // a NUL-terminated string that outlives the call.
        let code = unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
                reason.as_ptr(),
            )
        };
        assert_eq!(
            code,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        );
    }
    let outcome = tokio::time::timeout(Duration::from_secs(20), running).await;
    token.cancel();
    let result = outcome
        .map_err(|_| anyhow::anyhow!("the service kept running after a fatal producer error"))??;
    let err = result.expect_err("the service must stop with an error");
    assert!(
        format!("{err:#}").contains("fatal Kafka producer error"),
        "{err:#}"
    );
    sys.shutdown().await
}

/// Several replicas seeding one empty catalog at once all succeed (none
/// fails its start-up), and the demo catalog is put in, and booked in the
/// ledger, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_seeding_an_empty_catalog_at_once_all_start() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&sys.service_config(Which::Inventory)?.database_url)
        .await?;
    for round in 0..10 {
        sqlx::query("TRUNCATE products CASCADE")
            .execute(&pool)
            .await?;
        let (a, b, c, d) = tokio::join!(
            inventory_service::seed_demo_catalog(&pool),
            inventory_service::seed_demo_catalog(&pool),
            inventory_service::seed_demo_catalog(&pool),
            inventory_service::seed_demo_catalog(&pool),
        );
        for (i, r) in [a, b, c, d].into_iter().enumerate() {
            if let Err(e) = r {
                anyhow::bail!("replica {i} failed to seed in round {round}: {e:#}");
            }
        }
        let books: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT p.sku, p.available, (SELECT sum(delta) FROM stock_ledger l WHERE l.sku = p.sku)::bigint
             FROM products p ORDER BY sku",
        )
        .fetch_all(&pool)
        .await?;
        assert_eq!(books.len(), inventory_service::DEMO_CATALOG.len());
        for (sku, available, stocked) in books {
            assert_eq!(
                available, stocked,
                "{sku} booked {stocked} for {available} units"
            );
        }
    }
    sys.shutdown().await
}

/// `PUT /products/{sku}` with a stale version is refused, so an operator's
/// read-modify-write cannot overwrite reservations made in between;
/// `POST /products/{sku}/restock` adds atomically; the ledger's `stocked`
/// always equals available + reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalog_writes_cannot_overwrite_reservations() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let url = sys.url(Which::Inventory, "/products/SKU-V");
    let put = |body: Value, if_match: Option<String>| {
        let mut req = sys.http.put(&url).json(&body);
        if let Some(tag) = if_match {
            req = req.header("If-Match", tag);
        }
        sys.send(Which::Inventory, req)
    };
    let created = put(json!({"name": "Versioned", "available": 10}), None).await?;
    assert_eq!(created.status, 201);
    let etag = created.header("etag").unwrap_or_default().to_owned();
    assert_eq!(etag, "\"1\"");
    // A reservation moves units in between the operator's read and write.
    let item = json!([{"sku": "SKU-V", "quantity": 3, "unit_price": "1.00"}]);
    let id = sys.place(item).await?;
    assert_eq!(sys.wait_terminal(&id).await?["status"], "CONFIRMED");
    // The write based on the old read is refused, by header or by body.
    let stale = put(
        json!({"name": "Versioned", "available": 15}),
        Some(etag.clone()),
    )
    .await?;
    assert_eq!(stale.status, 409);
    let body = stale.body;
    assert_eq!(body["error"]["code"], "version_conflict", "{body}");
    let stale = put(
        json!({"name": "Versioned", "available": 15, "version": 1}),
        None,
    )
    .await?;
    assert_eq!(stale.status, 409);
    assert_eq!(sys.stock_levels("SKU-V").await?, (7, 3));
    // Restock adds to what is there, whatever was reserved.
    let r = sys
        .send(
            Which::Inventory,
            sys.http
                .post(sys.url(Which::Inventory, "/products/SKU-V/restock"))
                .json(&json!({"quantity": 5})),
        )
        .await?;
    assert_eq!(r.status, 200);
    let p = r.body;
    assert_eq!(
        (
            p["available"].as_i64(),
            p["reserved"].as_i64(),
            p["stocked"].as_i64()
        ),
        (Some(12), Some(3), Some(15))
    );
    // A write at the current version goes through and is booked.
    let current = sys.product("SKU-V").await?["version"]
        .as_i64()
        .unwrap_or_default();
    let ok = put(
        json!({"name": "Versioned", "available": 20}),
        Some(format!("\"{current}\"")),
    )
    .await?;
    assert_eq!(ok.status, 200);
    let p = sys.product("SKU-V").await?;
    assert_eq!(
        (
            p["available"].as_i64(),
            p["reserved"].as_i64(),
            p["stocked"].as_i64()
        ),
        (Some(20), Some(3), Some(23))
    );
    // Bad restocks change nothing.
    for (path, body, status) in [
        ("/products/SKU-V/restock", json!({"quantity": 0}), 422),
        ("/products/SKU-V/restock", json!({"quantity": "5"}), 422),
        ("/products/NOPE-9/restock", json!({"quantity": 5}), 404),
    ] {
        let r = sys
            .send(
                Which::Inventory,
                sys.http.post(sys.url(Which::Inventory, path)).json(&body),
            )
            .await?;
        assert_eq!(r.status, status, "{path} {body}");
        let e = r.body;
        assert!(e["error"]["code"].is_string(), "{e}");
    }
    assert_eq!(sys.stock_levels("SKU-V").await?, (20, 3));
    sys.shutdown().await
}

/// The stock ledger books exactly what each catalog write changed, so the
/// audit stays clean whatever the sequence: a blind `PUT` of an existing
/// product is refused with `428` and changes nothing, a `PUT` at the
/// current version books the difference, and of 20 requests creating one
/// product at once exactly one creates it (and books its units) while the
/// others are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalog_writes_book_exactly_what_they_change() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let url = sys.url(Which::Inventory, "/products/SKU-BOOK");
    let put = |available: i64, if_match: Option<String>| {
        let mut req = sys
            .http
            .put(&url)
            .json(&json!({"name": "Booked", "available": available}));
        if let Some(tag) = if_match {
            req = req.header("If-Match", tag);
        }
        sys.send(Which::Inventory, req)
    };
    let created = put(7, None).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let etag = created.header("etag").unwrap_or_default().to_owned();
    let blind = put(1_000, None).await?;
    assert_eq!(blind.status, 428, "{}", blind.body);
    assert_eq!(blind.body["error"]["code"], "precondition_required");
    assert_eq!(sys.stock_levels("SKU-BOOK").await?, (7, 0));
    let set = put(1_000, Some(etag)).await?;
    assert_eq!(set.status, 200, "{}", set.body);
    let p = sys.product("SKU-BOOK").await?;
    assert_eq!(
        (p["available"].as_i64(), p["stocked"].as_i64()),
        (Some(1_000), Some(1_000)),
        "{p}"
    );

    let url = sys.url(Which::Inventory, "/products/SKU-RACE-NEW");
    let answers = futures::future::try_join_all((0..20).map(|_| {
        sys.send(
            Which::Inventory,
            sys.http
                .put(&url)
                .json(&json!({"name": "Raced", "available": 10})),
        )
    }))
    .await?;
    let mut statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    statuses.sort_unstable();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| [201, 409, 428].contains(s)),
        "{statuses:?}"
    );
    let p = sys.product("SKU-RACE-NEW").await?;
    assert_eq!(
        (p["available"].as_i64(), p["stocked"].as_i64()),
        (Some(10), Some(10)),
        "{p}"
    );

    let (_, violations) = run_audit(&sys, 50).await?;
    assert!(violations.is_empty(), "{violations:?}");
    sys.shutdown().await
}

fn audit_options(sys: &System, page_size: u16) -> Options {
    sys.audit_options(page_size)
}

async fn run_audit(
    sys: &System,
    page_size: u16,
) -> anyhow::Result<(audit::Report, Vec<Violation>)> {
    let mut found = Vec::new();
    let report = audit::run(&audit_options(sys, page_size), |v| found.push(v.clone())).await?;
    Ok((report, found))
}

/// The audit passes a settled system (paging through every listing in
/// small pages), and names each order whose services disagree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_passes_settled_books_and_names_each_broken_order() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-A", 100).await?;
    sys.stock("SKU-Z", 1).await?;
    let mut ids = Vec::new();
    for i in 0..7 {
        let (sku, price) = match i % 3 {
            0 => ("SKU-A", "2.00"),
            1 => ("SKU-A", "5000.00"),
            _ => ("SKU-Z", "1.00"),
        };
        ids.push(
            sys.place(json!([{"sku": sku, "quantity": 1, "unit_price": price}]))
                .await?,
        );
    }
    for id in &ids {
        sys.wait_terminal(id).await?;
    }
    // Refunds may trail the FAILED status: poll until the books settle.
    let (report, found) = poll(
        Duration::from_millis(200),
        || async {
            let (report, found) = run_audit(&sys, 2).await?;
            Ok(if found.is_empty() {
                Ok((report, found))
            } else {
                Err(found)
            })
        },
        |found| anyhow::anyhow!("the audit never came out clean: {found:?}"),
    )
    .await?;
    assert!(found.is_empty());
    assert_eq!(report.orders, 7);
    assert!(report.skus >= 2);

    // Break one confirmed order's payment and one SKU's books.
    let confirmed = &ids[0];
    sqlx::query("UPDATE payments SET status = 'REFUNDED' WHERE order_id = $1::uuid")
        .bind(confirmed)
        .execute(sys.db(Which::Payment))
        .await?;
    sqlx::query("UPDATE products SET available = available + 1 WHERE sku = 'SKU-A'")
        .execute(sys.db(Which::Inventory))
        .await?;
    let (report, found) = run_audit(&sys, 3).await?;
    assert_eq!(report.violations, 2, "{found:?}");
    assert!(
        found
            .iter()
            .any(|v| v.kind == "order" && v.id == *confirmed && v.problem.contains("REFUNDED")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|v| v.kind == "sku" && v.id == "SKU-A"),
        "{found:?}"
    );

    // The binary: its last line and exit status.
    let urls = [Which::Order, Which::Payment, Which::Inventory].map(|w| sys.url(w, ""));
    let (code, out) = audit_binary(urls, &["--settle", "0s"])?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.lines().last(),
        Some("7 orders audited, 2 violations"),
        "{out}"
    );
    // A service that cannot be reached: exit 2.
    let nowhere = "http://127.0.0.1:9".to_owned();
    let (code, out) = audit_binary([nowhere.clone(), nowhere.clone(), nowhere], &[])?;
    assert_eq!(code, 2, "{out}");
    sys.shutdown().await
}

/// `GET /orders`, `GET /payments`, `GET /reservations`: newest first, in
/// pages that chain through `next`/`after`, with filters, and a JSON 400
/// for bad parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listings_page_newest_first_and_refuse_bad_parameters() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-L", 100).await?;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            sys.place(json!([{"sku": "SKU-L", "quantity": 1, "unit_price": "1.00"}]))
                .await?,
        );
    }
    for id in &ids {
        sys.wait_terminal(id).await?;
    }
    ids.reverse(); // newest first
    for (which, path, key) in [
        (Which::Order, "/orders", "orders"),
        (Which::Payment, "/payments", "payments"),
        (Which::Inventory, "/reservations", "reservations"),
    ] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let q = after
                .as_ref()
                .map(|a| format!("&after={a}"))
                .unwrap_or_default();
            let page = sys.get_ok(which, &format!("{path}?limit=2{q}")).await?;
            let rows = page[key].as_array().cloned().unwrap_or_default();
            assert!(rows.len() <= 2);
            seen.extend(
                rows.iter()
                    .filter_map(|r| r["order_id"].as_str().map(str::to_owned)),
            );
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, ids, "{path}");
    }
    let confirmed = sys
        .get_ok(Which::Order, "/orders?status=CONFIRMED&customer_id=c-test")
        .await?;
    assert_eq!(confirmed["orders"].as_array().map(Vec::len), Some(5));
    let none = sys.get_ok(Which::Order, "/orders?status=FAILED").await?;
    assert_eq!(none["orders"].as_array().map(Vec::len), Some(0));
    assert_eq!(none["next"], Value::Null);
    let held = sys
        .get_ok(Which::Inventory, &format!("/reservations/{}", ids[0]))
        .await?;
    assert_eq!(held["status"], "HELD");
    for (which, path) in [
        (Which::Order, "/orders?limit=0"),
        (Which::Order, "/orders?limit=501"),
        (Which::Order, "/orders?after=nope"),
        (Which::Order, "/orders?status=LOST"),
        (Which::Order, "/orders?created_before=yesterday"),
        (Which::Order, "/orders?colour=red"),
        (Which::Payment, "/payments?limit=x"),
        (Which::Inventory, "/reservations?after=1"),
        (Which::Inventory, "/reservations/not-a-uuid"),
    ] {
        let (status, body) = sys.get_json(which, path).await?;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{path}: {body}");
    }
    let (status, _) = sys
        .get_json(
            Which::Inventory,
            &format!("/reservations/{}", uuid::Uuid::now_v7()),
        )
        .await?;
    assert_eq!(status, 404);
    sys.shutdown().await
}
