//! Bearer tokens: the one operator commands send, and development tokens
//! minted from a development key.
//!
//! `saga-admin dev-token` signs with a key kept in the repository
//! (`dev/auth/dev-es256.pem`). That key is public: a token it signs is
//! worth nothing outside a developer's machine. **Never configure a
//! deployment with `dev/auth/jwks.json`.**

use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// The development issuer, audience and key ID (see `dev/auth/`).
pub const DEV_ISSUER: &str = "saga-dev";
pub const DEV_AUDIENCE: &str = "saga";
pub const DEV_KID: &str = "saga-dev-es256";

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the key {path} is not a PKCS#8 PEM EC P-256 private key: {source}")]
    Key {
        path: String,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    #[error("signing: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("the token is not a valid header value")]
    Header,
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// What a development token says.
#[derive(Debug, Clone)]
pub struct DevClaims {
    pub subject: String,
    pub admin: bool,
    pub ttl: Duration,
    pub issuer: String,
    pub audience: String,
    pub kid: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

/// An ES256 JWT for `claims`, signed with the PEM key at `key_path`.
pub fn mint(key_path: &str, claims: &DevClaims) -> Result<String, TokenError> {
    let key = signing_key(key_path)?;
    let now = jsonwebtoken::get_current_timestamp();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(claims.kid.clone());
    let body = Claims {
        sub: &claims.subject,
        iss: &claims.issuer,
        aud: &claims.audience,
        iat: now,
        exp: now + claims.ttl.as_secs(),
        scope: claims.admin.then_some(saga_runtime::auth::ADMIN_SCOPE),
    };
    jsonwebtoken::encode(&header, &body, &key).map_err(TokenError::Sign)
}

/// The JWK set holding the public half of the PEM key at `key_path`.
pub fn jwks(key_path: &str, kid: &str) -> Result<JwkSet, TokenError> {
    let key = signing_key(key_path)?;
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).map_err(TokenError::Sign)?;
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(KeyAlgorithm::ES256);
    Ok(JwkSet { keys: vec![jwk] })
}

/// The EC P-256 private key in the PEM file at `path`.
fn signing_key(path: &str) -> Result<EncodingKey, TokenError> {
    let pem = std::fs::read(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    EncodingKey::from_ec_pem(&pem).map_err(|source| TokenError::Key {
        path: path.to_owned(),
        source,
    })
}

/// An HTTP client that sends `Authorization: Bearer <token>` when given one.
pub fn http_client(token: Option<&str>) -> Result<reqwest::Client, TokenError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| TokenError::Header)?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()
        .map_err(TokenError::Client)
}
