//! DC/OS strict mode: a service account logs in to a fake ACS that verifies its RS256 login
//! token and issues tokens that expire within seconds; fake masters refuse anything but a live
//! token (401, `WWW-Authenticate: acsjwt`), over TLS with a test CA given by `--ca-file`.
//! VIPs stay served across expiries and a revocation, with no bad login and no secret in the
//! logs or `/metrics`; a bad secret or CA file exits 64 with one line.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use l4lb::source::http::{Auth, SourceClient};
use l4lb::source::marathon::client::Client;
use l4lb::tls::CaBundle;
use serde_json::Value;

use crate::common::acs::{self, Acs};
use crate::common::ctl::Ctl;
use crate::common::marathon::{self, FakeMarathon};
use crate::common::mesos::{FakeMesos, fixture, fixture_lines};
use crate::common::process::Proc;
use crate::common::{BIN, fake};

/// The backends (`ip:port`) of the VIP `name` in a `/v1/vips` answer, sorted.
fn backends(vips: &Value, name: &str) -> Vec<String> {
    let mut out: Vec<String> = vips
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["vip"] == name)
        .flat_map(|v| v["backend"].as_array().cloned().unwrap_or_default())
        .map(|b| format!("{}:{}", b["ip"].as_str().unwrap_or("?"), b["port"]))
        .collect();
    out.sort();
    out
}

