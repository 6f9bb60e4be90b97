//! What operators look at, tested against the real binary: `/v1/label-errors` and `l4lb
//! check` saying the same thing, the status page in a real headless Chromium (driven over
//! WebDriver), the shipped Grafana dashboard and Prometheus rules naming only metrics
//! `/metrics` exports (and passing `promtool`), and the Debian package installed and its agent
//! unit started (root). Unprivileged otherwise: `--interface-kind none`, VIPs on 127.0.0.0/8.
//! Chromium, chromedriver and promtool come from Debian (`.ci/run` installs them); without
//! them these tests skip with a note, except under CI where a missing tool is a failure.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use l4lb::model::status::LabelRejection;
use serde_json::Value;

use crate::common::apps::{labelled_app, write_apps};
use crate::common::process::{Log, Proc};
use crate::common::{BIN, backends, netns};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// An app with one TCP port carrying `labels` (`VIP_0`, `VIP_1`, …) and a task per backend.
fn app(id: &str, labels: &[&str], backends: &[SocketAddr]) -> Value {
    labelled_app(id, labels, "tcp", backends)
}

/// `l4lb <args>` with its API on loopback port 0; returns it with its API address.
fn start(args: &[&str]) -> (Proc, Log, SocketAddr) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).args(["--api-listen", "127.0.0.1:0"]);
    let proc = Proc::spawn(&format!("l4lb {}", args[0]), cmd);
    let log = proc.log();
    let api = log.addr("API listening", Duration::from_secs(20));
    (proc, log, api)
}

/// `l4lb run` from an apps file, unprivileged.
/// A controller on the apps file `apps` (polled every 50 ms) whose API wants the token in
/// `token`, with `extra` flags.
fn start_controller(apps: &Path, token: &Path, extra: &[&str]) -> (Proc, Log, SocketAddr) {
    let (apps, token) = (apps.to_str().unwrap(), token.to_str().unwrap());
    let mut args = vec![
        "controller",
        "--apps-file",
        apps,
        "--apps-file-poll",
        "50ms",
    ];
    args.extend(extra);
    args.extend(["--api-token-file", token]);
    start(&args)
}

fn start_run(apps: &Path) -> (Proc, Log, SocketAddr) {
    start(&[
        "run",
        "--apps-file",
        apps.to_str().unwrap(),
        "--apps-file-poll",
        "50ms",
        "--interface-kind",
        "none",
        "--allow-loopback-vips",
        "--vip-cidr",
        "127.128.0.0/16",
        "--dns-listen",
        "127.0.0.1:0",
        "--shutdown-grace",
        "1s",
    ])
}

/// A runtime for the backends and the HTTP client (the tests themselves are plain threads,
/// as Chromium and promtool are blocking processes).
fn runtime() -> tokio::runtime::Runtime {
    l4lb::tls::init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An HTTP answer: status, content-security-policy header, body.
struct Answer {
    status: u16,
    csp: String,
    body: String,
}

/// `GET url` (with a bearer token if given); `None` when it cannot connect.
fn get(rt: &tokio::runtime::Runtime, url: &str, token: Option<&str>) -> Option<Answer> {
    rt.block_on(async {
        let mut rb = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?
            .get(url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let r = rb.send().await.ok()?;
        let status = r.status().as_u16();
        let csp = r
            .headers()
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = r.text().await.ok()?;
        Some(Answer { status, csp, body })
    })
}

fn ok_body(rt: &tokio::runtime::Runtime, url: &str, token: Option<&str>) -> Option<String> {
    get(rt, url, token)
        .filter(|a| a.status == 200)
        .map(|a| a.body)
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A free port on 127.0.0.9 for an IP VIP.
fn free_vip_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A tool from Debian, or `None` (a note printed) when it is missing outside CI.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing under CI (.ci/run installs it)"
        );
        eprintln!("skipped: {name} is not installed (apt-get install {name})");
    }
    found
}

