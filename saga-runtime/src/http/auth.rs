//! Optional bearer-token authentication: a JWT signed by a key of a JWK set
//! (RFC 7517), with the configured issuer and audience.
//!
//! Off unless `AUTH_JWKS_URL` or `AUTH_JWKS_FILE` is set; then every API
//! route needs `Authorization: Bearer <JWT>` and the handlers see a
//! [`Caller`]. The probes and the API description stay open.
//!
//! Keys are looked up by the token's `kid`. The set is read at start (a
//! set that cannot be read stops start-up), read again every
//! `AUTH_JWKS_REFRESH_SECS`, and at once (at most every
//! [`MIN_REFETCH`]) when a token names a `kid` the set does not hold, so a
//! key rotated in at the identity provider is accepted without a restart.
//!
//! A token that passed is remembered until it expires ([`Verified`]), so a
//! client sending the same token again is not checked again: an ES256
//! signature check costs about as much CPU as the rest of `POST /orders`.
//! A read that finds the set changed forgets them all, so a key taken out
//! of the set stops working at once; a read that finds the same set (the
//! periodic refresh, a token naming a `kid` nobody has) forgets nothing.
//!
//! Keys that cannot be read again are trusted for at most
//! `AUTH_JWKS_MAX_STALE_SECS` after the last good read: then the API
//! answers 503 and `/ready` says why, rather than accept tokens the issuer
//! may have revoked meanwhile.
//!
//! Two development switches, off by default: `AUTH_JWKS_ALLOW_HTTP` lets
//! `AUTH_JWKS_URL` be plain `http://` (else an attacker on the path could
//! hand the services keys of their own), and `AUTH_ALLOW_DEV_KEY` accepts
//! the repository's development key (`dev/auth/`, whose private half is
//! public), which is otherwise dropped from any key set it appears in.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::env::{self, ConfigError};
use crate::health::Health;
use crate::http::ApiError;

/// What `/ready` calls authentication whose keys went stale.
const HEALTH_COMPONENT: &str = "auth";

/// The `scope` an operator's token carries.
pub const ADMIN_SCOPE: &str = "saga:admin";
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// The repository's development key (`dev/auth/jwks.json`): its `kid` and
/// public point. Its private key is in the repository, so it is refused
/// unless `AUTH_ALLOW_DEV_KEY` is on.
pub const DEV_KEY_KID: &str = "saga-dev-es256";
const DEV_KEY_X: &str = "ApjpUTLcYhuZDAYz64fQFKLOlaK8ZU3rHMU8LkaVxaM";
const DEV_KEY_Y: &str = "mNnnH5h0W9P0pjacH5mkvqZCoLltUbBc-DPki0Vo2k8";
/// A token naming an unknown `kid` makes the set be read again, at most
/// this often.
pub const MIN_REFETCH: Duration = Duration::from_secs(2);
/// How many verified tokens are remembered at most.
pub const VERIFIED_CAPACITY: usize = 10_000;
/// Signature algorithms accepted (never `none`, never HMAC: a public key
/// set cannot hold a shared secret safely).
pub const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Where the key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// `AUTH_JWKS_URL`.
    Url(String),
    /// `AUTH_JWKS_FILE`.
    File(PathBuf),
}

impl JwksSource {
    /// The variable that configured it, for error messages.
    pub fn var(&self) -> &'static str {
        match self {
            JwksSource::Url(_) => "AUTH_JWKS_URL",
            JwksSource::File(_) => "AUTH_JWKS_FILE",
        }
    }

    fn shown(&self) -> String {
        match self {
            JwksSource::Url(u) => u.clone(),
            JwksSource::File(p) => p.display().to_string(),
        }
    }
}

/// Authentication settings; `None` in [`crate::ServiceConfig`] means off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub jwks: JwksSource,
    /// `AUTH_ISSUER`: the `iss` every token must carry.
    pub issuer: String,
    /// `AUTH_AUDIENCE`: a value the token's `aud` must hold.
    pub audience: String,
    /// `AUTH_JWKS_REFRESH_SECS` (default 300): how often the set is read again.
    pub refresh: Duration,
    /// `AUTH_JWKS_MAX_STALE_SECS` (default 3600): how long after the last
    /// good read the keys in hand are still trusted.
    pub max_stale: Duration,
    /// `AUTH_ALLOW_DEV_KEY` (default false): accept the repository's
    /// development key.
    pub allow_dev_key: bool,
}