async fn vips(http: &reqwest::Client, api: std::net::SocketAddr) -> Value {
    http.get(format!("http://{api}/v1/vips"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

const WEB: &str = "web.marathon.l4lb.thisdcos.directory:80";

/// The real binary follows an https Marathon trusted through `--ca-file`, logged in as a
/// service account whose tokens live 2 s: over 4 expiries and one revocation every change is
/// served, no login is refused, no request before the revocation carried an expired token,
/// and no token or key reaches the log or `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marathon_over_tls_is_served_across_token_expiries() {
    let pki = acs::pki();
    let acs = Acs::new(2);
    let fake = acs.front(true, FakeMarathon::start_with, |m| &m.gate).await;
    let mut app = marathon::host_app("/web", &["/web:80"], "tcp");
    marathon::add_task(
        &mut app,
        marathon::task("/web", 0, "198.18.0.1", &[31000], "TASK_RUNNING"),
    );
    fake.put_app(app.clone());

    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.json");
    std::fs::write(&secret, acs::secret_at(&pki.account_pem, &fake.url())).unwrap();
    // The flag names (kept as hidden aliases of --source-*).
    let args = [
        "controller",
        "--marathon",
        &fake.url(),
        "--marathon-auth",
        "service-account",
        "--marathon-credentials-file",
        secret.to_str().unwrap(),
        "--ca-file",
        pki.ca_file.to_str().unwrap(),
        "--resync-interval",
        "1s",
        "--api-listen",
        "127.0.0.1:0",
        "--vip-cidr",
        "198.18.128.0/17",
    ]
    .map(String::from);
    let (mut proc, api) = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(BIN);
        cmd.args(&args);
        let p = Proc::spawn("l4lb controller", cmd);
        let api = p.log().addr("API listening", Duration::from_secs(20));
        (p, api)
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let wait_backends = async |want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = backends(&vips(&http, api).await, WEB);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{WEB}: {got:?}, want {want:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_backends(&["198.18.0.1:31000"]).await;

    // Four token lives, a change in each, every answer right.
    let started = Instant::now();
    let mut want = vec!["198.18.0.1:31000".to_string()];
    for n in 1..=4u16 {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let w: Vec<&str> = want.iter().map(String::as_str).collect();
            wait_backends(&w).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        marathon::add_task(
            &mut app,
            marathon::task(
                "/web",
                n as usize,
                &format!("198.18.0.{}", n + 1),
                &[31000 + n],
                "TASK_RUNNING",
            ),
        );
        fake.put_app(app.clone());
        fake.emit_status("/web", &format!("web.{n}"), "TASK_RUNNING");
        want.push(format!("198.18.0.{}:{}", n + 1, 31000 + n));
        want.sort();
    }
    let w: Vec<&str> = want.iter().map(String::as_str).collect();
    wait_backends(&w).await;
    let lived = started.elapsed();
    let logins = acs.logins();
    eprintln!(
        "{logins} logins over {lived:?} of 2 s tokens, {} Marathon requests refused",
        fake.gate.refused.load(Ordering::SeqCst)
    );
    assert!(logins >= 4, "{logins} logins in {lived:?} of 2 s tokens");
    assert_eq!(acs.bad_logins(), 0);
    assert_eq!(
        fake.gate.refused.load(Ordering::SeqCst),
        0,
        "a request carried an expired token"
    );

    // A revocation: the next request is refused, logs in again and is sent once more. The
    // token revoked is a long one, so the client cannot have renewed it first.
    acs.set_life(60);
    let before = acs.logins();
    while acs.logins() == before {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acs.revoke_all();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        fake.gate.refused.load(Ordering::SeqCst) >= 1,
        "no request was refused"
    );
    marathon::add_task(
        &mut app,
        marathon::task("/web", 9, "198.18.0.9", &[31009], "TASK_RUNNING"),
    );
    fake.put_app(app.clone());
    fake.emit_status("/web", "web.9", "TASK_RUNNING");
    want.push("198.18.0.9:31009".into());
    want.sort();
    let w: Vec<&str> = want.iter().map(String::as_str).collect();
    wait_backends(&w).await;
    assert_eq!(acs.bad_logins(), 0);

    // No token, no key in /metrics or the log.
    let metrics = http
        .get(format!("http://{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || {
        let s = proc.wait_exit(Duration::from_secs(10));
        (s, proc.log_text())
    })
    .await
    .unwrap();
    let (status, log) = status;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("service account logged in"), "{log}");
    let key_lines: Vec<&str> = pki
        .account_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for token in acs.issued() {
        let sig = token.rsplit('.').next().unwrap();
        assert!(
            !log.contains(sig) && !metrics.contains(sig),
            "a token was shown"
        );
    }
    for l in key_lines {
        assert!(
            !log.contains(l) && !metrics.contains(l),
            "the key was shown"
        );
    }
}

/// The Mesos source logs in the same way: every re-subscription after a cut carries a live
/// token, renewed as the 2 s tokens age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesos_subscribes_with_renewed_tokens() {
    let pki = acs::pki();
    let acs = Acs::new(2);
    let leader = acs.front(true, FakeMesos::start_with, |m| &m.gate).await;
    leader.set_script(fixture_lines("hello-overlay.json"));
    leader.set_state(fixture("tcp-and-udp.json"));
    let ca = CaBundle::read(&pki.ca_file).unwrap();
    let client = l4lb::source::mesos::client::Client::new_with_ca(
        vec![leader.url().parse().unwrap()],
        acs::account(&pki.account_pem, &leader.url()),
        Duration::from_secs(5),
        Some(&ca),
    )
    .unwrap();
    let mut ctl = Ctl::start(Default::default(), |p, stop| {
        l4lb::source::mesos::sync::run(
            client,
            p,
            l4lb::source::mesos::sync::SyncConfig {
                backoff_min: Duration::from_millis(20),
                backoff_max: Duration::from_millis(200),
                ..Default::default()
            },
            stop,
        )
    })
    .await;
    ctl.wait(|t| !t.vips.is_empty()).await;
    for round in 1..=3u64 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        leader.cut();
        let deadline = Instant::now() + Duration::from_secs(10);
        while leader.subscribes.load(Ordering::SeqCst) < round + 1 {
            assert!(
                Instant::now() < deadline,
                "no new SUBSCRIBE after cut {round}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(acs.logins() >= 2, "{} logins", acs.logins());
    assert_eq!(acs.bad_logins(), 0);
    assert_eq!(leader.gate.refused.load(Ordering::SeqCst), 0);
    assert!(!ctl.rx.borrow().vips.is_empty());
}

/// A login signed with a key the ACS does not know is refused, and so nothing is published:
/// the master never sees a request without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_key_gets_no_token_and_no_table() {
    let pki = acs::pki();
    let acs = Acs::new(60);
    let fake = acs
        .front(false, FakeMarathon::start_with, |m| &m.gate)
        .await;
    let client = Client::new(
        vec![fake.url().parse().unwrap()],
        acs::account(&pki.stranger_pem, &fake.url()),
        Duration::from_secs(5),
    )
    .unwrap();
    let e = client.apps().await.unwrap_err();
    assert_eq!(e.kind(), "login");
    assert!(e.to_string().contains("Login token invalid"), "{e}");
    assert_eq!(acs.bad_logins(), 1);
    assert_eq!(fake.gate.refused.load(Ordering::SeqCst), 0);
    assert_eq!(fake.apps_requests.load(Ordering::SeqCst), 0);
}

/// An https master with the cluster's own CA: refused without `--ca-file`'s roots, trusted
/// with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_file_is_what_makes_the_master_trusted() {
    let pki = acs::pki();
    let fake = FakeMarathon::start_with(
        fake::listener().await,
        axum::Router::new(),
        Some(pki.server.clone()),
    );
    fake.put_app(marathon::host_app("/web", &["/web:80"], "tcp"));
    let masters = vec![fake.url().parse().unwrap()];
    let timeout = Duration::from_secs(5);
    let plain = Client::new(masters.clone(), Auth::None, timeout).unwrap();
    let e = plain.apps().await.unwrap_err();
    assert!(
        format!("{e:#}").contains("certificate") || matches!(e.kind(), "connect" | "http"),
        "{e:#}"
    );
    assert_eq!(fake.apps_requests.load(Ordering::SeqCst), 0);
    let ca = CaBundle::read(&pki.ca_file).unwrap();
    let trusting = Client::new_with_ca(masters, Auth::None, timeout, Some(&ca)).unwrap();
    let body = trusting.apps().await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("/web"));
}

