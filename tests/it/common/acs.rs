//! DC/OS strict mode for the tests: a service account's RSA key and secret file, a CA with a
//! server certificate for 127.0.0.1 (both made by the openssl CLI, once per test process),
//! and a fake ACS whose login route ([`Acs::router`], served beside a fake master's API)
//! verifies the login JWT's RS256 signature with the account's public key (by ring, not by
//! l4lb's code) and issues tokens that expire within seconds. A fake master's
//! [`Gate`](super::fake::Gate) asks it whether a token is live ([`Acs::admits`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use l4lb::source::acs::ServiceAccount;
use l4lb::source::http::Auth;
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use tokio::net::TcpListener;

use super::fake::{Fake, Gate};

/// Where the ACS takes logins (DC/OS's path).
pub const LOGIN_PATH: &str = "/acs/api/v1/auth/login";

/// The service account every strict test logs in as.
pub const UID: &str = "l4lb-principal";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl CLI");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// Test key material, made once per test process in a directory of its own.
pub struct Pki {
    /// The service account's RSA key (PKCS#8 PEM).
    pub account_pem: String,
    /// Its public half, as ring verifies with (`RSAPublicKey` DER).
    pub account_public: Vec<u8>,
    /// Another RSA key (PEM) that the ACS does not know.
    pub stranger_pem: String,
    /// The CA's certificate (what `--ca-file` names).
    pub ca_file: PathBuf,
    /// A server certificate for 127.0.0.1 and localhost, signed by the CA.
    pub server: Arc<rustls::ServerConfig>,
    _dir: tempfile::TempDir,
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        l4lb::tls::init();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for k in ["account.key", "stranger.key"] {
            openssl(
                d,
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                    k,
                ],
            );
        }
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            d,
            &[
                &["req", "-x509"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            ]
            .concat()
            .into_iter()
            .chain([
                "-subj",
                "/CN=l4lb test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ])
            .collect::<Vec<_>>(),
        );
        openssl(
            d,
            &[
                &["req"],
                &ec[..],
                &["-keyout", "srv.key", "-out", "srv.csr"],
            ]
            .concat()
            .into_iter()
            .chain(["-subj", "/CN=master.mesos"])
            .collect::<Vec<_>>(),
        );
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "srv.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "srv.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(d.join("srv.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(d.join("srv.key")).unwrap();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let account_pem = std::fs::read_to_string(d.join("account.key")).unwrap();
        let PrivateKeyDer::Pkcs8(der) =
            PrivateKeyDer::from_pem_slice(account_pem.as_bytes()).unwrap()
        else {
            panic!("openssl genpkey writes PKCS#8");
        };
        let account_public = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        Pki {
            account_pem,
            account_public,
            stranger_pem: std::fs::read_to_string(d.join("stranger.key")).unwrap(),
            ca_file: d.join("ca.pem"),
            server: Arc::new(server),
            _dir: dir,
        }
    })
}

/// A DC/OS service-account secret (the JSON `dcos security secrets create-sa-secret` writes).
pub fn secret_json(pem: &str, login_endpoint: &str) -> String {
    json!({"scheme": "RS256", "uid": UID, "private_key": pem, "login_endpoint": login_endpoint})
        .to_string()
}

/// [`secret_json`] logging in at [`LOGIN_PATH`] of `master` (`scheme://host:port`).
pub fn secret_at(pem: &str, master: &str) -> String {
    secret_json(pem, &format!("{master}{LOGIN_PATH}"))
}

/// The service account of key `pem` logging in at `master`'s ACS, as a client's [`Auth`].
pub fn account(pem: &str, master: &str) -> Auth {
    Auth::ServiceAccount(ServiceAccount::from_secret(&secret_at(pem, master)).unwrap())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A fake ACS. Clones share it.
#[derive(Clone)]
pub struct Acs(Arc<Inner>);

struct Inner {
    public: Vec<u8>,
    /// Life of the tokens it issues, whole seconds (as `exp` is).
    life: AtomicU64,
    /// Every token issued, with its `exp`; a revoked one is gone.
    live: Mutex<HashMap<String, u64>>,
    issued: Mutex<Vec<String>>,
    logins: AtomicU64,
    bad_logins: AtomicU64,
}

impl Acs {
    /// Logins of [`UID`] with the key of [`pki`]; tokens live `life` seconds.
    pub fn new(life: u64) -> Self {
        Acs(Arc::new(Inner {
            public: pki().account_public.clone(),
            life: AtomicU64::new(life),
            live: Mutex::default(),
            issued: Mutex::default(),
            logins: AtomicU64::new(0),
            bad_logins: AtomicU64::new(0),
        }))
    }

    /// `POST` [`LOGIN_PATH`].
    pub fn router(&self) -> Router {
        Router::new()
            .route(LOGIN_PATH, post(login))
            .with_state(self.clone())
    }

    /// A fake started by `start(listener, extra routes, TLS)` with this ACS's login beside its
    /// API, which (its [`Gate`], from `gate`) refuses every request without a live token of
    /// this ACS; over TLS with [`pki`]'s server certificate when `tls`.
    pub async fn front<S>(
        &self,
        tls: bool,
        start: impl FnOnce(TcpListener, Router, Option<Arc<rustls::ServerConfig>>) -> Fake<S>,
        gate: impl FnOnce(&S) -> &Gate,
    ) -> Fake<S> {
        let tls = tls.then(|| pki().server.clone());
        let fake = start(super::fake::listener().await, self.router(), tls);
        let acs = self.clone();
        gate(&fake).require(move |h| acs.admits(h));
        fake
    }

    /// Whether `headers` carry `Authorization: token=<a live token>`.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(t) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("token="))
        else {
            return false;
        };
        let exp = self.0.live.lock().unwrap().get(t).copied();
        exp.is_some_and(|exp| now() < exp as f64)
    }

    /// Issue tokens living `secs` from now on.
    pub fn set_life(&self, secs: u64) {
        self.0.life.store(secs, Ordering::SeqCst);
    }

    /// Forget every token issued (an ACS restart, a revocation): the next request is refused.
    pub fn revoke_all(&self) {
        self.0.live.lock().unwrap().clear();
    }

    /// Logins that got a token.
    pub fn logins(&self) -> u64 {
        self.0.logins.load(Ordering::SeqCst)
    }

    /// Logins refused (bad signature, wrong uid, expired login token, not RS256).
    pub fn bad_logins(&self) -> u64 {
        self.0.bad_logins.load(Ordering::SeqCst)
    }

    /// Every token ever issued.
    pub fn issued(&self) -> Vec<String> {
        self.0.issued.lock().unwrap().clone()
    }
}

/// The claims of `jwt` when it is RS256 and its signature verifies with `public`.
fn verified(jwt: &str, public: &[u8]) -> Option<Value> {
    let (message, sig) = jwt.rsplit_once('.')?;
    let (header, claims) = message.split_once('.')?;
    let header: Value = serde_json::from_slice(&B64.decode(header).ok()?).ok()?;
    if header["alg"] != "RS256" {
        return None;
    }
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public)
        .verify(message.as_bytes(), &B64.decode(sig).ok()?)
        .ok()?;
    serde_json::from_slice(&B64.decode(claims).ok()?).ok()
}

async fn login(State(acs): State<Acs>, Json(body): Json<Value>) -> Response {
    let claims = body["token"]
        .as_str()
        .and_then(|t| verified(t, &acs.0.public));
    let good = claims.is_some_and(|c| {
        body["uid"] == UID && c["uid"] == UID && c["exp"].as_f64().is_some_and(|exp| exp > now())
    });
    if !good {
        acs.0.bad_logins.fetch_add(1, Ordering::SeqCst);
        let why = json!({"title": "Unauthorized", "description": "Login token invalid"});
        return (StatusCode::UNAUTHORIZED, Json(why)).into_response();
    }
    acs.0.logins.fetch_add(1, Ordering::SeqCst);
    let exp = now() as u64 + acs.0.life.load(Ordering::SeqCst);
    let token = format!(
        "{}.{}.{}",
        B64.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        B64.encode(json!({"uid": UID, "exp": exp}).to_string()),
        B64.encode(rand::random::<[u8; 32]>()),
    );
    acs.0.live.lock().unwrap().insert(token.clone(), exp);
    acs.0.issued.lock().unwrap().push(token.clone());
    Json(json!({ "token": token })).into_response()
}