impl AuthConfig {
    /// Reads `AUTH_*`; `None` when neither `AUTH_JWKS_URL` nor
    /// `AUTH_JWKS_FILE` is set (and then `AUTH_ISSUER`/`AUTH_AUDIENCE`
    /// must not be set either: a half-done configuration must not leave the
    /// API open by mistake).
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        let url = env::var("AUTH_JWKS_URL");
        let file = env::var("AUTH_JWKS_FILE");
        let jwks = match (url, file) {
            (Some(_), Some(f)) => {
                return Err(ConfigError::Invalid {
                    var: "AUTH_JWKS_FILE".into(),
                    value: f,
                    reason: "set AUTH_JWKS_URL or AUTH_JWKS_FILE, not both".into(),
                })
            }
            (Some(u), None) => {
                let allow_http = env::flag("AUTH_JWKS_ALLOW_HTTP")?;
                let reason = if u.starts_with("https://") {
                    None
                } else if u.starts_with("http://") {
                    (!allow_http).then_some(
                        "must be https:// (over plain http an attacker on the path could hand                          the services keys of their own); for development only, set                          AUTH_JWKS_ALLOW_HTTP=true",
                    )
                } else {
                    Some("must be an https:// URL")
                };
                if let Some(reason) = reason {
                    return Err(ConfigError::Invalid {
                        var: "AUTH_JWKS_URL".into(),
                        value: u,
                        reason: reason.into(),
                    });
                }
                JwksSource::Url(u)
            }
            (None, Some(f)) => JwksSource::File(PathBuf::from(f)),
            (None, None) => {
                for var in ["AUTH_ISSUER", "AUTH_AUDIENCE"] {
                    if let Some(value) = env::var(var) {
                        return Err(ConfigError::Invalid {
                            var: var.into(),
                            value,
                            reason: "set AUTH_JWKS_URL or AUTH_JWKS_FILE too, or unset it \
                                     (authentication is off without a key set)"
                                .into(),
                        });
                    }
                }
                return Ok(None);
            }
        };
        let hint = "the value every token must carry; required with AUTH_JWKS_URL/AUTH_JWKS_FILE";
        let issuer = env::required("AUTH_ISSUER", hint)?;
        let audience = env::required("AUTH_AUDIENCE", hint)?;
        let secs: u64 = env::parsed_with("AUTH_JWKS_REFRESH_SECS", 300, |s| {
            if *s >= 1 {
                Ok(())
            } else {
                Err("must be at least 1 (whole seconds)".into())
            }
        })?;
        let max_stale: u64 = env::parsed_with("AUTH_JWKS_MAX_STALE_SECS", 3600, |s| {
            if *s >= secs {
                Ok(())
            } else {
                Err(format!(
                    "must be at least AUTH_JWKS_REFRESH_SECS ({secs}), or every refresh would be late"
                ))
            }
        })?;
        Ok(Some(Self {
            jwks,
            issuer,
            audience,
            refresh: Duration::from_secs(secs),
            max_stale: Duration::from_secs(max_stale),
            allow_dev_key: env::flag("AUTH_ALLOW_DEV_KEY")?,
        }))
    }
}

/// Who is calling, as the handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off: the caller may do everything.
    Open,
    /// A verified token: its `sub`, and whether its `scope` holds
    /// [`ADMIN_SCOPE`].
    Token { subject: String, admin: bool },
}

