use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

use super::*;
use crate::source::http::{Auth, Transport};

/// A 2048-bit RSA key in PEM, made once per test process by the openssl CLI: PKCS#8, or
/// PKCS#1 ("traditional").
fn key_pem(pkcs1: bool) -> &'static str {
    static P8: OnceLock<String> = OnceLock::new();
    static P1: OnceLock<String> = OnceLock::new();
    let cell = if pkcs1 { &P1 } else { &P8 };
    cell.get_or_init(|| {
        let mut cmd = std::process::Command::new("openssl");
        if pkcs1 {
            cmd.args(["genrsa", "-traditional", "2048"]);
        } else {
            cmd.args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ]);
        }
        let out = cmd.output().expect("openssl");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    })
}

fn secret(pem: &str, endpoint: &str) -> String {
    serde_json::json!({
        "uid": "l4lb-principal", "private_key": pem, "scheme": "RS256", "login_endpoint": endpoint,
    })
    .to_string()
}

/// The public key (PKCS#1 `RSAPublicKey` DER, as ring verifies with) of a PEM private key.
fn public_der(pem: &str) -> Vec<u8> {
    let der = match PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap() {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der().to_vec(),
        _ => panic!("not RSA"),
    };
    rsa_key_pair(&der).unwrap().public_key().as_ref().to_vec()
}

/// The claims of `jwt` when its RS256 signature verifies with `public`.
fn verify(jwt: &str, public: &[u8]) -> Option<Value> {
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

#[test]
fn secrets_are_checked_and_never_shown() {
    let pem = key_pem(false);
    let ok = secret(pem, "https://master.mesos/acs/api/v1/auth/login");
    let a = ServiceAccount::from_secret(&ok).unwrap();
    assert_eq!(a.uid(), "l4lb-principal");
    let shown = format!("{a:?}");
    assert!(
        shown.contains("l4lb-principal") && !shown.contains("PRIVATE"),
        "{shown}"
    );
    // A PKCS#1 key serves as well.
    ServiceAccount::from_secret(&secret(key_pem(true), "http://m/acs")).unwrap();

    let body = pem.lines().nth(1).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&ok).unwrap();
        f(&mut v);
        v.to_string()
    };
    #[rustfmt::skip]
    let cases: Vec<(String, &str)> = vec![
        ("{".into(), "not JSON"),
        (with(&|v| { v.as_object_mut().unwrap().remove("uid"); }), "missing field \"uid\""),
        (with(&|v| { v.as_object_mut().unwrap().remove("private_key"); }), "missing field \"private_key\""),
        (with(&|v| { v.as_object_mut().unwrap().remove("login_endpoint"); }), "missing field \"login_endpoint\""),
        (with(&|v| v["scheme"] = "HS256".into()), "scheme \"HS256\" is not supported"),
        (with(&|v| v["uid"] = 7.into()), "field \"uid\" is not a non-empty string"),
        (with(&|v| v["private_key"] = "".into()), "field \"private_key\" is not"),
        (with(&|v| v["private_key"] = pem.replace(body, "AAAA").into()), "private_key is not an RSA private key"),
        (with(&|v| v["private_key"] = body.into()), "private_key is not an RSA private key"),
        (with(&|v| v["login_endpoint"] = "master.mesos/acs".into()), "login_endpoint \"master.mesos/acs\" is not"),
    ];
    for (json, want) in cases {
        let e = ServiceAccount::from_secret(&json).unwrap_err().to_string();
        assert!(e.contains(want), "{e} !~ {want}");
        assert!(!e.contains(body) && !e.contains("PRIVATE"), "{e}");
    }
}