fn rejected_labels(
    rt: &tokio::runtime::Runtime,
    api: SocketAddr,
    token: Option<&str>,
) -> Vec<LabelRejection> {
    let body =
        ok_body(rt, &format!("http://{api}/v1/label-errors"), token).expect("GET /v1/label-errors");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn label_errors_api_and_check_use_the_same_words_and_honour_the_token() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let apps = dir.path().join("apps.json");
    let (_l, backend) = backends::tcp_listener("127.0.0.1");
    let bad_web = app("/web", &["/web:80", "missing-port"], &[backend]);
    write_apps(
        &apps,
        vec![bad_web.clone(), app("/db", &["/db:99999"], &[backend])],
    );
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();

    let check = Command::new(BIN)
        .args(["check", "--apps-file", apps.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    let check_lines: BTreeSet<String> = String::from_utf8_lossy(&check.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix("rejected label: "))
        .map(str::to_string)
        .collect();
    assert_eq!(check_lines.len(), 2, "{check_lines:?}");

    let (_c, _log, api) = start_controller(&apps, &token, &[]);
    // The data needs the token; the page (which holds none) does not.
    wait_until("the controller's API", Duration::from_secs(10), || {
        get(&rt, &format!("http://{api}/v1/label-errors"), None).is_some_and(|a| a.status == 401)
    });
    let page = get(&rt, &format!("http://{api}/"), None).unwrap();
    assert_eq!(page.status, 200);
    assert!(page.csp.contains("connect-src 'self'"), "{}", page.csp);
    assert!(page.body.contains("<title>l4lb status</title>"));

    let mut listed = Vec::new();
    wait_until("two rejected labels", Duration::from_secs(10), || {
        listed = rejected_labels(&rt, api, Some("s3cret"));
        listed.len() == 2
    });
    let api_lines: BTreeSet<String> = listed.iter().map(ToString::to_string).collect();
    assert_eq!(
        api_lines, check_lines,
        "check and the API must say the same"
    );
    let db = listed.iter().find(|r| r.app == "/db").unwrap();
    assert_eq!(
        (
            db.port_index,
            db.key.as_str(),
            db.value.as_str(),
            db.reason.as_str()
        ),
        (0, "VIP_0", "/db:99999", "bad_port")
    );
    let web_since = listed.iter().find(|r| r.app == "/web").unwrap().since_ms;
    assert!(web_since > 0);

    // /db fixed: it leaves the list; /web's rejection keeps its first-seen time.
    write_apps(&apps, vec![bad_web, app("/db", &["/db:5432"], &[backend])]);
    wait_until("the fixed label to leave", Duration::from_secs(10), || {
        listed = rejected_labels(&rt, api, Some("s3cret"));
        listed.len() == 1
    });
    assert_eq!(listed[0].app, "/web");
    assert_eq!(listed[0].since_ms, web_since);
    let metrics = ok_body(&rt, &format!("http://{api}/metrics"), Some("s3cret")).unwrap();
    assert!(metrics.contains("l4lb_labels_rejected 1\n"), "{metrics}");
}

/// Metric names `/metrics` declares (`# TYPE`) or samples, with the sample suffixes of each
/// declared type.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_count", "_sum"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every `l4lb_*` identifier in `text`.
fn named_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("l4lb_") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        // Not the tail of a longer identifier.
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The PromQL expressions of the Grafana dashboard, Grafana's variables replaced.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(
                        e.replace("$__rate_interval", "1m")
                            .replace("$instance", ".*"),
                    );
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    out
}