impl Caller {
    /// May see everyone's data and use the operator routes.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Token { admin, .. } => *admin,
        }
    }

    /// The one customer whose data the caller may see, or `None` when it
    /// may see everyone's (auth off, or an operator).
    pub fn only_customer(&self) -> Option<&str> {
        match self {
            Caller::Token {
                subject,
                admin: false,
            } => Some(subject),
            _ => None,
        }
    }

    /// The token's subject, if there is a token.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Token { subject, .. } => Some(subject),
        }
    }

    /// `Ok` for an operator, else 403 `insufficient_scope` saying that
    /// `what` needs the admin scope.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::insufficient_scope(format!(
                "{what} needs a token with scope {ADMIN_SCOPE}"
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            tracing::error!("a handler asked for the caller on a route without authentication");
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        })
    }
}

/// Why a token was refused (the 401's message).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("missing bearer token: send Authorization: Bearer <JWT>")]
    Missing,
    /// Not the token's fault: the keys could not be read again for too
    /// long. Answered 503.
    #[error("{0}")]
    KeysStale(String),
    #[error("the Authorization header is not \"Bearer <JWT>\"")]
    NotBearer,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("tokens signed with {0:?} are not accepted")]
    Algorithm(Algorithm),
    #[error("no key {0:?} in the key set")]
    UnknownKey(String),
    #[error("the token has no kid and the key set holds more than one key")]
    NoKid,
    #[error("key {kid:?} is for {key:?}, the token says {token:?}")]
    KeyMismatch {
        kid: String,
        key: Algorithm,
        token: Algorithm,
    },
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("invalid signature")]
    Signature,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl From<jsonwebtoken::errors::Error> for TokenError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => TokenError::Expired,
            K::ImmatureSignature => TokenError::NotYetValid,
            K::InvalidSignature => TokenError::Signature,
            K::InvalidIssuer => TokenError::Issuer,
            K::InvalidAudience => TokenError::Audience,
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => {
                TokenError::Malformed(e.to_string())
            }
            K::MissingRequiredClaim(c) => TokenError::Invalid(format!("claim {c} is missing")),
            _ => TokenError::Invalid(e.to_string()),
        }
    }
}

/// The claims read from a token (others are ignored).
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Seconds since the epoch (checked by `jsonwebtoken`; kept to know
    /// how long the token may be remembered).
    exp: u64,
    /// Space-separated (RFC 8693), or a list as some providers send it.
    #[serde(default)]
    scope: Option<Scope>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scope {
    Text(String),
    List(Vec<String>),
}

impl Scope {
    fn has(&self, wanted: &str) -> bool {
        match self {
            Scope::Text(s) => s.split_whitespace().any(|s| s == wanted),
            Scope::List(l) => l.iter().any(|s| s == wanted),
        }
    }
}

/// One usable key of the set.
#[derive(Clone)]
struct Key {
    decoding: DecodingKey,
    /// The algorithm the set pins the key to (`alg`), if it does.
    alg: Option<Algorithm>,
}

/// The keys by `kid` (`None` for a key without one).
#[derive(Clone, Default)]
struct KeySet {
    keys: HashMap<Option<String>, Key>,
    /// The usable keys' JWKs, sorted: two reads that give the same
    /// fingerprint give the same keys.
    fingerprint: Vec<String>,
}

impl KeySet {
    /// The usable signing keys of `set` (without the development key
    /// unless `allow_dev_key`); an error when there is none.
    fn from_jwks(set: &JwkSet, allow_dev_key: bool) -> Result<Self, String> {
        let mut keys = HashMap::new();
        let mut fingerprint = Vec::new();
        for jwk in &set.keys {
            if !allow_dev_key && is_dev_key(jwk) {
                tracing::warn!(
                    kid = ?jwk.common.key_id,
                    "the key set holds the repository's development key, whose private key is public; it is refused (AUTH_ALLOW_DEV_KEY=true accepts it, for development only)"
                );
                continue;
            }
            if let Some(key) = usable(jwk) {
                keys.insert(jwk.common.key_id.clone(), key);
                fingerprint.push(serde_json::to_string(jwk).unwrap_or_default());
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable signing key among its {} keys (RSA or EC keys for signatures{})",
                set.keys.len(),
                if allow_dev_key {
                    ""
                } else {
                    "; the development key is refused"
                }
            ));
        }
        fingerprint.sort_unstable();
        Ok(Self { keys, fingerprint })
    }

    fn find(&self, kid: Option<&str>) -> Result<&Key, TokenError> {
        match kid {
            Some(kid) => self
                .keys
                .get(&Some(kid.to_owned()))
                .ok_or_else(|| TokenError::UnknownKey(kid.to_owned())),
            None if self.keys.len() == 1 => self.keys.values().next().ok_or(TokenError::NoKid),
            None => Err(TokenError::NoKid),
        }
    }
}

