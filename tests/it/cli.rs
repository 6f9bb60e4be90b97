//! Black-box tests of the real `l4lb` binary: `check`, `controller` on port 0 against a fake
//! Marathon, exit codes.

use crate::common::marathon;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::process::Proc;
use crate::common::{BIN, check_ok, get_json, get_text};
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/apps.json");

/// Start `l4lb args…` and wait for its "API listening" log line; return the API address.
fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    let p = Proc::spawn("l4lb", cmd);
    let addr = p.log().addr("API listening", Duration::from_secs(20));
    (p, addr)
}

#[test]
fn check_prints_the_table_and_fails_on_rejected_labels() {
    let vips = check_ok(&["--apps-file", EXAMPLE]);
    let names: Vec<&str> = vips
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vip"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "198.18.5.5:80",
            "echo.marathon.l4lb.thisdcos.directory:5000",
            "hello.marathon.l4lb.thisdcos.directory:80"
        ]
    );

    // Every flag is also L4LB_<FLAG>.
    let out = Command::new(BIN)
        .arg("check")
        .env("L4LB_APPS_FILE", EXAMPLE)
        .env("L4LB_FRAMEWORK", "svc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let vips: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vips[2]["vip"], "hello.svc.l4lb.thisdcos.directory:80");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("apps.json");
    let mut app = marathon::host_app("/bad", &["/fine:80", "web:70000", "127.0.0.1:80"], "tcp");
    marathon::add_task(
        &mut app,
        marathon::task(
            "/bad",
            0,
            "198.18.0.1",
            &[31000, 31001, 31002],
            "TASK_RUNNING",
        ),
    );
    std::fs::write(&bad, serde_json::json!({ "apps": [app] }).to_string()).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--apps-file", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[bad_port]") && err.contains("[loopback]"),
        "{err}"
    );
    let vips: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vips.as_array().unwrap().len(), 1);
}

/// Every bad flag or combination of `run` is refused (exit 64, one line on stderr) before
/// anything exists on the host: in a fresh namespace, no link, no ARP sysctl changed, no
/// socket bound. Each case is valid but for one flag, which the old order caught only after
/// creating the interface.
#[test]
fn bad_flags_touch_nothing_on_the_host() {
    skip_unless_root!();
    let ns = crate::common::netns::NetNs::new("badflag");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.to_str().unwrap().to_string();
    let base = [
        "run",
        "--apps-file",
        EXAMPLE,
        "--vip-cidr",
        "198.18.128.0/17",
        "--api-listen",
        "127.0.0.1:0",
        "--dns-listen",
        "127.0.0.1:0",
    ];
    let sysctls = || {
        ns.exec_ok(&[
            "sysctl",
            "-n",
            "net.ipv4.conf.all.arp_ignore",
            "net.ipv4.conf.all.arp_announce",
        ])
        .stdout
    };
    let before = sysctls();
    for bad in [
        vec!["--zone", "not a zone!"],
        vec!["--interface", "a/b"],
        vec!["--interface", "much-too-long-for-a-link"],
        vec!["--connect-timeout", "0s"],
        vec!["--max-connections", "0"],
        vec![
            "--dns-listen",
            "127.0.0.1:5454",
            "--dns-upstream",
            "127.0.0.1:5454",
        ],
        vec!["--api-token-file", &empty],
        vec!["--api-token-file", "/nonexistent/token"],
        vec!["--marathon-auth", "basic"],
        vec!["--interface-kind", "veth"],
        vec!["--framework", ""],
    ] {
        let mut cmd = ns.command(BIN);
        cmd.args(base).args(&bad);
        let mut p = Proc::spawn("l4lb run", cmd);
        let status = p.exit_within(Duration::from_secs(10));
        let err = p.log_text();
        assert_eq!(status.and_then(|s| s.code()), Some(64), "{bad:?}: {err}");
        assert!(!err.trim().is_empty(), "{bad:?}: no error printed");
        let links = String::from_utf8_lossy(&ns.exec_ok(&["ip", "-o", "link"]).stdout).to_string();
        assert!(
            !links.contains("minuteman"),
            "{bad:?} created the link: {links}"
        );
        assert_eq!(sysctls(), before, "{bad:?} changed the ARP sysctls");
        let socks = String::from_utf8_lossy(&ns.exec_ok(&["ss", "-Htanu"]).stdout).to_string();
        assert!(socks.trim().is_empty(), "{bad:?} left sockets: {socks}");
    }
    // The same flags without the bad one do start (so the cases above fail for their flag).
    let mut cmd = ns.command(BIN);
    cmd.args(base);
    let p = Proc::spawn("l4lb run", cmd);
    p.log()
        .wait_for("first table applied", Duration::from_secs(20));
    let links = String::from_utf8_lossy(&ns.exec_ok(&["ip", "-o", "link"]).stdout).to_string();
    assert!(links.contains("minuteman"), "{links}");
}

