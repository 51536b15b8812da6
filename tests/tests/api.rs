//! The API descriptions: each service's `/openapi.json` is a valid OpenAPI
//! 3.1 document, every operation it describes answers (success and error)
//! as described, and Swagger UI at `/docs` renders in a real headless
//! Chromium.
//!
//! Every answer the other end-to-end tests get through the harness is
//! checked against the document too (see `saga_tests::contract`).

use std::process::Command;

use anyhow::Context;
use saga_tests::contract::validate_document;
use saga_tests::{System, Which};
use serde_json::{json, Value};

const ALL: [Which; 3] = [Which::Order, Which::Payment, Which::Inventory];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_documents_are_valid_openapi_3_1_and_describe_the_api() -> anyhow::Result<()> {
    let sys = System::start().await?;
    for w in ALL {
        // The event contract, beside the API document.
        let events: Value = sys
            .http
            .get(sys.url(w, "/asyncapi.json"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        assert!(
            events == events::asyncapi::document(),
            "{}'s /asyncapi.json is the events crate's",
            w.name()
        );
        let doc = sys.contract(w).document();
        validate_document(doc).with_context(|| format!("{}'s /openapi.json", w.name()))?;
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["title"], w.name());
        let about = doc["info"]["description"].as_str().unwrap_or_default();
        assert!(about.contains("Authentication is **off**"), "{about}");
        assert!(doc["info"]["contact"].is_null(), "{}", doc["info"]);
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["bearerFormat"],
            "JWT"
        );
        for op in sys.contract(w).operations() {
            let (method, path) = op.split_once(' ').unwrap_or_default();
            let o = &doc["paths"][path][method.to_lowercase()];
            assert!(o["summary"].is_string(), "{op} has no summary");
            assert!(
                o["parameters"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["name"] == "traceparent")),
                "{op} does not document traceparent"
            );
            if !["/health", "/ready", "/metrics"].contains(&path) {
                // A response is inline or a `$ref` to a shared one.
                let resolve = |r: &'_ Value| -> Value {
                    match r["$ref"].as_str() {
                        Some(at) => doc
                            .pointer(at.trim_start_matches('#'))
                            .cloned()
                            .unwrap_or_default(),
                        None => r.clone(),
                    }
                };
                let errors = o["responses"]
                    .as_object()
                    .map(|r| {
                        r.iter()
                            .filter(|(code, _)| code.starts_with('4') || code.starts_with('5'))
                            .all(|(_, r)| {
                                resolve(r)["content"]["application/json"]["schema"]["$ref"]
                                    == "#/components/schemas/ErrorBody"
                            })
                    })
                    .unwrap_or(false);
                assert!(
                    errors,
                    "{op}: every error answer must be the JSON error body"
                );
                assert!(
                    o["responses"]["503"].is_object(),
                    "{op} needs the database and must document its 503"
                );
            }
        }
    }
    let order = sys.contract(Which::Order).document();
    let create = &order["paths"]["/orders"]["post"];
    let headers: Vec<&str> = create["parameters"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    for h in ["Idempotency-Key", "X-Correlation-ID", "traceparent"] {
        assert!(
            headers.contains(&h),
            "POST /orders does not document {h}: {headers:?}"
        );
    }
    assert!(create["responses"]["202"]["headers"]["Location"].is_object());
    assert!(create["requestBody"]["content"]["application/json"]["schema"].is_object());
    assert!(
        order["components"]["schemas"]["CreateOrderRequest"]["example"].is_object(),
        "the request has an example"
    );
    // Auth is off here: no operation requires a token.
    assert!(create["security"].is_null());
    sys.shutdown().await
}