#[test]
fn dashboards_and_rules_name_only_exported_metrics_and_pass_promtool() {
    let rules_path = Path::new(ROOT).join("deploy/prometheus/l4lb-rules.yml");
    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/l4lb.json")).unwrap(),
    )
    .unwrap();
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 10, "{exprs:?}");

    // A running instance with a VIP and a connection through it.
    let dir = tempfile::tempdir().unwrap();
    let apps = dir.path().join("apps.json");
    let (l, backend) = backends::tcp_listener("127.0.0.1");
    let rt = runtime();
    let _g = rt.enter();
    backends::http(l, "b0".into());
    let port = free_vip_port();
    write_apps(
        &apps,
        vec![app(
            "/web",
            &[&format!("127.0.0.9:{port}"), "bad"],
            &[backend],
        )],
    );
    let (_p, _log, api) = start_run(&apps);
    wait_until("the VIP", Duration::from_secs(10), || {
        ok_body(&rt, &format!("http://127.0.0.9:{port}/"), None).is_some()
    });
    // A broken apps file (the last good table stays) makes the source's error series exist.
    std::fs::write(&apps, "not json").unwrap();
    let mut text = String::new();
    wait_until("a source error counted", Duration::from_secs(10), || {
        text = ok_body(&rt, &format!("http://{api}/metrics"), None).unwrap_or_default();
        text.contains("l4lb_sync_errors_total{")
    });
    let exported = exported_names(&text);
    let mut named = named_metrics(&rules);
    for e in &exprs {
        named.extend(named_metrics(e));
    }
    assert!(named.len() >= 10, "{named:?}");
    let missing: Vec<_> = named.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "named in deploy/ but not exported: {missing:?}\n{text}"
    );

    let Some(promtool) = tool("promtool") else {
        return;
    };
    let ok = |file: &Path| {
        let out = Command::new(&promtool)
            .args(["check", "rules"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check rules {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&rules_path);
    // The dashboard's queries, checked by the same parser as recording rules.
    let mut rec = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rec.push_str(&format!(
            "      - record: l4lb:dashboard_{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let rec_path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&rec_path, rec).unwrap();
    ok(&rec_path);
}

/// A headless Chromium driven over WebDriver (Debian's `chromedriver`, spoken to with
/// reqwest): real time, so the page's live loop runs as in a browser on a desk, and every
/// wait has a deadline. (`chromium --dump-dom --virtual-time-budget` was tried first: with
/// the page's long-poll in flight when the budget ends it can hang for good.)
struct Browser {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: Driver,
}

/// chromedriver, killed and reaped on drop (its port is read from its stdout, which the
/// harness's `Proc` does not keep).
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Browser {
    fn start(rt: std::sync::Arc<tokio::runtime::Runtime>, driver: &Path, profile: &Path) -> Self {
        let mut child = Command::new(driver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let stdout = child.stdout.take().expect("stdout piped");
        let driver_proc = Driver(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(p) = line.split("successfully on port ").nth(1) {
                    let _ = tx.send(p.trim_end_matches('.').to_string());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("chromedriver did not say its port");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let v: Value = rt
            .block_on(async {
                http.post(format!("{base}/session"))
                    .json(&caps)
                    .send()
                    .await?
                    .json()
                    .await
            })
            .expect("new WebDriver session");
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Browser {
            rt,
            http,
            base,
            session,
            _driver: driver_proc,
        }
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let v: Value = self
            .rt
            .block_on(async {
                let mut rb = self.http.request(method, &url);
                if let Some(b) = body {
                    rb = rb.json(&b);
                }
                rb.send().await?.json().await
            })
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        if v["value"].get("error").is_some() {
            panic!("WebDriver {path}: {v}");
        }
        v["value"].clone()
    }

    fn go(&self, url: &str) {
        self.call(
            reqwest::Method::POST,
            "/url",
            Some(serde_json::json!({ "url": url })),
        );
    }

    /// Run `script` (a function body) in the page and return its result.
    fn eval(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(serde_json::json!({ "script": script, "args": [] })),
        )
    }

    fn html(&self) -> String {
        self.eval("return document.documentElement.outerHTML;")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Poll the rendered page until `ok` holds (up to 20 s); returns that page.
    fn wait_html(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let html = self.html();
            if ok(&html) {
                return html;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "page never showed {what}:\n{html}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None);
        std::fs::write(path, base64_decode(b64.as_str().unwrap_or_default())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closes Chromium; chromedriver itself is killed by its Proc.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self
            .rt
            .block_on(async { self.http.delete(&url).send().await });
    }
}

/// Standard base64 (the screenshot), without a crate for 15 lines.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Sum of the numbers in cells `<td class="n connects">N</td>` of the rendered page.
fn connects_shown(dom: &str) -> u64 {
    dom.split("<td class=\"n connects\">")
        .skip(1)
        .filter_map(|s| s.split('<').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn status_page_in_headless_chromium_shows_vips_traffic_and_rejected_labels() {
    let (Some(_), Some(driver)) = (tool("chromium"), tool("chromedriver")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let apps = dir.path().join("apps.json");
    let rt = std::sync::Arc::new(runtime());
    let _g = rt.enter();
    let mut addrs = Vec::new();
    for i in 0..2 {
        let (l, a) = backends::tcp_listener("127.0.0.1");
        backends::http(l, format!("web-{i}"));
        addrs.push(a);
    }
    let port = free_vip_port();
    let vip = format!("127.0.0.9:{port}");
    write_apps(&apps, vec![app("/web", &[&vip, "/web:notaport"], &addrs)]);
    let (_p, _log, api) = start_run(&apps);
    wait_until("ready", Duration::from_secs(10), || {
        ok_body(&rt, &format!("http://{api}/ready"), None).is_some()
    });
    let browser = Browser::start(rt.clone(), &driver, &dir.path().join("profile"));

    browser.go(&format!("http://{api}/"));
    let vip_box = format!("data-vip=\"{vip}/tcp\"");
    let before = browser.wait_html("the VIP and its backends", |h| {
        h.contains(&vip_box)
            && addrs
                .iter()
                .all(|a| h.contains(&format!("data-backend=\"{a}\"")))
    });
    assert!(before.contains("state-active"), "{before}");
    assert_eq!(connects_shown(&before), 0, "{before}");

    // Traffic while the page is open: its numbers move without a reload.
    for _ in 0..12 {
        let body = ok_body(&rt, &format!("http://{vip}/"), None).unwrap();
        assert!(body.starts_with("web-"), "{body}");
    }
    let after = browser.wait_html("12 connects", |h| connects_shown(h) == 12);
    assert!(after.contains("<b class=\"vip-ok\">12</b>"), "{after}");
    assert!(
        after.contains("id=\"role\">run (controller and agent)<"),
        "{after}"
    );
    browser.screenshot(&dir.path().join("status.png"));
    let png = std::fs::read(dir.path().join("status.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);

    // The filter box hides what does not match, and brings it back.
    let filtered = browser.eval(
        "const f = document.getElementById('filter'); f.value = 'nothing-like-it'; \
         f.dispatchEvent(new Event('input')); return document.getElementById('vips').innerHTML;",
    );
    let filtered = filtered.as_str().unwrap_or_default();
    assert!(filtered.contains("no VIP matches the filter"), "{filtered}");
    assert!(!filtered.contains("data-vip="), "{filtered}");
    browser.eval(
        "const f = document.getElementById('filter'); f.value = '127.0.0.9'; \
         f.dispatchEvent(new Event('input'));",
    );
    browser.wait_html("the VIP again", |h| h.contains(&vip_box));

    // The controller's page, behind a token given in the URL fragment, lists the rejected
    // label with its app, value and reason.
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret").unwrap();
    let (_c, _clog, capi) = start_controller(&apps, &token, &["--allow-loopback-vips"]);
    wait_until("the controller's table", Duration::from_secs(10), || {
        get(
            &rt,
            &format!("http://{capi}/v1/label-errors"),
            Some("s3cret"),
        )
        .is_some_and(|a| a.status == 200 && a.body.contains("notaport"))
    });
    browser.go(&format!("http://{capi}/#token=s3cret"));
    let dom = browser.wait_html("a rejected label", |h| {
        h.contains("<tr class=\"label-error\">") && h.contains(&vip_box)
    });
    let row = dom
        .split("<tr class=\"label-error\">")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_default();
    for want in ["/web", "VIP_1", "/web:notaport", "bad_port"] {
        assert!(row.contains(want), "{want} not in {row}");
    }
    assert!(dom.contains("id=\"role\">controller<"), "{dom}");
    // The token left the address bar (it stays in the tab's session storage).
    assert_eq!(browser.eval("return location.hash;"), Value::from(""));
    browser.screenshot(&dir.path().join("controller.png"));
}

/// Removes (purges) the package when dropped, so a failing test leaves nothing in /usr.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let out = Command::new("dpkg").args(["--purge", "l4lb"]).output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("warning: dpkg --purge l4lb failed; remove it by hand");
        }
    }
}

/// `dpkg <args>`, waiting out another dpkg/apt holding the lock (the machine is shared).
fn dpkg(args: &[&str]) -> std::process::Output {
    let t = Instant::now();
    loop {
        let out = Command::new("dpkg").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("lock") || t.elapsed() > Duration::from_secs(180) {
            return out;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `KEY=value` lines of an EnvironmentFile (comments and blanks skipped).
fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

#[test]
fn debian_package_installs_and_the_agent_unit_starts_with_its_defaults() {
    skip_unless_root!();
    if Command::new("dpkg")
        .args(["-s", "l4lb"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipped: an l4lb package is already installed here; not touching it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let built = Command::new(Path::new(ROOT).join("scripts/deb.sh"))
        .args(["--binary", BIN, "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_string();
    assert!(deb.ends_with(".deb"), "{deb}");

    let installed = dpkg(&["-i", &deb]);
    let _guard = Installed;
    assert!(
        installed.status.success(),
        "dpkg -i: {}",
        String::from_utf8_lossy(&installed.stderr)
    );
    for f in [
        "/usr/bin/l4lb",
        "/lib/systemd/system/l4lb-agent.service",
        "/lib/systemd/system/l4lb-controller.service",
        "/etc/default/l4lb-agent",
        "/etc/default/l4lb-controller",
        "/usr/share/l4lb/grafana/l4lb.json",
        "/usr/share/l4lb/prometheus/l4lb-rules.yml",
    ] {
        assert!(Path::new(f).is_file(), "{f} not installed");
    }
    let conffiles = String::from_utf8_lossy(&dpkg(&["-s", "l4lb"]).stdout).into_owned();
    assert!(conffiles.contains("/etc/default/l4lb-agent"), "{conffiles}");

    // What systemd would run: the unit's ExecStart with its EnvironmentFile.
    let unit = std::fs::read_to_string("/lib/systemd/system/l4lb-agent.service").unwrap();
    let exec: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .split_whitespace()
        .collect();
    assert_eq!(exec[0], "/usr/bin/l4lb");
    assert!(unit.contains("EnvironmentFile=-/etc/default/l4lb-agent"));
    let env = environment_file(&std::fs::read_to_string("/etc/default/l4lb-agent").unwrap());
    let api = env
        .iter()
        .find(|(k, _)| k == "L4LB_API_LISTEN")
        .map(|(_, v)| v.clone())
        .expect("L4LB_API_LISTEN in the defaults file");

    // In a namespace of its own: the agent creates its VIP link there, not on this host.
    let ns = netns::NetNs::new("deb");
    let bpffs = tempfile::tempdir().unwrap();
    let mut cmd = ns.command(exec[0]);
    cmd.args(&exec[1..])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        // The default data plane (auto) attaches to the cgroup2 root, which is the host's:
        // act only on this namespace's sockets, and pin into a BPF file system the agent
        // mounts in its own mount namespace (`ip netns exec` makes one), so that even a killed
        // agent's programs go with it. The clean stop below detaches them anyway.
        .env("L4LB_BPF_NETNS_ONLY", "true")
        .env("L4LB_BPFFS", bpffs.path());
    let mut agent = Proc::spawn("packaged agent", cmd);
    let log = agent.log();
    // --log-format json: the address is a field.
    log.wait_for("API listening", Duration::from_secs(20));
    let mut health = String::new();
    wait_until("the agent's /healthz", Duration::from_secs(10), || {
        let out = ns.exec(&["curl", "-sf", &format!("http://{api}/healthz")]);
        health = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success()
    });
    assert_eq!(health.trim(), "ok");
    let page = ns.exec_ok(&["curl", "-sf", &format!("http://{api}/")]);
    assert!(String::from_utf8_lossy(&page.stdout).contains("<title>l4lb status</title>"));
    // The VIP link named by the defaults (minuteman) exists in the namespace.
    ns.exec_ok(&["ip", "link", "show", "minuteman"]);
    agent.stop_cleanly(Duration::from_secs(20));
}