#[test]
fn bad_configuration_exits_64() {
    for args in [
        vec!["controller"],
        vec!["controller", "--marathon", "not a url"],
        vec![
            "controller",
            "--apps-file",
            "x",
            "--vip-cidr",
            "300.0.0.0/8",
        ],
        vec!["nonsense"],
        vec!["--worker-threads", "0", "check", "--apps-file", "x"],
        // Managing resolv.conf needs a port-53 listen address to point it at.
        vec![
            "run",
            "--apps-file",
            "Cargo.toml",
            "--interface-kind",
            "none",
            "--api-listen",
            "127.0.0.1:0",
            "--dns-manage-resolv-conf",
            "--dns-resolv-conf",
            "/nonexistent/resolv.conf",
        ],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        if args.contains(&"--dns-manage-resolv-conf") {
            assert!(stderr.contains("port 53"), "{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_binary_serves_marathon_vips_and_stops_on_sigterm() {
    l4lb::tls::init();
    let fake = marathon::FakeMarathon::start().await;
    let mut app = marathon::host_app("/web", &["/web:80"], "tcp");
    marathon::add_task(
        &mut app,
        marathon::task("/web", 0, "198.18.0.1", &[31000], "TASK_RUNNING"),
    );
    fake.put_app(app);
    let url = fake.url();
    let (mut proc, api) = tokio::task::spawn_blocking(move || {
        start(&[
            "controller",
            "--marathon",
            &url,
            "--api-listen",
            "127.0.0.1:0",
            "--vip-cidr",
            "198.18.128.0/17",
        ])
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get(format!("http://{api}/ready"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vips: serde_json::Value = get_json(&format!("http://{api}/v1/vips")).await;
    assert_eq!(vips[0]["vip"], "web.marathon.l4lb.thisdcos.directory:80");
    assert_eq!(vips[0]["backend"][0]["port"], 31000);
    let m = get_text(&format!("http://{api}/metrics")).await;
    assert!(m.contains("l4lb_vips 1"), "{m}");
    assert!(
        m.contains("l4lb_marathon_requests_total{kind=\"apps\",outcome=\"ok\"}"),
        "{m}"
    );

    // `l4lb vips` renders the same table for people.
    let out = Command::new(BIN)
        .args(["vips", "--api", &format!("http://{api}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("web.marathon.l4lb.thisdcos.directory:80")
            && text.contains("198.18.0.1:31000"),
        "{text}"
    );

    proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_guards_the_api_and_an_agent_follows_with_it() {
    l4lb::tls::init();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, " \n").unwrap();
    let apps = dir.path().join("apps.json");
    let mut app = marathon::host_app("/web", &["/web:80"], "tcp");
    marathon::add_task(
        &mut app,
        marathon::task("/web", 0, "127.0.0.1", &[31000], "TASK_RUNNING"),
    );
    std::fs::write(&apps, serde_json::json!({ "apps": [app] }).to_string()).unwrap();
    let (apps, token, empty) = (
        apps.to_str().unwrap().to_string(),
        token.to_str().unwrap().to_string(),
        empty.to_str().unwrap().to_string(),
    );

    // An empty token file is a configuration error, not an API anyone can open.
    let out = Command::new(BIN)
        .args([
            "controller",
            "--apps-file",
            &apps,
            "--api-token-file",
            &empty,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (args_apps, args_token) = (apps.clone(), token.clone());
    let (_ctl, api) = tokio::task::spawn_blocking(move || {
        start(&[
            "controller",
            "--apps-file",
            &args_apps,
            "--api-listen",
            "127.0.0.1:0",
            "--api-token-file",
            &args_token,
            "--vip-cidr",
            "127.128.0.0/16",
        ])
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let get = |path: &str, auth: Option<&str>| {
        let mut rb = client.get(format!("http://{api}{path}"));
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        async move { rb.send().await.unwrap().status().as_u16() }
    };
    // Health and readiness stay open for probes; the table and metrics do not.
    assert_eq!(get("/healthz", None).await, 200);
    for path in ["/v1/vips", "/v1/vips/delta?index=0", "/metrics"] {
        assert_eq!(get(path, None).await, 401, "{path} without a token");
        assert_eq!(get(path, Some("Bearer wrong")).await, 401, "{path}");
        assert_eq!(get(path, Some("Basic s3cret-token")).await, 401, "{path}");
        assert_eq!(get(path, Some("Bearer s3cret-token")).await, 200, "{path}");
        // The scheme name is case-insensitive (RFC 7235).
        assert_eq!(get(path, Some("bearer s3cret-token")).await, 200, "{path}");
    }

    // `l4lb vips` sends the token from its file.
    let out = Command::new(BIN)
        .args([
            "vips",
            "--api",
            &format!("http://{api}"),
            "--api-token-file",
            &token,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("web.marathon.l4lb.thisdcos.directory:80")
    );

    // An agent given the same file follows the controller (and guards its own API with it).
    let ctl_url = format!("http://{api}");
    let (_agent, agent_api) = tokio::task::spawn_blocking(move || {
        let mut args = crate::common::apps::agent_args(&ctl_url);
        args.extend(["--api-token-file".to_string(), token]);
        start(&args)
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get(format!("http://{agent_api}/v1/vips"))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let vips: serde_json::Value = r.json().await.unwrap();
        if vips[0]["vip"] == "web.marathon.l4lb.thisdcos.directory:80" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never got the table: {vips}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client
        .get(format!("http://{agent_api}/v1/vips"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--log-format",
        "json",
        "controller",
        "--apps-file",
        EXAMPLE,
        "--api-listen",
        "127.0.0.1:0",
    ]);
    let proc = Proc::spawn("l4lb controller", cmd);
    let log = proc.log();
    log.wait_for("API listening", Duration::from_secs(20));
    let text = log.text();
    let mut api_line = false;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        let msg = v["fields"]["message"].as_str().unwrap_or_default();
        if msg.contains("API listening") {
            assert!(
                v["fields"]["addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:")),
                "{line}"
            );
            api_line = true;
        }
    }
    assert!(api_line, "no API line in {text}");
}

/// The README's first command, as a new user runs it: `scripts/demo.sh` (in a namespace of
/// its own) against the binary under test, three times in a row, each ending 0 with every
/// curl answered (`curl -f` inside the script) and the UDP VIP answering.
#[test]
fn the_demo_runs_clean() {
    skip_unless_root!();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh");
    for run in 1..=3 {
        let out = Command::new(script)
            .env("L4LB_BIN", BIN)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "run {run}: {}\n{text}\n{err}",
            out.status
        );
        for want in [
            "hello from task",
            "udp task",
            "VIP table version",
            "scale /hello",
        ] {
            assert!(text.contains(want), "run {run}: no {want:?} in\n{text}");
        }
    }
}

/// `--data-plane bpf` where the programs cannot attach (here: `--cgroup` is not a cgroup) is a
/// one-line error and exit 1 (not a missing privilege); `auto` says why and serves with the
/// proxy. Run in a private mount namespace, as the agent mounts a BPF filesystem where none is.
#[test]
fn data_plane_bpf_that_cannot_load_exits_1_and_auto_falls_back() {
    skip_unless_root!();
    let agent = |plane: &str| {
        let mut cmd = Command::new("unshare");
        // An instance of its own: pins another test left at `default` would be taken over
        // (a killed agent's successor adopts them), and nothing would be attached anew.
        let instance = format!("cli-cannot-load-{}", std::process::id());
        cmd.args(["-m", "--propagation", "private", BIN])
            .args(bpf_agent_args(plane))
            .args(["--cgroup", "/proc", "--bpf-instance", &instance]);
        cmd
    };
    let out = agent("bpf").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = error_line(&err);
    assert!(
        last.starts_with("l4lb: --data-plane bpf: BPF program l4lb_connect4:"),
        "{err}"
    );

    let p = Proc::spawn("l4lb auto", agent("auto"));
    p.log()
        .wait_for("data plane chosen", Duration::from_secs(20));
    let line = p
        .log()
        .wait_for("data plane chosen", Duration::from_secs(1));
    assert!(line.contains("data_plane=\"proxy\""), "{line}");
    p.log()
        .wait_for("kernel data path unavailable", Duration::from_secs(1));
}

/// An agent's flags for `--data-plane plane` that reach the kernel path without touching the
/// host: no VIP link, DNS and API on free loopback ports, a controller nobody serves.
fn bpf_agent_args(plane: &str) -> [&str; 11] {
    [
        "agent",
        "--controller",
        "http://127.0.0.1:1",
        "--interface-kind",
        "none",
        "--dns-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--data-plane",
        plane,
    ]
}

/// `--data-plane bpf` run by a user the kernel refuses (EPERM, EACCES) is a missing privilege:
/// exit 2, one line. In a private mount namespace, as nobody, with no capabilities.
#[test]
fn data_plane_bpf_without_privilege_exits_2() {
    skip_unless_root!();
    let bpffs = tempfile::tempdir().unwrap();
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "setpriv"])
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all", BIN])
        .args(bpf_agent_args("bpf"))
        .arg("--bpffs")
        .arg(bpffs.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = error_line(&err);
    assert!(last.starts_with("l4lb: --data-plane bpf: "), "{err}");
    assert!(
        last.contains("Permission denied") || last.contains("Operation not permitted"),
        "{err}"
    );
}

/// The error line `l4lb` prints as it exits (tasks still running may log after it).
fn error_line(stderr: &str) -> &str {
    let mut errors = stderr.lines().filter(|l| l.starts_with("l4lb: "));
    let line = errors.next().unwrap_or_default();
    assert!(
        errors.next().is_none(),
        "more than one error line:\n{stderr}"
    );
    line
}
