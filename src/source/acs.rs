//! DC/OS strict mode: a service account's login to the ACS. A secret file
//! ([`ServiceAccount::from_secret`]) names a uid, an RSA private key and the login endpoint;
//! [`Login`] signs a short-lived RS256 JWT (`uid`, `exp`) with the key, POSTs
//! `{"uid", "token"}` to the endpoint and keeps the token it gets back for every request of
//! one source. One login at a time: concurrent requests wait for it and share its token. The
//! token is renewed at 80% of its life (its `exp` claim), and at once when a master answers
//! 401 with `WWW-Authenticate: acsjwt` ([`Login::renew`]). Neither the key nor a token reaches
//! a `Debug`, a log line or an error.
//!
//! JWTs are built by `jsonwebtoken`, whose RSA signature comes from `ring` (already linked
//! for rustls) through the crate's [`CryptoProvider`] hook: RS256 only, no second crypto
//! stack. Neutral like [`super::http`]: it knows no source.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::signature::{self, Signer};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use reqwest::header::HeaderValue;
use reqwest::{StatusCode, Url};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tokio::time::Instant;

use super::http::redact;

/// Life of the JWT a login sends: it is used once, at once; the margin covers clock skew
/// between this host and the ACS.
const LOGIN_JWT_LIFE: Duration = Duration::from_secs(300);

/// Part of a token's life after which it is renewed.
const RENEW_AT: f64 = 0.8;

/// Why a service-account secret is refused (exit 64). Never shows the key.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("not JSON ({0})")]
    Json(#[source] serde_json::Error),
    #[error("missing field {0:?}")]
    Missing(&'static str),
    #[error("field {0:?} is not a non-empty string")]
    NotString(&'static str),
    #[error("scheme {0:?} is not supported (only RS256)")]
    Scheme(String),
    #[error("private_key is not an RSA private key in PEM (PKCS#1 or PKCS#8, 2048 bits or more)")]
    Key,
    #[error("login_endpoint {0:?} is not an http:// or https:// URL with a host")]
    Endpoint(String),
}

/// A service account: who logs in, with which key, where. `Debug` shows the uid and endpoint
/// only.
#[derive(Clone)]
pub struct ServiceAccount {
    uid: String,
    key: Arc<EncodingKey>,
    endpoint: Url,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("uid", &self.uid)
            .field("login_endpoint", &redact(&self.endpoint))
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// A DC/OS service-account secret: JSON with `uid`, `private_key` (PEM), `scheme`
    /// (`RS256`) and `login_endpoint`. The key is checked to be a usable RSA key here, so a
    /// bad one stops the start, not the first login.
    pub fn from_secret(json: &str) -> Result<Self, SecretError> {
        let v: Value = serde_json::from_str(json).map_err(SecretError::Json)?;
        let field = |name: &'static str| -> Result<&str, SecretError> {
            match v.get(name) {
                None | Some(Value::Null) => Err(SecretError::Missing(name)),
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim()),
                Some(_) => Err(SecretError::NotString(name)),
            }
        };
        let uid = field("uid")?;
        let pem = field("private_key")?;
        let scheme = field("scheme")?;
        let endpoint = field("login_endpoint")?;
        if scheme != "RS256" {
            return Err(SecretError::Scheme(scheme.chars().take(32).collect()));
        }
        let endpoint: Url = endpoint
            .parse()
            .ok()
            .filter(|u: &Url| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some_and(|h| !h.is_empty())
            })
            .ok_or_else(|| SecretError::Endpoint(endpoint.chars().take(200).collect()))?;
        let der = match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs1(k)) => k.secret_pkcs1_der().to_vec(),
            Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
            _ => return Err(SecretError::Key),
        };
        rsa_key_pair(&der).ok_or(SecretError::Key)?;
        Ok(ServiceAccount {
            uid: uid.to_string(),
            key: Arc::new(EncodingKey::from_rsa_der(&der)),
            endpoint,
        })
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The JWT a login sends: RS256 over `{"uid", "exp"}`, `exp` [`LOGIN_JWT_LIFE`] after
    /// `now_unix`.
    fn login_jwt(&self, now_unix: u64) -> Result<String, jsonwebtoken::errors::Error> {
        install_provider();
        let claims = serde_json::json!({
            "uid": self.uid,
            "exp": now_unix + LOGIN_JWT_LIFE.as_secs(),
        });
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
    }
}

/// Why a login failed. Shows the endpoint (redacted) and what went wrong, never a key or a
/// token.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("cannot sign the login token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("login at {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("login at {url} refused: HTTP {status}{detail}")]
    Refused {
        url: String,
        status: StatusCode,
        /// `: <description>` from the ACS's answer, when it gave one.
        detail: String,
    },
    #[error("login at {url} answered without a token")]
    NoToken { url: String },
}

impl LoginError {
    /// Whether it failed on the way (timeout, connect, reset) rather than being refused.
    pub fn is_transport(&self) -> bool {
        matches!(self, LoginError::Http { .. })
    }
}

/// A token a login obtained, ready to send.
#[derive(Clone)]
struct Cached {
    /// `token=<token>`, marked sensitive (hidden from `Debug`).
    header: HeaderValue,
    /// Counts logins; tells a renewal whether someone else already renewed.
    generation: u64,
    renew_at: Instant,
}

