//! Authentication and roles: bearer JWTs checked against a JWK set the
//! test serves (keys of its own, RS256 and ES256), customers confined to
//! their own orders, operators (scope `saga:admin`) allowed everything,
//! keys rotated while the services run, and a wrong configuration
//! stopping start-up with one line naming the variable.

use std::process::Command;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use saga_tests::jwt::{self, JwksServer, SigningKey};
use saga_tests::{poll, procs, Answer, Options, System, Which};
use serde_json::{json, Value};

const CHALLENGE: &str = r#"Bearer error="invalid_token""#;

async fn start(jwks: &JwksServer) -> anyhow::Result<System> {
    System::start_opts(Options {
        auth: Some(jwks.auth_config()),
        ..Options::default()
    })
    .await
}

fn order_body(customer: Option<&str>) -> Value {
    let mut body = json!({"items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "5.00"}]});
    if let Some(c) = customer {
        body["customer_id"] = json!(c);
    }
    body
}

/// `POST /orders` with `authorization` as the header's value (or none).
async fn post_order(
    sys: &System,
    authorization: Option<&str>,
    body: &Value,
) -> anyhow::Result<Answer> {
    let mut req = sys.http.post(sys.url(Which::Order, "/orders")).json(body);
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    sys.send(Which::Order, req).await
}

async fn get(sys: &System, w: Which, path: &str, token: Option<&str>) -> anyhow::Result<Answer> {
    let mut req = sys.http.get(sys.url(w, path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    sys.send(w, req).await
}

fn assert_401(a: &Answer, what: &str) {
    assert_eq!(a.status, 401, "{what}: {:?}", a.body);
    assert_eq!(a.header("www-authenticate"), Some(CHALLENGE), "{what}");
    assert_eq!(
        a.body["error"]["code"], "invalid_token",
        "{what}: {:?}",
        a.body
    );
    assert!(a.body["error"]["message"].is_string(), "{what}");
}

async fn order_count(sys: &System) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(sys.db(Which::Order))
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_unacceptable_token_gets_401_and_changes_nothing() -> anyhow::Result<()> {
    let rsa = SigningKey::generate(Algorithm::RS256, "rsa-1")?;
    let ec = SigningKey::generate(Algorithm::ES256, "ec-1")?;
    let jwks = JwksServer::start(&[&rsa, &ec]).await?;
    let sys = start(&jwks).await?;
    let body = order_body(None);

    // Accepted: RS256 and ES256, with the body's customer_id left out.
    for key in [&rsa, &ec] {
        let a = post_order(
            &sys,
            Some(&format!("Bearer {}", key.token("c-ok", false)?)),
            &body,
        )
        .await?;
        assert_eq!(a.status, 202, "{:?}: {:?}", key.alg, a.body);
    }
    // Expired, but within the leeway for clock skew: accepted.
    let mut just_expired = jwt::claims("c-ok", false);
    just_expired["exp"] = json!(jsonwebtoken::get_current_timestamp() - 10);
    let a = post_order(
        &sys,
        Some(&format!("Bearer {}", ec.sign(&just_expired)?)),
        &body,
    )
    .await?;
    assert_eq!(a.status, 202, "expired within the leeway: {:?}", a.body);
    let before = order_count(&sys).await?;
    assert_eq!(before, 3);

    let now = jsonwebtoken::get_current_timestamp();
    let mut expired = jwt::claims("c-1", false);
    expired["exp"] = json!(now - 120);
    let mut wrong_aud = jwt::claims("c-1", false);
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = jwt::claims("c-1", false);
    wrong_iss["iss"] = json!("https://evil.test");
    let mut no_sub = jwt::claims("c-1", false);
    no_sub.as_object_mut().map(|c| c.remove("sub"));
    let stranger = SigningKey::generate(Algorithm::ES256, "ec-1")?; // same kid, other key
    let unknown_kid = SigningKey::generate(Algorithm::ES256, "nobody")?;
    // A token that says ES256 and names the RS256 key's kid, and one that
    // says RS256 and names the EC key's.
    let confused = SigningKey::generate(Algorithm::ES256, "rsa-1")?.token("c-1", false)?;
    let confused_rs = SigningKey::generate(Algorithm::RS256, "ec-1")?.token("c-1", false)?;
    // `alg: none`: the header {"alg":"none","typ":"JWT","kid":"ec-1"}, a
    // valid token's claims, no signature.
    let claims_part = ec
        .token("c-1", false)?
        .split('.')
        .nth(1)
        .map(str::to_owned)
        .unwrap_or_default();
    let alg_none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIiwia2lkIjoiZWMtMSJ9.{claims_part}.");
    // HS256 with the public key as the shared secret (the classic
    // algorithm-confusion attack): its JWK, as the set publishes it.
    let mut hs_header = jsonwebtoken::Header::new(Algorithm::HS256);
    hs_header.kid = Some("ec-1".into());
    let hmac_with_public_key = jsonwebtoken::encode(
        &hs_header,
        &jwt::claims("c-1", false),
        &jsonwebtoken::EncodingKey::from_secret(&serde_json::to_vec(&ec.jwk)?),
    )?;
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("not Bearer", Some("Basic YWxpY2U6cGFzcw==".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("malformed", Some("Bearer not.a.jwt".into())),
        ("expired", Some(format!("Bearer {}", rsa.sign(&expired)?))),
        (
            "wrong audience",
            Some(format!("Bearer {}", ec.sign(&wrong_aud)?)),
        ),
        (
            "wrong issuer",
            Some(format!("Bearer {}", ec.sign(&wrong_iss)?)),
        ),
        ("no sub", Some(format!("Bearer {}", ec.sign(&no_sub)?))),
        (
            "wrongly signed",
            Some(format!("Bearer {}", stranger.token("c-1", false)?)),
        ),
        (
            "unknown kid",
            Some(format!("Bearer {}", unknown_kid.token("c-1", false)?)),
        ),
        (
            "key of another algorithm",
            Some(format!("Bearer {confused}")),
        ),
        (
            "RS256 naming an EC key",
            Some(format!("Bearer {confused_rs}")),
        ),
        ("alg none", Some(format!("Bearer {alg_none}"))),
        (
            "HS256 signed with the public key",
            Some(format!("Bearer {hmac_with_public_key}")),
        ),
    ];
    for (what, authorization) in &cases {
        let a = post_order(&sys, authorization.as_deref(), &body).await?;
        assert_401(&a, what);
        let token = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "));
        for (w, path) in [
            (Which::Order, "/orders"),
            (Which::Payment, "/payments"),
            (Which::Inventory, "/products"),
            (Which::Inventory, "/reservations"),
        ] {
            assert_401(
                &get(&sys, w, path, token).await?,
                &format!("{what}: GET {path}"),
            );
        }
    }
    assert_eq!(
        order_count(&sys).await?,
        before,
        "a refused request wrote an order"
    );
    let metrics = sys.metrics(Which::Order).await?;
    assert!(
        metrics
            .contains(r#"saga_http_auth_refused_total{service="order-service",reason="expired"}"#),
        "{metrics}"
    );

    // The platform's endpoints and the API description stay open.
    for w in [Which::Order, Which::Payment, Which::Inventory] {
        for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
            let resp = sys.http.get(sys.url(w, path)).send().await?;
            assert_eq!(resp.status(), 200, "{} {path}", w.name());
        }
        let doc = sys.contract(w).document();
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(doc["paths"]["/health"]["get"]["security"], json!([{}]));
        saga_tests::contract::validate_document(doc)?;
        let about = doc["info"]["description"].as_str().unwrap_or_default();
        assert!(about.contains("Authentication is **on**"), "{about}");
    }
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn customers_see_only_their_own_orders_and_operators_see_everything() -> anyhow::Result<()> {
    let key = SigningKey::generate(Algorithm::ES256, "k1")?;
    let jwks = JwksServer::start(&[&key]).await?;
    let mut sys = start(&jwks).await?;
    let alice = key.token("alice", false)?;
    let bob = key.token("bob", false)?;
    let admin = key.token("ops", true)?;
    let bearer = |t: &str| format!("Bearer {t}");

    // Orders are placed as the token's subject.
    let a = post_order(&sys, Some(&bearer(&alice)), &order_body(None)).await?;
    assert_eq!(a.status, 202, "{:?}", a.body);
    let alices = a.body["order_id"].as_str().unwrap_or_default().to_owned();
    let a = post_order(&sys, Some(&bearer(&alice)), &order_body(Some("alice"))).await?;
    assert_eq!(
        a.status, 202,
        "the body may repeat the subject: {:?}",
        a.body
    );
    let a = post_order(&sys, Some(&bearer(&alice)), &order_body(Some("bob"))).await?;
    assert_eq!(a.status, 403, "{:?}", a.body);
    assert_eq!(a.body["error"]["code"], "forbidden");
    let a = post_order(&sys, Some(&bearer(&bob)), &order_body(None)).await?;
    assert_eq!(a.status, 202);
    let bobs = a.body["order_id"].as_str().unwrap_or_default().to_owned();

    // Alice sees her order; Bob is told it does not exist, and cannot
    // cancel it.
    let mine = get(
        &sys,
        Which::Order,
        &format!("/orders/{alices}"),
        Some(&alice),
    )
    .await?;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body["customer_id"], "alice");
    let theirs = get(&sys, Which::Order, &format!("/orders/{alices}"), Some(&bob)).await?;
    assert_eq!(theirs.status, 404, "{:?}", theirs.body);
    let missing = get(
        &sys,
        Which::Order,
        &format!("/orders/{}", uuid::Uuid::now_v7()),
        Some(&bob),
    )
    .await?;
    assert_eq!(
        theirs.body["error"]["code"], missing.body["error"]["code"],
        "another customer's order must look like no order"
    );
    let cancel = sys
        .send(
            Which::Order,
            sys.http
                .post(sys.url(Which::Order, &format!("/orders/{alices}/cancel")))
                .bearer_auth(&bob),
        )
        .await?;
    assert_eq!(cancel.status, 404);
    sys.bearer = Some(admin.clone());
    let after = sys.wait_terminal(&alices).await?;
    assert_eq!(
        after["status"], "CONFIRMED",
        "Bob's cancel must not touch it: {after}"
    );
    sys.wait_terminal(&bobs).await?;

    // Listings: a customer gets only its own; an operator gets all.
    let list = get(&sys, Which::Order, "/orders", Some(&bob)).await?;
    assert_eq!(list.status, 200);
    let owners: Vec<&str> = list.body["orders"]
        .as_array()
        .map(|o| o.iter().filter_map(|o| o["customer_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(owners, ["bob"], "{:?}", list.body);
    let other = get(&sys, Which::Order, "/orders?customer_id=alice", Some(&bob)).await?;
    assert_eq!(other.status, 403);
    let all = get(&sys, Which::Order, "/orders", Some(&admin)).await?;
    assert_eq!(all.body["orders"].as_array().map(Vec::len), Some(3));
    let read = get(
        &sys,
        Which::Order,
        &format!("/orders/{alices}"),
        Some(&admin),
    )
    .await?;
    assert_eq!(read.status, 200);

    // Catalog writes, payments and reservations are for operators.
    let put = |token: &str| {
        sys.http
            .put(sys.url(Which::Inventory, "/products/SKU-AUTH"))
            .bearer_auth(token)
            .json(&json!({"name": "Guarded", "available": 10}))
    };
    let restock = |token: &str| {
        sys.http
            .post(sys.url(Which::Inventory, "/products/SKU-AUTH/restock"))
            .bearer_auth(token)
            .json(&json!({"quantity": 5}))
    };
    for (what, req) in [("PUT", put(&alice)), ("restock", restock(&alice))] {
        let a = sys.send(Which::Inventory, req).await?;
        assert_eq!(a.status, 403, "{what}: {:?}", a.body);
        assert_eq!(a.body["error"]["code"], "insufficient_scope", "{what}");
        assert_eq!(
            a.header("www-authenticate"),
            Some(r#"Bearer error="insufficient_scope", scope="saga:admin""#)
        );
    }
    assert_eq!(
        get(&sys, Which::Inventory, "/products/SKU-AUTH", Some(&alice))
            .await?
            .status,
        404
    );
    assert_eq!(sys.send(Which::Inventory, put(&admin)).await?.status, 201);
    assert_eq!(
        sys.send(Which::Inventory, restock(&admin)).await?.status,
        200
    );
    let product = get(&sys, Which::Inventory, "/products/SKU-AUTH", Some(&alice)).await?;
    assert_eq!(product.body["available"], 15, "customers read the catalog");
    for (w, path) in [
        (Which::Payment, "/payments".to_owned()),
        (Which::Payment, format!("/payments/{alices}")),
        (Which::Inventory, "/reservations".to_owned()),
        (Which::Inventory, format!("/reservations/{alices}")),
    ] {
        assert_eq!(
            get(&sys, w, &path, Some(&alice)).await?.status,
            403,
            "{path}"
        );
        assert_eq!(
            get(&sys, w, &path, Some(&admin)).await?.status,
            200,
            "{path}"
        );
    }

    // The operator's CLI sends its token; without one it cannot run.
    let urls = [
        ("ORDER_URL", sys.url(Which::Order, "")),
        ("PAYMENT_URL", sys.url(Which::Payment, "")),
        ("INVENTORY_URL", sys.url(Which::Inventory, "")),
    ];
    let mut env: Vec<(&str, &str)> = urls.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, out) = procs::admin_binary(&["audit", "--settle", "0s"], &env)?;
    assert_eq!(code, 2, "no token: {out}");
    assert!(out.contains("401"), "{out}");
    let (code, out) = procs::admin_binary(&["audit", "--settle", "0s", "--token", &alice], &env)?;
    assert_eq!(code, 2, "a customer's token: {out}");
    env.push(("SAGA_TOKEN", &admin));
    let (code, out) = procs::admin_binary(&["audit", "--settle", "0s"], &env)?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 orders audited, 0 violations"), "{out}");
    sys.shutdown().await
}

/// An Idempotency-Key is its customer's own: Bob sending the key Alice
/// used gets an order of his own, neither hers (replayed) nor a 422 that
/// tells him the key is in use; Alice's retry still answers her order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_belongs_to_its_customer() -> anyhow::Result<()> {
    let key = SigningKey::generate(Algorithm::ES256, "k1")?;
    let jwks = JwksServer::start(&[&key]).await?;
    let sys = start(&jwks).await?;
    let place = |token: String| {
        sys.http
            .post(sys.url(Which::Order, "/orders"))
            .bearer_auth(token)
            .header("Idempotency-Key", "checkout-1")
            .json(&order_body(None))
    };
    let alices = sys
        .send(Which::Order, place(key.token("alice", false)?))
        .await?;
    assert_eq!(alices.status, 202, "{:?}", alices.body);
    let bobs = sys
        .send(Which::Order, place(key.token("bob", false)?))
        .await?;
    assert_eq!(
        bobs.status, 202,
        "Bob must not hit Alice's key: {:?}",
        bobs.body
    );
    assert_eq!(bobs.header("idempotent-replayed"), None);
    assert_ne!(bobs.body["order_id"], alices.body["order_id"]);
    let again = sys
        .send(Which::Order, place(key.token("alice", false)?))
        .await?;
    assert_eq!(again.status, 202, "{:?}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["order_id"], alices.body["order_id"]);
    assert_eq!(order_count(&sys).await?, 2);
    sys.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_key_is_accepted_once_the_set_holds_it_without_a_restart() -> anyhow::Result<()> {
    let old = SigningKey::generate(Algorithm::RS256, "2026-11")?;
    let new = SigningKey::generate(Algorithm::ES256, "2026-12")?;
    let jwks = JwksServer::start(&[&old]).await?;
    let sys = start(&jwks).await?;
    let (old_token, new_token) = (old.token("c-1", false)?, new.token("c-1", false)?);
    assert_eq!(
        get(&sys, Which::Order, "/orders", Some(&old_token))
            .await?
            .status,
        200
    );
    assert_401(
        &get(&sys, Which::Order, "/orders", Some(&new_token)).await?,
        "new kid before the set has it",
    );

    // The identity provider publishes the new key beside the old one.
    jwks.set(&[&old, &new]);
    // A token signed by the new kid is accepted.
    poll(
        Duration::from_millis(250),
        || async {
            let a = get(&sys, Which::Order, "/orders", Some(&new_token)).await?;
            Ok(if a.status == 200 {
                Ok(())
            } else {
                Err(a.status)
            })
        },
        |status| anyhow::anyhow!("the new kid's token still gets {status}"),
    )
    .await?;
    assert_eq!(
        get(&sys, Which::Order, "/orders", Some(&old_token))
            .await?
            .status,
        200
    );

    // Then retires the old one: once the set is read again (a token naming
    // an unknown kid triggers that, and the old kid is gone), old tokens
    // are refused.
    jwks.set(&[&new]);
    let stranger = SigningKey::generate(Algorithm::ES256, "probe")?.token("c-1", false)?;
    poll(
        Duration::from_millis(250),
        || async {
            let _ = get(&sys, Which::Order, "/orders", Some(&stranger)).await?;
            let a = get(&sys, Which::Order, "/orders", Some(&old_token)).await?;
            Ok(if a.status == 401 {
                Ok(())
            } else {
                Err(a.status)
            })
        },
        |status| anyhow::anyhow!("the retired key's token still gets {status}"),
    )
    .await?;
    assert_eq!(
        get(&sys, Which::Order, "/orders", Some(&new_token))
            .await?
            .status,
        200
    );
    sys.shutdown().await
}

/// Tokens naming `kid`s nobody has cannot make the services hammer the
/// identity provider: 200 of them (each a 401) cost at most a fetch per
/// [`saga_runtime::auth::MIN_REFETCH`] per service, and since the set did
/// not change, a token verified before them is still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_kids_cost_a_few_fetches_and_leave_verified_tokens_alone() -> anyhow::Result<()> {
    let key = SigningKey::generate(Algorithm::ES256, "k1")?;
    let jwks = JwksServer::start(&[&key]).await?;
    let sys = start(&jwks).await?;
    let good = key.token("c-1", false)?;
    assert_eq!(
        get(&sys, Which::Order, "/orders", Some(&good))
            .await?
            .status,
        200
    );
    let before = jwks.fetches();
    let started = std::time::Instant::now();
    for i in 0..200 {
        let stranger = SigningKey::generate(
            Algorithm::ES256,
            &format!("random-{i}-{}", uuid::Uuid::new_v4()),
        )?;
        let a = get(
            &sys,
            Which::Order,
            "/orders",
            Some(&stranger.token("c-1", false)?),
        )
        .await?;
        assert_401(&a, "unknown kid");
    }
    let fetched = jwks.fetches() - before;
    let windows = started.elapsed().as_secs() / saga_runtime::auth::MIN_REFETCH.as_secs() + 1;
    assert!(
        fetched as u64 <= windows,
        "{fetched} fetches for 200 unknown kids in {:?}",
        started.elapsed()
    );
    assert_eq!(
        get(&sys, Which::Order, "/orders", Some(&good))
            .await?
            .status,
        200
    );
    sys.shutdown().await
}

/// Runs the order-service binary with `env` (and a database and broker
/// nobody answers at) until it exits, or until its output holds `until`
/// (then it is killed), for at most 30 s.
fn run_order_service(
    env: &[(&str, &str)],
    until: Option<&str>,
) -> anyhow::Result<(Option<i32>, String)> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("out.log");
    let mut child = Command::new(procs::bin_dir()?.join("order-service"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:9/none")
        .env("KAFKA_BROKERS", "127.0.0.1:9")
        .env("PORT", "0")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?)
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if until.is_some_and(|u| read().contains(u)) || std::time::Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((code, read()))
}

#[test]
fn a_wrong_auth_configuration_stops_start_up_with_one_line_naming_the_variable(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let malformed = dir.path().join("jwks.json");
    std::fs::write(&malformed, "{\"keys\": [{\"kty\": \"oct\"")?;
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "{\"keys\": []}")?;
    let (malformed, empty) = (malformed.display().to_string(), empty.display().to_string());
    let iss = ("AUTH_ISSUER", "https://issuer.test");
    let aud = ("AUTH_AUDIENCE", "saga");
    let dev_set = format!("{}/../dev/auth/jwks.json", env!("CARGO_MANIFEST_DIR"));
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        // Plain http is refused before anything is fetched.
        (
            vec![("AUTH_JWKS_URL", "http://127.0.0.1:9/jwks.json"), iss, aud],
            "AUTH_JWKS_ALLOW_HTTP=true",
        ),
        // With the switch it is fetched (and nobody answers there).
        (
            vec![
                ("AUTH_JWKS_URL", "http://127.0.0.1:9/jwks.json"),
                ("AUTH_JWKS_ALLOW_HTTP", "true"),
                iss,
                aud,
            ],
            "could not fetch the key set",
        ),
        (
            vec![
                ("AUTH_JWKS_URL", "https://127.0.0.1:9/jwks.json"),
                ("AUTH_JWKS_ALLOW_HTTP", "maybe"),
                iss,
                aud,
            ],
            "AUTH_JWKS_ALLOW_HTTP",
        ),
        // The repository's development key alone, not allowed: no key left.
        (
            vec![("AUTH_JWKS_FILE", &dev_set), iss, aud],
            "the development key is refused",
        ),
        (
            vec![("AUTH_JWKS_URL", "ftp://x/jwks.json"), iss, aud],
            "AUTH_JWKS_URL",
        ),
        (
            vec![("AUTH_JWKS_FILE", "/nonexistent/jwks.json"), iss, aud],
            "AUTH_JWKS_FILE",
        ),
        (
            vec![("AUTH_JWKS_FILE", &malformed), iss, aud],
            "AUTH_JWKS_FILE",
        ),
        (vec![("AUTH_JWKS_FILE", &empty), iss, aud], "AUTH_JWKS_FILE"),
        (vec![("AUTH_JWKS_FILE", &malformed), aud], "AUTH_ISSUER"),
        (vec![iss, aud], "AUTH_ISSUER"),
    ];
    for (env, var) in &cases {
        let (code, out) = run_order_service(env, None)?;
        assert_eq!(code, Some(2), "{env:?}: {out}");
        let errors: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("configuration error"))
            .collect();
        assert_eq!(errors.len(), 1, "{env:?}: {out}");
        assert!(errors[0].contains(var), "{env:?} should name {var}: {out}");
    }
    Ok(())
}

#[test]
fn with_auth_off_each_service_warns_once_at_start() -> anyhow::Result<()> {
    // The database never answers, so the service keeps trying after the
    // warning until it is stopped.
    let (code, out) = run_order_service(&[("RUST_LOG", "warn")], Some("authentication is off"))?;
    assert_eq!(
        code, None,
        "it should have been waiting for its database: {out}"
    );
    assert_eq!(out.matches("authentication is off").count(), 1, "{out}");
    Ok(())
}