/// A bad secret or CA file exits 64 with one line naming what is wrong, and never the key.
#[test]
fn bad_secret_and_ca_files_exit_64_with_one_line() {
    let pki = acs::pki();
    let dir = tempfile::tempdir().unwrap();
    let good = serde_json::from_str::<Value>(&acs::secret_json(
        &pki.account_pem,
        "https://master.mesos/acs/api/v1/auth/login",
    ))
    .unwrap();
    let body_line = pki.account_pem.lines().nth(1).unwrap().to_string();
    let with = |name: &str, f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        let p = dir.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p.to_str().unwrap().to_string()
    };
    let ok = with("ok.json", &|_| {});
    let no_uid = with("no-uid.json", &|v| {
        v.as_object_mut().unwrap().remove("uid");
    });
    let hs256 = with("hs256.json", &|v| v["scheme"] = "HS256".into());
    let bad_key = with("bad-key.json", &|v| {
        v["private_key"] = pki.account_pem.replace(&body_line, "AAAA").into()
    });
    let not_ca = dir.path().join("not-ca.pem");
    std::fs::write(&not_ca, "hello\n").unwrap();
    let not_ca = not_ca.to_str().unwrap();
    let ca = pki.ca_file.to_str().unwrap();
    #[rustfmt::skip]
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--source-credentials-file", &no_uid], "missing field \"uid\""),
        (vec!["--source-credentials-file", &hs256], "scheme \"HS256\" is not supported"),
        (vec!["--source-credentials-file", &bad_key], "private_key is not an RSA private key"),
        (vec!["--source-credentials-file", "/nonexistent/secret.json"], "cannot read credentials file"),
        (vec![], "needs --source-credentials-file"),
        (vec!["--source-credentials-file", &ok, "--ca-file", not_ca], "no PEM certificate"),
        (vec!["--source-credentials-file", &ok, "--ca-file", "/nonexistent/ca.pem"], "cannot read /nonexistent/ca.pem"),
    ];
    for (extra, want) in cases {
        let out = Command::new(BIN)
            .args([
                "controller",
                "--mesos",
                "https://127.0.0.1:9",
                "--source-auth",
                "service-account",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .args(&extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: {stderr}");
        assert!(stderr.contains(want), "{extra:?}: {stderr} !~ {want}");
        assert!(
            !stderr.contains(&body_line) && !stderr.contains("PRIVATE"),
            "{stderr}"
        );
    }
    // The same flags with a good secret and CA get as far as starting.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "controller",
        "--mesos",
        "https://127.0.0.1:9",
        "--source-auth",
        "service-account",
        "--source-credentials-file",
        &ok,
        "--ca-file",
        ca,
        "--api-listen",
        "127.0.0.1:0",
    ]);
    let p = Proc::spawn("l4lb controller", cmd);
    p.log().addr("API listening", Duration::from_secs(20));
}