/// The repository's development key, whatever `kid` it is given.
fn is_dev_key(jwk: &Jwk) -> bool {
    match &jwk.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec) => {
            ec.x == DEV_KEY_X && ec.y == DEV_KEY_Y
        }
        _ => false,
    }
}

/// A JWK this service can verify signatures with, or `None` (an encryption
/// key, a symmetric key, an algorithm it does not accept).
fn usable(jwk: &Jwk) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(signing_algorithm(a)?),
    };
    let decoding = match &jwk.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
        | jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
            DecodingKey::from_jwk(jwk).ok()?
        }
        _ => return None,
    };
    Some(Key { decoding, alg })
}

fn signing_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    let alg: Algorithm = a.to_string().parse().ok()?;
    ALGORITHMS.contains(&alg).then_some(alg)
}

/// Tokens that passed, by their full text, until they expire (with the
/// leeway): a pure structure, its clock passed in.
///
/// Each key-set read starts a new generation and forgets every token; a
/// check that began under an older generation (its key may be gone now) is
/// not remembered.
#[derive(Debug, Default)]
struct Verified {
    generation: u64,
    tokens: HashMap<Box<str>, (Caller, u64)>,
}

impl Verified {
    /// The caller `token` stands for, if it passed and `now` (seconds
    /// since the epoch) is not past its expiry.
    fn get(&mut self, token: &str, now: u64) -> Option<Caller> {
        match self.tokens.get(token) {
            Some((caller, until)) if now <= *until => Some(caller.clone()),
            Some(_) => {
                self.tokens.remove(token);
                None
            }
            None => None,
        }
    }

    /// Remembers that `token` passed, checked under `generation`, valid
    /// until `until`. When full, expired tokens go first, then all.
    fn put(&mut self, generation: u64, token: &str, caller: Caller, until: u64, now: u64) {
        if generation != self.generation || until < now {
            return;
        }
        if self.tokens.len() >= VERIFIED_CAPACITY {
            self.tokens.retain(|_, (_, u)| now <= *u);
            if self.tokens.len() >= VERIFIED_CAPACITY {
                self.tokens.clear();
            }
        }
        self.tokens.insert(token.into(), (caller, until));
    }

    /// Forgets every token: the key set changed.
    fn reset(&mut self) {
        self.generation += 1;
        self.tokens.clear();
    }
}

