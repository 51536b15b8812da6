//! Keys, tokens and a JWK set server of the tests' own: keys are made by
//! `openssl genpkey` (RSA 2048 and EC P-256), tokens signed with
//! `jsonwebtoken`, and the set served over HTTP so that it can change while
//! the services run (key rotation).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use axum::routing::get;
use axum::{Json, Router};
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// The issuer and audience the tests' services expect.
pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "saga-tests";

/// A private key and its public JWK.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    pub jwk: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new key for `alg` (RS256 or ES256), named `kid`.
    pub fn generate(alg: Algorithm, kid: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key.pem");
        let args: &[&str] = match alg {
            Algorithm::RS256 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Algorithm::ES256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            other => bail!("no key generation for {other:?}"),
        };
        openssl_genpkey(args, &path)?;
        let pem = std::fs::read(&path)?;
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem)?,
            _ => EncodingKey::from_ec_pem(&pem)?,
        };
        let mut jwk = Jwk::from_encoding_key(&key, alg)?;
        jwk.common.key_id = Some(kid.to_owned());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk.common.key_algorithm = Some(match alg {
            Algorithm::RS256 => KeyAlgorithm::RS256,
            _ => KeyAlgorithm::ES256,
        });
        Ok(Self {
            kid: kid.to_owned(),
            alg,
            key,
            jwk,
        })
    }

    /// A token with `claims`, signed by this key, naming its `kid`.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }

    /// A valid token for `sub`, for an hour; an operator's with `admin`.
    pub fn token(&self, sub: &str, admin: bool) -> anyhow::Result<String> {
        self.sign(&claims(sub, admin))
    }
}

fn openssl_genpkey(args: &[&str], out: &Path) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(out)
        .output()
        .context("running openssl (Debian package openssl) to make a test key")?;
    if !output.status.success() {
        bail!(
            "openssl genpkey failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Valid claims for `sub` (issuer, audience, an hour to live).
pub fn claims(sub: &str, admin: bool) -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    let mut c = json!({
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 3600,
    });
    if admin {
        c["scope"] = json!("openid saga:admin");
    }
    c
}

/// The JWK set of `keys`.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    let set = JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    };
    serde_json::to_value(set).unwrap_or(Value::Null)
}

/// Serves a JWK set at `/jwks.json` that the test can change.
pub struct JwksServer {
    pub url: String,
    set: Arc<RwLock<Value>>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for JwksServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksServer")
            .field("url", &self.url)
            .finish()
    }
}

impl JwksServer {
    pub async fn start(keys: &[&SigningKey]) -> anyhow::Result<Self> {
        let set = Arc::new(RwLock::new(jwks(keys)));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (served, counted) = (set.clone(), fetches.clone());
        let app = Router::new().route(
            "/jwks.json",
            get(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let set = served.read().map(|s| s.clone()).unwrap_or(Value::Null);
                async move { Json(set) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/jwks.json", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            set,
            fetches,
            task,
        })
    }

    /// How many times the set was fetched so far.
    pub fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on the set holds `keys`.
    pub fn set(&self, keys: &[&SigningKey]) {
        if let Ok(mut s) = self.set.write() {
            *s = jwks(keys);
        }
    }

    /// The services' authentication settings for this set.
    pub fn auth_config(&self) -> saga_runtime::auth::AuthConfig {
        saga_runtime::auth::AuthConfig {
            jwks: saga_runtime::auth::JwksSource::Url(self.url.clone()),
            issuer: ISSUER.to_owned(),
            audience: AUDIENCE.to_owned(),
            refresh: std::time::Duration::from_secs(300),
            max_stale: std::time::Duration::from_secs(3600),
            allow_dev_key: false,
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