/// The login of one source: its account, its HTTP client and the token cache. Share it with
/// an `Arc`; `Debug` shows the account only.
pub struct Login {
    account: ServiceAccount,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl Login {
    /// Logins of `account` through `http` (its timeout bounds each login).
    pub fn new(account: ServiceAccount, http: reqwest::Client) -> Self {
        Login {
            account,
            http,
            cache: tokio::sync::Mutex::new(None),
        }
    }

    /// The `Authorization` value to send and its generation (for [`Login::renew`]): the
    /// cached token while it is young, else a new login's. Concurrent callers wait for one
    /// login.
    pub async fn token(&self) -> Result<(HeaderValue, u64), LoginError> {
        self.renew(None).await
    }

    /// A token other than the one of generation `stale` (refused by a master): a new login,
    /// unless another caller already made one since.
    pub async fn renew(&self, stale: Option<u64>) -> Result<(HeaderValue, u64), LoginError> {
        let mut cache = self.cache.lock().await;
        let generation = cache.as_ref().map_or(0, |c| c.generation);
        if let Some(c) = cache.as_ref()
            && Some(c.generation) != stale
            && Instant::now() < c.renew_at
        {
            return Ok((c.header.clone(), c.generation));
        }
        let fresh = self.login(generation + 1).await?;
        let out = (fresh.header.clone(), fresh.generation);
        *cache = Some(fresh);
        Ok(out)
    }

    async fn login(&self, generation: u64) -> Result<Cached, LoginError> {
        let url = &self.account.endpoint;
        let shown = || redact(url);
        let jwt = self
            .account
            .login_jwt(unix_now())
            .map_err(LoginError::Sign)?;
        let body = serde_json::json!({ "uid": self.account.uid, "token": jwt });
        let resp = self
            .http
            .post(url.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| LoginError::Http {
                url: shown(),
                source: e.without_url(),
            })?;
        let status = resp.status();
        let answer: Option<Value> = resp.json().await.ok();
        if !status.is_success() {
            let detail = answer
                .as_ref()
                .and_then(|a| a.get("description").or_else(|| a.get("title")))
                .and_then(Value::as_str)
                .map(|d| format!(": {}", d.chars().take(200).collect::<String>()))
                .unwrap_or_default();
            return Err(LoginError::Refused {
                url: shown(),
                status,
                detail,
            });
        }
        let token = answer
            .as_ref()
            .and_then(|a| a.get("token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| LoginError::NoToken { url: shown() })?;
        let mut header = HeaderValue::from_str(&format!("token={token}"))
            .map_err(|_| LoginError::NoToken { url: shown() })?;
        header.set_sensitive(true);
        let life = token_life(token, since_epoch());
        match life {
            Some(l) => {
                tracing::info!(uid = %self.account.uid, valid_for = ?l, "service account logged in")
            }
            None => {
                tracing::info!(uid = %self.account.uid, "service account logged in (token without exp: renewed when refused)")
            }
        }
        Ok(Cached {
            header,
            generation,
            renew_at: Instant::now() + renew_after(life),
        })
    }
}

/// How long a token is used before it is renewed: [`RENEW_AT`] of its `life`, at least half
/// a second (a token the ACS says is already expired is not asked for in a loop); without an
/// `exp` it is kept until a master refuses it.
fn renew_after(life: Option<Duration>) -> Duration {
    match life {
        Some(l) => l.mul_f64(RENEW_AT).max(Duration::from_millis(500)),
        None => Duration::from_secs(10 * 365 * 24 * 3600),
    }
}

/// What is left of a token's life at `now` (since the epoch, to the nanosecond: `exp` is in
/// whole seconds, and a short token's life must not be overestimated by the part of a second
/// already gone), from its `exp` claim (read, not verified: only the ACS can verify it);
/// `None` when it is no JWT or has no `exp`.
fn token_life(token: &str, now: Duration) -> Option<Duration> {
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: u64,
    }
    let claims: Exp = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    Some(Duration::from_secs(claims.exp).saturating_sub(now))
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn unix_now() -> u64 {
    since_epoch().as_secs()
}

/// Whether an answer refuses the token the request carried (`401` with
/// `WWW-Authenticate: acsjwt`, as DC/OS's Admin Router answers an expired or unknown token).
pub fn refuses_token(resp: &reqwest::Response) -> bool {
    resp.status() == StatusCode::UNAUTHORIZED
        && resp
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.trim().to_ascii_lowercase().starts_with("acsjwt"))
}

/// The RSA key in `der` (PKCS#8, else PKCS#1), as ring takes it.
fn rsa_key_pair(der: &[u8]) -> Option<RsaKeyPair> {
    RsaKeyPair::from_pkcs8(der)
        .or_else(|_| RsaKeyPair::from_der(der))
        .ok()
}

/// jsonwebtoken's crypto for this process: RS256 signatures by ring; nothing else (l4lb
/// verifies no JWT: the ACS and the masters do).
static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: rs256_signer,
    verifier_factory: no_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = PROVIDER.install_default();
    });
}

struct Rs256(RsaKeyPair);

impl Signer<Vec<u8>> for Rs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let mut sig = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                msg,
                &mut sig,
            )
            .map_err(|_| signature::Error::new())?;
        Ok(sig)
    }
}

impl JwtSigner for Rs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

fn rs256_signer(
    alg: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    if *alg != Algorithm::RS256 {
        return Err(ErrorKind::UnsupportedAlgorithm.into());
    }
    let pair = rsa_key_pair(key.as_bytes())
        .ok_or_else(|| ErrorKind::InvalidRsaKey("not an RSA private key".into()))?;
    Ok(Box::new(Rs256(pair)))
}

fn no_verifier(
    _: &Algorithm,
    _: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    Err(ErrorKind::UnsupportedAlgorithm.into())
}

#[cfg(test)]
mod tests;