/// Checks tokens against the configured key set.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    service: &'static str,
    config: AuthConfig,
    keys: RwLock<KeySet>,
    verified: Mutex<Verified>,
    /// When the set was last read (successfully or not).
    read_at: tokio::sync::Mutex<Instant>,
    /// When the set was last read successfully.
    read_ok_at: Mutex<Instant>,
    health: Health,
    http: reqwest::Client,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Reads the key set; a set that cannot be read or holds no usable key
    /// is a [`ConfigError`] naming the variable.
    pub async fn load(
        service: &'static str,
        config: AuthConfig,
        health: Health,
    ) -> Result<Self, ConfigError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| invalid(&config.jwks, format!("HTTP client: {e}")))?;
        let keys = read_set(&http, &config.jwks, config.allow_dev_key)
            .await
            .map_err(|e| invalid(&config.jwks, e))?;
        tracing::info!(
            source = %config.jwks.shown(),
            keys = keys.keys.len(),
            issuer = %config.issuer,
            audience = %config.audience,
            "authentication on: API routes need a bearer token"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                service,
                config,
                keys: RwLock::new(keys),
                verified: Mutex::new(Verified::default()),
                read_at: tokio::sync::Mutex::new(Instant::now()),
                read_ok_at: Mutex::new(Instant::now()),
                health,
                http,
            }),
        })
    }

    /// The caller a token stands for, or why it is refused. A token that
    /// passed before and has not expired is not checked again.
    pub async fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        self.fresh_enough()?;
        let now = jsonwebtoken::get_current_timestamp();
        let generation = {
            let mut verified = self.verified();
            if let Some(caller) = verified.get(token, now) {
                return Ok(caller);
            }
            verified.generation
        };
        let (caller, exp) = self.check(token).await?;
        self.verified().put(
            generation,
            token,
            caller.clone(),
            exp.saturating_add(LEEWAY_SECS),
            now,
        );
        Ok(caller)
    }

    /// Refuses to trust keys not read successfully for longer than
    /// `AUTH_JWKS_MAX_STALE_SECS`.
    fn fresh_enough(&self) -> Result<(), TokenError> {
        let age = self
            .inner
            .read_ok_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        if age > self.inner.config.max_stale {
            return Err(TokenError::KeysStale(format!(
                "the key set ({}) has not been read for {} s, more than AUTH_JWKS_MAX_STALE_SECS ({} s): tokens cannot be checked against keys the issuer may have revoked; try again later",
                self.inner.config.jwks.shown(),
                age.as_secs(),
                self.inner.config.max_stale.as_secs()
            )));
        }
        Ok(())
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, Verified> {
        self.inner
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks `token`'s signature and claims: its caller and `exp`.
    async fn check(&self, token: &str) -> Result<(Caller, u64), TokenError> {
        let header = jsonwebtoken::decode_header(token)?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(TokenError::Algorithm(header.alg));
        }
        let kid = header.kid.as_deref();
        let key = match self.key(kid) {
            Err(TokenError::UnknownKey(_)) if self.reread_for_unknown_kid().await => self.key(kid),
            other => other,
        }?;
        if let Some(pinned) = key.alg {
            if pinned != header.alg {
                return Err(TokenError::KeyMismatch {
                    kid: kid.unwrap_or_default().to_owned(),
                    key: pinned,
                    token: header.alg,
                });
            }
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.inner.config.issuer]);
        validation.set_audience(&[&self.inner.config.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)?;
        let claims = data.claims;
        if claims.sub.trim().is_empty() {
            return Err(TokenError::Invalid("empty sub".into()));
        }
        let admin = claims.scope.as_ref().is_some_and(|s| s.has(ADMIN_SCOPE));
        let caller = Caller::Token {
            subject: claims.sub,
            admin,
        };
        Ok((caller, claims.exp))
    }

    fn key(&self, kid: Option<&str>) -> Result<Key, TokenError> {
        let keys = self
            .inner
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.find(kid).cloned()
    }

    /// Reads the set again unless it was read less than [`MIN_REFETCH`]
    /// ago; true when it was read now.
    async fn reread_for_unknown_kid(&self) -> bool {
        let mut read_at = self.inner.read_at.lock().await;
        if read_at.elapsed() < MIN_REFETCH {
            return false;
        }
        *read_at = Instant::now();
        self.reread().await
    }

    /// Reads the set again; on failure the keys in hand stay (for at most
    /// `AUTH_JWKS_MAX_STALE_SECS` after the last good read). The tokens
    /// remembered are forgotten only if the set changed.
    async fn reread(&self) -> bool {
        let config = &self.inner.config;
        match read_set(&self.inner.http, &config.jwks, config.allow_dev_key).await {
            Ok(keys) => {
                *self
                    .inner
                    .read_ok_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Instant::now();
                self.inner.health.recover(HEALTH_COMPONENT);
                let n = keys.keys.len();
                let mut held = self
                    .inner
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if held.fingerprint == keys.fingerprint {
                    tracing::debug!(keys = n, "key set read again, unchanged");
                } else {
                    *held = keys;
                    drop(held);
                    self.verified().reset();
                    tracing::info!(keys = n, "key set read again: it changed");
                }
                true
            }
            Err(e) => {
                tracing::warn!(
                    source = %config.jwks.shown(),
                    error = %e,
                    "could not read the key set again; keeping the keys in hand"
                );
                if let Err(stale) = self.fresh_enough() {
                    self.inner
                        .health
                        .degrade(HEALTH_COMPONENT, stale.to_string());
                }
                false
            }
        }
    }

    /// Reads the set every `refresh` until `shutdown`.
    pub async fn refresh(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.config.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    *self.inner.read_at.lock().await = Instant::now();
                    self.reread().await;
                }
            }
        }
    }
}