/// Drives every documented operation of every service through the harness
/// (which checks each answer against the document), with success and
/// error answers, and checks that none was left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_operation_answers_as_its_document_says() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let (o, p, i) = (Which::Order, Which::Payment, Which::Inventory);
    let send = |w: Which, req: reqwest::RequestBuilder| sys.send(w, req);
    let url = |w: Which, path: &str| sys.url(w, path);

    // order-service
    let body = json!({"customer_id": "c-api", "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "9.99"}]});
    let created = send(
        o,
        sys.http
            .post(url(o, "/orders"))
            .header("Idempotency-Key", "api-1")
            .json(&body),
    )
    .await?;
    assert_eq!(created.status, 202);
    assert!(created.header("location").is_some());
    let id = created.body["order_id"]
        .as_str()
        .context("order_id")?
        .to_owned();
    let replay = send(
        o,
        sys.http
            .post(url(o, "/orders"))
            .header("Idempotency-Key", "api-1")
            .json(&body),
    )
    .await?;
    assert_eq!(
        (replay.status, replay.header("idempotent-replayed")),
        (202, Some("true"))
    );
    for (req, status) in [
        (sys.http.post(url(o, "/orders")).header("content-type", "application/json").body("{"), 400),
        (sys.http.post(url(o, "/orders")).body("x"), 415),
        (sys.http.post(url(o, "/orders")).json(&json!({"customer_id": "c", "items": []})), 422),
        (sys.http.post(url(o, "/orders")).json(&json!({"items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "1"}]})), 422),
        (sys.http.post(url(o, "/orders")).header("Idempotency-Key", "api-1").json(&json!({"customer_id": "c-api", "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "9.99"}]})), 422),
        (sys.http.post(url(o, "/orders")).header("content-type", "application/json").body(vec![b' '; 1024 * 1024 + 1]), 413),
    ] {
        assert_eq!(send(o, req).await?.status, status);
    }
    let done = sys.wait_terminal(&id).await?;
    assert_eq!(done["status"], "CONFIRMED");
    assert!(done["history"].as_array().is_some_and(|h| h.len() >= 3));
    for (path, status) in [
        (format!("/orders/{id}"), 200),
        ("/orders/nope".to_owned(), 400),
        (format!("/orders/{}", uuid::Uuid::now_v7()), 404),
        (
            "/orders?limit=1&status=CONFIRMED&customer_id=c-api".to_owned(),
            200,
        ),
        (
            "/orders?created_after=2020-01-01T00:00:00Z&created_before=2100-01-01T00:00:00Z"
                .to_owned(),
            200,
        ),
        ("/orders?limit=0".to_owned(), 400),
        ("/orders?status=LOST".to_owned(), 400),
        ("/orders?bogus=1".to_owned(), 400),
        ("/no-such-route".to_owned(), 404),
    ] {
        assert_eq!(sys.get_json(o, &path).await?.0, status, "{path}");
    }
    let page = sys.get_ok(o, "/orders?limit=1").await?;
    assert!(page["next"].is_string(), "a full page has a cursor: {page}");
    let cancel = send(o, sys.http.post(url(o, &format!("/orders/{id}/cancel")))).await?;
    assert_eq!(cancel.status, 202);
    assert_eq!(cancel.body["status"], "CANCELLED");
    assert_eq!(
        send(o, sys.http.post(url(o, "/orders/nope/cancel")))
            .await?
            .status,
        400
    );
    assert_eq!(
        send(
            o,
            sys.http
                .post(url(o, &format!("/orders/{}/cancel", uuid::Uuid::now_v7())))
        )
        .await?
        .status,
        404
    );
    let declined = sys
        .place(json!([{"sku": "SKU-1", "quantity": 1, "unit_price": "999999.00"}]))
        .await?;
    assert_eq!(sys.wait_terminal(&declined).await?["status"], "FAILED");
    assert_eq!(
        send(
            o,
            sys.http.post(url(o, &format!("/orders/{declined}/cancel")))
        )
        .await?
        .status,
        409
    );
    assert_eq!(
        send(o, sys.http.delete(url(o, "/orders"))).await?.status,
        405
    );

    // payment-service
    for (path, status) in [
        (format!("/payments/{id}"), 200),
        ("/payments/nope".to_owned(), 400),
        (format!("/payments/{}", uuid::Uuid::now_v7()), 404),
        ("/payments?limit=1".to_owned(), 200),
        ("/payments?limit=x".to_owned(), 400),
    ] {
        assert_eq!(sys.get_json(p, &path).await?.0, status, "{path}");
    }

    // inventory-service
    let put = |body: serde_json::Value| sys.http.put(url(i, "/products/SKU-API")).json(&body);
    let created = send(i, put(json!({"name": "API", "available": 3}))).await?;
    assert_eq!(created.status, 201);
    let etag = created.header("etag").context("ETag")?.to_owned();
    let updated = send(
        i,
        put(json!({"name": "API", "available": 4})).header("If-Match", &etag),
    )
    .await?;
    assert_eq!(updated.status, 200);
    assert_eq!(
        send(
            i,
            put(json!({"name": "API", "available": 5})).header("If-Match", &etag)
        )
        .await?
        .status,
        409
    );
    assert_eq!(
        send(
            i,
            put(json!({"name": "API", "available": 5})).header("If-Match", "*")
        )
        .await?
        .status,
        400
    );
    assert_eq!(
        send(i, put(json!({"name": "API", "available": 5})))
            .await?
            .status,
        428
    );
    assert_eq!(
        send(i, put(json!({"name": "", "available": 5})))
            .await?
            .status,
        422
    );
    assert_eq!(
        send(i, sys.http.put(url(i, "/products/SKU-API")).body("x"))
            .await?
            .status,
        415
    );
    let restock = |sku: &str, q: i64| {
        sys.http
            .post(url(i, &format!("/products/{sku}/restock")))
            .json(&json!({"quantity": q}))
    };
    assert_eq!(send(i, restock("SKU-API", 2)).await?.body["available"], 6);
    assert_eq!(send(i, restock("SKU-API", 0)).await?.status, 422);
    assert_eq!(send(i, restock("SKU-NONE", 1)).await?.status, 404);
    assert_eq!(send(i, restock("bad%20sku", 1)).await?.status, 400);
    for (path, status) in [
        ("/products".to_owned(), 200),
        ("/products/SKU-API".to_owned(), 200),
        ("/products/SKU-NONE".to_owned(), 404),
        ("/products/bad%20sku".to_owned(), 400),
        ("/reservations?status=RELEASED".to_owned(), 200),
        ("/reservations?status=VOID".to_owned(), 400),
        (format!("/reservations/{id}"), 200),
        ("/reservations/nope".to_owned(), 400),
        (format!("/reservations/{declined}"), 404),
    ] {
        assert_eq!(sys.get_json(i, &path).await?.0, status, "{path}");
    }

    // The probes, everywhere.
    for w in ALL {
        for path in ["/health", "/ready", "/metrics"] {
            assert_eq!(
                send(w, sys.http.get(url(w, path))).await?.status,
                200,
                "{} {path}",
                w.name()
            );
        }
    }

    for w in ALL {
        let contract = sys.contract(w);
        let missed: Vec<String> = contract
            .operations()
            .difference(&contract.seen())
            .cloned()
            .collect();
        assert!(
            missed.is_empty(),
            "{}: operations never exercised: {missed:?}",
            w.name()
        );
    }
    sys.shutdown().await
}

/// The Chromium to render with: `CHROMIUM_BIN`, else `chromium` on the
/// PATH (`./scripts/test.sh` installs Debian's).
fn chromium() -> String {
    std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swagger_ui_renders_every_operation_in_headless_chromium() -> anyhow::Result<()> {
    let sys = System::start().await?;
    for w in ALL {
        // Served from the binary: the page and its assets, no CDN.
        let page = sys
            .http
            .get(sys.url(w, "/docs/"))
            .send()
            .await?
            .text()
            .await?;
        assert!(page.contains("swagger-ui"), "{page}");
        assert!(
            !page.contains("://cdn") && !page.contains("unpkg.com"),
            "{page}"
        );

        let profile = tempfile::tempdir()?;
        let out = tokio::task::spawn_blocking({
            let url = sys.url(w, "/docs/");
            let profile = profile.path().to_owned();
            move || {
                Command::new(chromium())
                    .args([
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-quic",
                        "--no-first-run",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        "--disable-dev-shm-usage",
                        // Lets the page's scripts run (fetch the document,
                        // render) before the DOM is printed.
                        "--virtual-time-budget=20000",
                        "--dump-dom",
                    ])
                    .arg(format!("--user-data-dir={}", profile.display()))
                    .arg(url)
                    .output()
            }
        })
        .await?
        .with_context(|| {
            format!(
                "running {} (./scripts/test.sh installs Debian's chromium; or set CHROMIUM_BIN)",
                chromium()
            )
        })?;
        let dom = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Swagger UI fetched /openapi.json and rendered one block per
        // operation, with the service's title.
        assert!(
            dom.contains(w.name()),
            "{}: title missing from the rendered page",
            w.name()
        );
        let rendered = dom.matches("opblock-summary-path").count();
        let operations = sys.contract(w).operations().len();
        assert!(
            rendered >= operations,
            "{}: {rendered} operations rendered, {operations} documented",
            w.name()
        );
        for op in sys.contract(w).operations() {
            let path = op.split_once(' ').map(|(_, p)| p).unwrap_or_default();
            assert!(
                dom.contains(&format!("data-path=\"{path}\"")),
                "{}: {op} not rendered",
                w.name()
            );
        }
        assert!(
            !dom.contains("Failed to load API definition"),
            "{}",
            w.name()
        );
    }
    sys.shutdown().await
}