#[test]
fn login_jwt_is_rs256_over_uid_and_exp() {
    for pkcs1 in [false, true] {
        let pem = key_pem(pkcs1);
        let a = ServiceAccount::from_secret(&secret(pem, "http://m/acs")).unwrap();
        let jwt = a.login_jwt(1_000_000).unwrap();
        let claims = verify(&jwt, &public_der(pem)).expect("signature verifies");
        assert_eq!(
            claims,
            serde_json::json!({"uid": "l4lb-principal", "exp": 1_000_300})
        );
        // Another key's public half does not verify it.
        assert!(verify(&jwt, &public_der(key_pem(!pkcs1))).is_none());
    }
}

#[test]
fn token_life_and_renewal() {
    let jwt = |claims: Value| {
        format!(
            "{}.{}.sig",
            B64.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
            B64.encode(claims.to_string())
        )
    };
    let s = Duration::from_secs;
    #[rustfmt::skip]
    let cases = [
        (jwt(serde_json::json!({"uid": "u", "exp": 1_010})), Some(Duration::from_millis(9_250)), Duration::from_millis(7_400)),
        (jwt(serde_json::json!({"uid": "u", "exp": 1_002})), Some(Duration::from_millis(1_250)), s(1)),
        (jwt(serde_json::json!({"uid": "u", "exp": 1_000})), Some(s(0)), Duration::from_millis(500)),
        (jwt(serde_json::json!({"uid": "u", "exp": 900})), Some(s(0)), Duration::from_millis(500)),
        (jwt(serde_json::json!({"uid": "u"})), None, s(10 * 365 * 24 * 3600)),
        ("opaque-token".to_string(), None, s(10 * 365 * 24 * 3600)),
    ];
    for (token, life, renew) in cases {
        assert_eq!(
            token_life(&token, Duration::from_millis(1_000_750)),
            life,
            "{token}"
        );
        assert_eq!(renew_after(life), renew, "{token}");
    }
}

/// A fake ACS and a master behind it: logins verified with the account's public key, tokens
/// (JWTs with `exp`) living `life` seconds; the master answers 401 `acsjwt` to anything but a
/// live token.
#[derive(Clone)]
struct Fake {
    public: Arc<Vec<u8>>,
    life: u64,
    logins: Arc<AtomicU64>,
    bad_logins: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    live: Arc<Mutex<Vec<(String, u64)>>>,
}

impl Fake {
    /// What it counted: `[logins, bad logins, refused requests]`.
    fn counts(&self) -> [u64; 3] {
        [&self.logins, &self.bad_logins, &self.refused].map(|c| c.load(Ordering::SeqCst))
    }
}

async fn login(State(f): State<Fake>, Json(body): Json<Value>) -> Response {
    // Slow enough that concurrent requests pile up behind one login.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let claims = body["token"].as_str().and_then(|t| verify(t, &f.public));
    let good = claims.is_some_and(|c| {
        c["uid"] == body["uid"] && c["exp"].as_u64().is_some_and(|e| e > unix_now())
    });
    if !good {
        f.bad_logins.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"description": "bad login"})),
        )
            .into_response();
    }
    let n = f.logins.fetch_add(1, Ordering::SeqCst);
    let exp = unix_now() + f.life;
    let token = format!(
        "{}.{}.fake{n}",
        B64.encode(r#"{"alg":"RS256"}"#),
        B64.encode(serde_json::json!({"uid": body["uid"], "exp": exp}).to_string())
    );
    f.live.lock().unwrap().push((token.clone(), exp));
    Json(serde_json::json!({ "token": token })).into_response()
}

async fn resource(State(f): State<Fake>, headers: HeaderMap) -> Response {
    let sent = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("token="));
    let now = unix_now();
    let ok = sent.is_some_and(|t| {
        f.live
            .lock()
            .unwrap()
            .iter()
            .any(|(l, e)| l == t && *e > now)
    });
    if ok {
        "ok".into_response()
    } else {
        f.refused.fetch_add(1, Ordering::SeqCst);
        (StatusCode::UNAUTHORIZED, [("www-authenticate", "acsjwt")]).into_response()
    }
}