fn invalid(source: &JwksSource, reason: String) -> ConfigError {
    ConfigError::Invalid {
        var: source.var().to_owned(),
        value: source.shown(),
        reason,
    }
}

async fn read_set(
    http: &reqwest::Client,
    source: &JwksSource,
    allow_dev_key: bool,
) -> Result<KeySet, String> {
    let body = match source {
        JwksSource::Url(url) => {
            let response = http
                .get(url)
                .send()
                .await
                .map_err(|e| format!("could not fetch the key set: {e}"))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("fetching the key set answered {status}"));
            }
            response
                .bytes()
                .await
                .map_err(|e| format!("could not read the key set: {e}"))?
                .to_vec()
        }
        JwksSource::File(path) => tokio::fs::read(path)
            .await
            .map_err(|e| format!("could not read the key set: {e}"))?,
    };
    let set: JwkSet = serde_json::from_slice(&body)
        .map_err(|e| format!("not a JWK set ({{\"keys\": [...]}}): {e}"))?;
    KeySet::from_jwks(&set, allow_dev_key)
}

/// Middleware on the API routes: puts the [`Caller`] in the request's
/// extensions, or answers 401 `invalid_token`.
pub async fn authenticate(
    State(verifier): State<Option<Verifier>>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = match &verifier {
        None => Caller::Open,
        Some(v) => {
            let verified = match bearer(req.headers()) {
                Ok(token) => v.verify(token).await,
                Err(e) => Err(e),
            };
            match verified {
                Ok(caller) => caller,
                Err(e) => {
                    let labels = crate::metrics::AuthLabels {
                        service: v.inner.service.to_owned(),
                        reason: reason_label(&e).to_owned(),
                    };
                    crate::metrics::global()
                        .auth_refused
                        .get_or_create(&labels)
                        .inc();
                    if let TokenError::KeysStale(why) = &e {
                        tracing::warn!(reason = %why, "request refused: the key set is stale");
                        return ApiError::new(
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "unavailable",
                            why.clone(),
                        )
                        .into_response();
                    }
                    tracing::info!(reason = %e, "request refused: token not acceptable");
                    return ApiError::unauthorized(e.to_string()).into_response();
                }
            }
        }
    };
    if let Some(subject) = caller.subject() {
        tracing::Span::current().record("enduser.id", subject);
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The `reason` label of `saga_http_auth_refused_total`.
fn reason_label(e: &TokenError) -> &'static str {
    match e {
        TokenError::Missing => "missing",
        TokenError::KeysStale(_) => "keys_stale",
        TokenError::NotBearer | TokenError::Malformed(_) => "malformed",
        TokenError::Algorithm(_) | TokenError::KeyMismatch { .. } => "algorithm",
        TokenError::UnknownKey(_) | TokenError::NoKid => "unknown_key",
        TokenError::Expired | TokenError::NotYetValid => "expired",
        TokenError::Signature => "signature",
        TokenError::Issuer | TokenError::Audience => "issuer_or_audience",
        TokenError::Invalid(_) => "invalid",
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &axum::http::HeaderMap) -> Result<&str, TokenError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(TokenError::Missing)?
        .to_str()
        .map_err(|_| TokenError::NotBearer)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(TokenError::NotBearer)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(TokenError::NotBearer);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_of(subject: &str, admin: bool) -> Caller {
        Caller::Token {
            subject: subject.into(),
            admin,
        }
    }

    #[test]
    fn bearer_is_read_case_insensitively_and_nothing_else_is() {
        let h = |v: &str| {
            let mut m = axum::http::HeaderMap::new();
            m.insert(
                axum::http::header::AUTHORIZATION,
                axum::http::HeaderValue::from_str(v).expect("header"),
            );
            m
        };
        assert_eq!(bearer(&h("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(&h("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(&h("Basic abc")), Err(TokenError::NotBearer));
        assert_eq!(bearer(&h("Bearer")), Err(TokenError::NotBearer));
        assert_eq!(
            bearer(&axum::http::HeaderMap::new()),
            Err(TokenError::Missing)
        );
    }

    #[test]
    fn a_verified_token_is_remembered_until_it_expires_or_the_keys_change() {
        let alice = token_of("alice", false);
        let mut v = Verified::default();
        assert_eq!(v.get("t1", 100), None);
        v.put(0, "t1", alice.clone(), 200, 100);
        assert_eq!(v.get("t1", 150), Some(alice.clone()));
        assert_eq!(v.get("t1", 200), Some(alice.clone()));
        assert_eq!(v.get("t1", 201), None, "expired");
        assert!(v.tokens.is_empty(), "an expired token is dropped");
        assert_eq!(v.get("t2", 100), None, "only the same text");

        // Already expired when checked: not remembered.
        v.put(0, "t3", alice.clone(), 99, 100);
        assert_eq!(v.get("t3", 99), None);

        // The set was read again: everything is forgotten, and a check that
        // began before (under the old keys) is not remembered.
        v.put(0, "t1", alice.clone(), 200, 100);
        let before = v.generation;
        v.reset();
        assert_eq!(v.get("t1", 150), None);
        v.put(before, "t4", alice.clone(), 200, 100);
        assert_eq!(v.get("t4", 150), None);
        v.put(v.generation, "t4", alice.clone(), 200, 100);
        assert_eq!(v.get("t4", 150), Some(alice.clone()));
    }

    #[test]
    fn the_verified_tokens_stay_bounded() {
        let caller = token_of("c", false);
        let mut v = Verified::default();
        for i in 0..VERIFIED_CAPACITY {
            // Half of them expired by time 100.
            let until = if i % 2 == 0 { 50 } else { 500 };
            v.put(0, &format!("t{i}"), caller.clone(), until, 10);
        }
        assert_eq!(v.tokens.len(), VERIFIED_CAPACITY);
        v.put(0, "new", caller.clone(), 500, 100);
        assert_eq!(
            v.tokens.len(),
            VERIFIED_CAPACITY / 2 + 1,
            "expired ones went"
        );
        for i in 0..VERIFIED_CAPACITY {
            v.put(0, &format!("u{i}"), caller.clone(), 500, 100);
        }
        assert!(
            v.tokens.len() <= VERIFIED_CAPACITY,
            "full of live ones: cleared"
        );
        let last = format!("u{}", VERIFIED_CAPACITY - 1);
        assert!(v.get(&last, 100).is_some(), "the newest is remembered");
    }

    #[test]
    fn scope_as_text_or_list() {
        let text: Claims =
            serde_json::from_str(r#"{"sub":"a","exp":1,"scope":"openid saga:admin"}"#)
                .expect("claims");
        assert!(text.scope.is_some_and(|s| s.has(ADMIN_SCOPE)));
        let list: Claims =
            serde_json::from_str(r#"{"sub":"a","exp":1,"scope":["saga:admin"]}"#).expect("claims");
        assert!(list.scope.is_some_and(|s| s.has(ADMIN_SCOPE)));
        let near: Claims =
            serde_json::from_str(r#"{"sub":"a","exp":1,"scope":"saga:administrator"}"#)
                .expect("claims");
        assert!(!near.scope.is_some_and(|s| s.has(ADMIN_SCOPE)));
        let none: Claims = serde_json::from_str(r#"{"sub":"a","exp":1}"#).expect("claims");
        assert!(none.scope.is_none());
    }

    #[test]
    fn callers_rights() {
        let customer = token_of("c-1", false);
        let admin = token_of("ops", true);
        assert_eq!(customer.only_customer(), Some("c-1"));
        assert!(customer.require_admin("x").is_err());
        assert_eq!(admin.only_customer(), None);
        assert!(admin.require_admin("x").is_ok());
        assert_eq!(Caller::Open.only_customer(), None);
        assert!(Caller::Open.require_admin("x").is_ok());
    }

    #[test]
    fn symmetric_and_encryption_keys_are_not_usable() {
        let set: JwkSet = serde_json::from_value(serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
            {"kty": "EC", "crv": "P-256", "use": "enc", "kid": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]}))
        .expect("set");
        assert!(KeySet::from_jwks(&set, false).is_err());
        let ok: JwkSet = serde_json::from_value(serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "sig", "alg": "ES256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]}))
        .expect("set");
        let keys = KeySet::from_jwks(&ok, false).expect("usable");
        assert!(keys.find(Some("sig")).is_ok());
        assert!(
            keys.find(None).is_ok(),
            "the only key serves a token without kid"
        );
        assert!(matches!(
            keys.find(Some("other")),
            Err(TokenError::UnknownKey(_))
        ));
    }

    /// The repository's key set (`dev/auth/jwks.json`), as committed.
    fn dev_set() -> JwkSet {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../dev/auth/jwks.json"
        ))
        .expect("dev/auth/jwks.json");
        serde_json::from_str(&text).expect("a JWK set")
    }

    #[test]
    fn the_development_key_is_refused_unless_allowed_whatever_its_kid() {
        let mut set = dev_set();
        assert_eq!(set.keys[0].common.key_id.as_deref(), Some(DEV_KEY_KID));
        assert!(is_dev_key(&set.keys[0]), "DEV_KEY_X/Y match the file");
        assert!(KeySet::from_jwks(&set, false).is_err());
        assert!(KeySet::from_jwks(&set, true)
            .expect("allowed")
            .find(Some(DEV_KEY_KID))
            .is_ok());
        set.keys[0].common.key_id = Some("renamed".into());
        assert!(KeySet::from_jwks(&set, false).is_err());
    }

    fn file_config(path: &std::path::Path) -> AuthConfig {
        AuthConfig {
            jwks: JwksSource::File(path.to_owned()),
            issuer: "i".into(),
            audience: "a".into(),
            refresh: Duration::from_secs(300),
            max_stale: Duration::from_secs(3600),
            allow_dev_key: true,
        }
    }

    #[tokio::test]
    async fn reading_an_unchanged_set_keeps_the_verified_tokens_and_a_changed_one_forgets_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        let write = |set: &JwkSet| {
            std::fs::write(&path, serde_json::to_vec(set).expect("json")).expect("write")
        };
        let set = dev_set();
        write(&set);
        let v = Verifier::load("t", file_config(&path), Health::default())
            .await
            .expect("load");
        let now = jsonwebtoken::get_current_timestamp();
        v.verified()
            .put(0, "t1", token_of("c", false), now + 100, now);
        assert!(v.reread().await);
        assert!(
            v.verified().get("t1", now).is_some(),
            "an unchanged set forgot the verified tokens"
        );
        let mut changed = set.clone();
        changed.keys[0].common.key_id = Some("rotated".into());
        write(&changed);
        assert!(v.reread().await);
        assert!(v.verified().get("t1", now).is_none());
    }

    #[tokio::test]
    async fn keys_not_read_for_longer_than_the_limit_are_not_trusted_and_ready_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, serde_json::to_vec(&dev_set()).expect("json")).expect("write");
        let health = Health::default();
        let mut config = file_config(&path);
        config.max_stale = Duration::ZERO;
        let v = Verifier::load("t", config, health.clone())
            .await
            .expect("load");
        assert!(v.fresh_enough().is_err());
        std::fs::remove_file(&path).expect("rm");
        assert!(!v.reread().await);
        assert!(health.degraded().contains_key(HEALTH_COMPONENT));
        assert!(matches!(
            v.verify("whatever").await,
            Err(TokenError::KeysStale(_))
        ));
        std::fs::write(&path, serde_json::to_vec(&dev_set()).expect("json")).expect("write");
        assert!(v.reread().await);
        assert!(health.degraded().is_empty());
    }
}