async fn serve(life: u64) -> (Fake, Url) {
    let pem = key_pem(false);
    let f = Fake {
        public: Arc::new(public_der(pem)),
        life,
        logins: Arc::default(),
        bad_logins: Arc::default(),
        refused: Arc::default(),
        live: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/acs/api/v1/auth/login", post(login))
        .route("/v2/apps", get(resource))
        .with_state(f.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base: Url = format!("http://{}/", l.local_addr().unwrap())
        .parse()
        .unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (f, base)
}

/// A transport to `base` logging in with the account of key `pem`.
fn transport(base: &Url, pem: &str) -> Transport {
    let endpoint = base.join("acs/api/v1/auth/login").unwrap();
    let a = ServiceAccount::from_secret(&secret(pem, endpoint.as_str())).unwrap();
    Transport::new(
        "--marathon",
        vec![base.clone()],
        Auth::ServiceAccount(a),
        Duration::from_secs(5),
        true,
        None,
    )
    .unwrap()
}

async fn get_apps(t: &Transport, base: &Url) -> StatusCode {
    let url = base.join("v2/apps").unwrap();
    let rb = t.request(reqwest::Method::GET, url.clone(), false);
    t.send(&url, rb).await.unwrap().status()
}

/// `n` concurrent [`get_apps`], each of which must succeed.
async fn get_apps_concurrently(t: &Transport, base: &Url, n: usize) {
    let all = futures::future::join_all((0..n).map(|_| get_apps(t, base))).await;
    assert!(all.iter().all(|s| *s == StatusCode::OK), "{all:?}");
}

#[tokio::test]
async fn concurrent_requests_share_one_login() {
    let (f, base) = serve(3600).await;
    let t = transport(&base, key_pem(false));
    get_apps_concurrently(&t, &base, 20).await;
    assert_eq!(f.logins.load(Ordering::SeqCst), 1);
    // Clones share the login too.
    assert_eq!(get_apps(&t.clone(), &base).await, StatusCode::OK);
    assert_eq!(f.counts(), [1, 0, 0], "logins, bad logins, refused");
}

#[tokio::test]
async fn a_refused_token_means_one_new_login_and_one_retry() {
    let (f, base) = serve(3600).await;
    let t = transport(&base, key_pem(false));
    assert_eq!(get_apps(&t, &base).await, StatusCode::OK);
    // The master forgets every token (an ACS restart, a revocation).
    f.live.lock().unwrap().clear();
    get_apps_concurrently(&t, &base, 10).await;
    // Ten refusals, one new login between them.
    assert_eq!(f.counts(), [2, 0, 10], "logins, bad logins, refused");
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    // Tokens live 2 s (exp in whole seconds: 1-2 s left at login); renewal at 80%.
    let (f, base) = serve(2).await;
    let t = transport(&base, key_pem(false));
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        assert_eq!(get_apps(&t, &base).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logins = f.logins.load(Ordering::SeqCst);
    assert!((3..=8).contains(&logins), "{logins} logins in 5 s");
    assert_eq!(
        f.refused.load(Ordering::SeqCst),
        0,
        "a request carried an expired token"
    );
    assert_eq!(f.bad_logins.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_refused_login_is_an_error_without_secrets() {
    let (f, base) = serve(3600).await;
    // Signed with another key than the one the ACS knows.
    let t = transport(&base, key_pem(true));
    let url = base.join("v2/apps").unwrap();
    let e = t
        .send(&url, t.request(reqwest::Method::GET, url.clone(), false))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "login");
    let shown = format!("{e} {e:?}");
    assert!(
        shown.contains("refused: HTTP 401 Unauthorized: bad login"),
        "{shown}"
    );
    assert!(
        !shown.contains("eyJ") && !shown.contains("PRIVATE"),
        "{shown}"
    );
    assert_eq!(f.bad_logins.load(Ordering::SeqCst), 1);
    assert_eq!(
        f.refused.load(Ordering::SeqCst),
        0,
        "no request went without a token"
    );
}
