//! `l4lb run` as a whole: unprivileged on loopback (`--interface-kind none`, VIPs in
//! 127.0.0.0/8) and as root in a network namespace (bridge fallback, addresses following the
//! table, real `curl` and `dig`, left-overs reconciled, shutdown removing addresses).

use crate::common::backends;
use crate::common::netns;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::process::{Log, Proc};
use crate::common::{BIN, get_json};
use serde_json::Value;

use crate::common::apps::{ON_LOOPBACK, agent_args, apps_json, labelled_app as app, run_args};

fn spawn_l4lb(cmd: &mut Command) -> (Proc, Log) {
    let p = Proc::spawn("l4lb", cmd);
    let log = p.log();
    (p, log)
}

async fn get(url: &str) -> Result<String, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(url)
        .send()
        .await?
        .text()
        .await
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolve `name` with the embedded DNS (hickory client over UDP).
async fn resolve(dns: SocketAddr, name: &str) -> Option<std::net::IpAddr> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    m.metadata.recursion_desired = false;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    sock.send_to(&m.to_vec().ok()?, dns).await.ok()?;
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let resp = Message::from_vec(&buf[..n]).ok()?;
    resp.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_loopback_serves_tcp_udp_dns_and_follows_the_file() {
    l4lb::tls::init();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apps.json");
    let mut web = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let (l, a) = backends::tcp_listener("127.0.0.1");
        tasks.push(backends::http(l, format!("web-{i}")));
        web.push(a);
    }
    let mut udp = Vec::new();
    for i in 0..2 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.push(s.local_addr().unwrap());
        tasks.push(backends::udp_echo(s, format!("echo-{i}")));
    }
    let vip_port = {
        let l = std::net::TcpListener::bind("127.0.0.7:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let write = |web: &[SocketAddr]| {
        let apps = vec![
            app(
                "/web",
                &["/web:80", &format!("127.0.0.7:{vip_port}")],
                "tcp",
                web,
            ),
            app("/echo", &["/echo:5000"], "udp", &udp),
        ];
        std::fs::write(&file, apps_json(apps)).unwrap();
    };
    write(&web);

    // One thread for everything (the current-thread runtime); the cluster suite runs two.
    let (mut proc, log) = spawn_l4lb(
        Command::new(BIN)
            .args(["--worker-threads", "1"])
            .args(run_args(&file, &ON_LOOPBACK))
            .args(["--shutdown-grace", "2s"]),
    );
    let api = log.addr("API listening", Duration::from_secs(20));
    let dns = log.addr("DNS listening", Duration::from_secs(20));
    wait_until("ready", Duration::from_secs(10), || async {
        reqwest::get(format!("http://{api}/ready"))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;

    // DNS gives the named VIP's address; TCP through it reaches every backend, evenly.
    let ip = resolve(dns, "web.marathon.l4lb.thisdcos.directory")
        .await
        .expect("A record");
    assert!(ip.to_string().starts_with("127.128."), "{ip}");
    let mut seen = std::collections::BTreeMap::new();
    // Sequential connections often find every backend idle, and then the pick is uniform at
    // random: with 90 of them, some backend gets fewer than 12 about once in 85,000 runs (30
    // with a floor of 5: about once in 27, and it failed here once).
    for _ in 0..90 {
        let body = get(&format!("http://{ip}:80/")).await.unwrap();
        *seen.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|n| *n >= 12), "uneven spread {seen:?}");
    // The IP VIP too.
    assert!(
        get(&format!("http://127.0.0.7:{vip_port}/"))
            .await
            .unwrap()
            .starts_with("web-")
    );

    // UDP: a client keeps its backend; replies come from the VIP address.
    let echo_ip = resolve(dns, "echo.marathon.l4lb.thisdcos.directory")
        .await
        .expect("echo A");
    let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let vip = SocketAddr::new(echo_ip, 5000);
    let mut first = None;
    for i in 0..5 {
        c.send_to(format!("ping{i}").as_bytes(), vip).await.unwrap();
        let mut buf = [0u8; 100];
        let (n, from) = tokio::time::timeout(Duration::from_secs(2), c.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, vip);
        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
        let (id, rest) = reply.split_once(':').unwrap();
        assert_eq!(rest, format!("ping{i}"));
        assert_eq!(*first.get_or_insert(id.to_string()), id);
    }

    // The agent's /v1/vips shows counters.
    let vips: Value = get_json(&format!("http://{api}/v1/vips")).await;
    let total: u64 = vips
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["backend"].as_array().unwrap().iter())
        .map(|b| b["bytes"].as_u64().unwrap())
        .sum();
    assert!(total > 0, "{vips}");
    // Metrics by their exported names, the propagation chain included (the file source stamps
    // each change; the agent observes the delay when it applies it).
    let m = get(&format!("http://{api}/metrics")).await.unwrap();
    for want in [
        "l4lb_table_version ",
        "l4lb_applied_table_version ",
        "l4lb_vips 3",
        "l4lb_vips_live 3",
        // Per VIP: web (named and IP) 3 + 3, echo 2.
        "l4lb_backends{state=\"active\"} 8",
        "l4lb_table_apply_seconds_count ",
        "l4lb_connections_total ",
        "l4lb_udp_bytes_total{direction=\"client_to_backend\"} ",
        "l4lb_dns_queries_total{",
    ] {
        assert!(m.contains(want), "no {want:?} in\n{m}");
    }
    let count = m
        .lines()
        .find_map(|l| l.strip_prefix("l4lb_propagation_delay_seconds_count "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(count >= 1, "propagation never observed:\n{m}");

    // Scale one backend away by editing the file: traffic stops going there.
    write(&web[..2]);
    wait_until("two backends", Duration::from_secs(10), || async {
        let v: Value = get_json(&format!("http://{api}/v1/vips")).await;
        v.as_array().unwrap().iter().any(|v| {
            v["vip"].as_str().unwrap().starts_with("web.")
                && v["backend"].as_array().unwrap().len() == 2
        })
    })
    .await;
    for _ in 0..20 {
        let body = get(&format!("http://{ip}:80/")).await.unwrap();
        assert_ne!(body.trim(), "web-2");
    }

    // `l4lb vips` shows the agent's table with counters.
    let out = Command::new(BIN)
        .args(["vips", "--api", &format!("http://{api}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("web.marathon.l4lb.thisdcos.directory:80") && text.contains("active"),
        "{text}"
    );

    proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || proc.exit_within(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    for t in tasks {
        t.abort();
    }
}

/// The backends of `vip` in the agent's `/v1/vips`, with the index and ETag headers.
async fn agent_vips(url: &str, vip: &str) -> (u64, String, Option<Vec<Value>>) {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200);
    let index = r.headers()["x-l4lb-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let vips: Value = r.json().await.unwrap();
    let backends = vips
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == vip)
        .map(|v| v["backend"].as_array().unwrap().clone());
    (index, etag, backends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_that_could_not_bind_is_retried_and_the_api_follows_through_the_drain() {
    l4lb::tls::init();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apps.json");
    let (l, web) = backends::tcp_listener("127.0.0.1");
    let task = backends::http(l, "web-0".to_string());
    // Something else holds the IP VIP's address and port when l4lb starts.
    let squatter = std::net::TcpListener::bind("127.0.0.8:0").unwrap();
    let vip = squatter.local_addr().unwrap();
    let labels = ["/web:80".to_string(), vip.to_string()];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    std::fs::write(&file, apps_json(vec![app("/web", &labels, "tcp", &[web])])).unwrap();
    let (mut proc, log) = spawn_l4lb(
        Command::new(BIN)
            .args(run_args(&file, &ON_LOOPBACK))
            .args(["--shutdown-grace", "10s"]),
    );
    let api = log.addr("API listening", Duration::from_secs(20));
    let url = format!("http://{api}/v1/vips");
    wait_until("ready", Duration::from_secs(10), || async {
        reqwest::get(format!("http://{api}/ready"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let vip_s = vip.to_string();
    let (index, etag, backends) = agent_vips(&url, &vip_s).await;
    assert!(
        backends.is_none(),
        "a VIP that could not bind is not served"
    );

    // A watcher blocked on that version wakes when the retry binds it, at the same version.
    let watch = format!("{url}?index={index}&wait=20s");
    let watcher = tokio::spawn(async move {
        let t = Instant::now();
        let got = agent_vips(&watch, &vip.to_string()).await;
        (t.elapsed(), got)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(squatter);
    let (took, (index2, _, backends)) = watcher.await.unwrap();
    assert_eq!(index2, index);
    assert!(backends.is_some(), "the watcher did not see the VIP bound");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The old tag is stale; the new one holds while nothing changes.
    let client = reqwest::Client::new();
    let status = |tag: String| {
        let r = client.get(&url).header("if-none-match", tag);
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(etag).await, 200);
    let (_, etag2, _) = agent_vips(&url, &vip_s).await;
    assert_eq!(status(etag2).await, 304);

    assert!(
        get(&format!("http://{vip}/"))
            .await
            .unwrap()
            .starts_with("web-0")
    );
    // One connection held open: counted by the API, during the drain too.
    let held = tokio::net::TcpStream::connect(vip).await.unwrap();
    let connections = |url: String, vip: String| async move {
        let (_, _, b) = agent_vips(&url, &vip).await;
        b.and_then(|b| b[0]["connections"].as_u64())
    };
    wait_until("one connection", Duration::from_secs(5), || {
        let f = connections(url.clone(), vip_s.clone());
        async move { f.await == Some(1) }
    })
    .await;
    proc.signal(nix::sys::signal::Signal::SIGTERM);
    wait_until("not ready", Duration::from_secs(5), || async {
        reqwest::get(format!("http://{api}/ready"))
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    assert_eq!(connections(url.clone(), vip_s.clone()).await, Some(1));
    assert!(
        tokio::net::TcpStream::connect(vip).await.is_err(),
        "still accepting while draining"
    );
    drop(held);
    let status = tokio::task::spawn_blocking(move || proc.exit_within(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_vips_no_listener_may_take_whatever_the_controller_sends() {
    use l4lb::api::{self, ApiState, Readiness};
    l4lb::tls::init();
    let (l, web) = backends::tcp_listener("127.0.0.1");
    let task = backends::http(l, "web-0".to_string());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A controller gone wrong: next to a sound VIP, one on the wildcard address (it would
    // take the port on every address of the host) and one on port 0.
    let vip = |ip: &str, port: u16| {
        serde_json::json!({"vip": format!("{ip}:{port}"), "protocol": "tcp", "name": null,
            "ip": ip, "port": port,
            "backend": [{"ip": web.ip(), "port": web.port(), "state": "active"}]})
    };
    let vips: Vec<l4lb::model::wire::VipJson> = serde_json::from_value(serde_json::json!([
        vip("127.0.0.9", port),
        vip("0.0.0.0", port),
        vip("127.0.0.10", 0),
    ]))
    .unwrap();
    let table = l4lb::model::wire::table_from_json(7, vips);
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(table));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ctl = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let state = ApiState::new(
        rx,
        std::sync::Arc::new(prometheus_client::registry::Registry::default()),
        Readiness::default(),
    );
    tokio::spawn(api::serve(listener, state, stop.clone()));

    let (_agent, log) = spawn_l4lb(Command::new(BIN).args(agent_args(&format!("http://{ctl}"))));
    let api = log.addr("API listening", Duration::from_secs(20));
    log.wait_for("first table applied", Duration::from_secs(20));
    let url = format!("http://{api}/v1/vips");
    let (_, _, sound) = agent_vips(&url, &format!("127.0.0.9:{port}")).await;
    assert!(sound.is_some());
    for bad in [format!("0.0.0.0:{port}"), "127.0.0.10:0".to_string()] {
        assert!(agent_vips(&url, &bad).await.2.is_none(), "{bad} served");
    }
    // Nothing took the port on the other loopback addresses.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
    assert!(
        get(&format!("http://127.0.0.9:{port}/"))
            .await
            .unwrap()
            .starts_with("web-0")
    );
    let m = get(&format!("http://{api}/metrics")).await.unwrap();
    for reason in ["unspecified", "bad_port"] {
        let line = format!("l4lb_label_errors_total{{reason=\"{reason}\"}} 1");
        assert!(m.contains(&line), "no {line} in\n{m}");
    }
    stop.cancel();
    task.abort();
}

fn addrs_on(ns: &netns::NetNs, dev: &str) -> String {
    String::from_utf8_lossy(&ns.exec(&["ip", "-o", "addr", "show", "dev", dev]).stdout).to_string()
}

#[test]
fn root_run_in_a_namespace_installs_follows_and_removes_vip_addresses() {
    skip_unless_root!();
    let ns = netns::NetNs::new("agent");
    // Left-overs of a previous run: the link exists with a stale VIP on it.
    ns.exec_ok(&["ip", "link", "add", "minuteman", "type", "bridge"]);
    ns.exec_ok(&["ip", "addr", "add", "198.18.200.200/32", "dev", "minuteman"]);
    ns.exec_ok(&["ip", "link", "add", "eth0", "type", "bridge"]);
    ns.exec_ok(&["ip", "addr", "add", "198.18.0.1/15", "dev", "eth0"]);
    // A second address of this host that no task uses: only the agent can know to refuse it.
    ns.exec_ok(&["ip", "addr", "add", "198.18.0.9/15", "dev", "eth0"]);
    ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    // Backends listen inside the namespace on the host address.
    let listeners: Vec<std::net::TcpListener> = ns.run(|| async {
        (0..2)
            .map(|_| std::net::TcpListener::bind("198.18.0.1:0").unwrap())
            .collect()
    });
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let _guard = rt.enter();
    let servers: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| backends::http(l, format!("task-{i}")))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apps.json");
    let write = |with_ip_vip: bool| {
        let labels: Vec<&str> = if with_ip_vip {
            // 198.18.0.9 is this host's: refused here, though the controller cannot know.
            vec!["/web:80", "198.18.5.5:80", "198.18.0.9:80"]
        } else {
            vec!["/web:80"]
        };
        std::fs::write(&file, apps_json(vec![app("/web", &labels, "tcp", &addrs)])).unwrap();
    };
    write(true);
    let mut cmd = ns.command(BIN);
    cmd.args([
        "run",
        "--apps-file",
        file.to_str().unwrap(),
        "--apps-file-poll",
        "50ms",
        "--vip-cidr",
        "198.18.128.0/17",
        "--api-listen",
        "127.0.0.1:0",
        "--dns-listen",
        "127.0.0.1:5454",
        "--shutdown-grace",
        "1s",
    ]);
    let (mut proc, log) = spawn_l4lb(&mut cmd);
    log.wait_for("first table applied", Duration::from_secs(20));
    assert!(log.text().contains("kind=\"bridge\""), "{}", log.text());

    let on = addrs_on(&ns, "minuteman");
    assert!(
        !on.contains("198.18.200.200"),
        "left-over not reconciled: {on}"
    );
    assert!(on.contains("198.18.5.5/32"), "{on}");
    assert!(!on.contains("198.18.0.9"), "{on}");
    let api = log.addr("API listening", Duration::from_secs(1));
    let metrics = ns.exec_ok(&["curl", "-sS", &format!("http://{api}/metrics")]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("l4lb_label_errors_total{reason=\"host_address\"} 1"),
        "{metrics}"
    );
    // The real dig resolves the named VIP to an address on the interface; curl reaches it.
    let vip_ip = ns
        .dig_short(5454, "web.marathon.l4lb.thisdcos.directory", "A")
        .join("\n");
    assert!(
        vip_ip.starts_with("198.18.1") || vip_ip.starts_with("198.18.2"),
        "{vip_ip:?}"
    );
    assert!(on.contains(&format!("{vip_ip}/32")), "{on}");
    let mut seen = std::collections::BTreeSet::new();
    for url in [
        format!("http://{vip_ip}/"),
        "http://198.18.5.5/".to_string(),
    ] {
        for _ in 0..10 {
            let out = ns.exec_ok(&["curl", "-sS", "--max-time", "3", &url]);
            seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // The IP VIP leaves the table: its address leaves the interface, the named one stays.
    write(false);
    let t = Instant::now();
    while addrs_on(&ns, "minuteman").contains("198.18.5.5/32") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "IP VIP address not removed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(addrs_on(&ns, "minuteman").contains(&vip_ip));
    let out = ns.exec(&["curl", "-sS", "--max-time", "2", "http://198.18.5.5/"]);
    assert!(!out.status.success(), "removed IP VIP still answers");

    // SIGTERM: exit 0 and the VIP addresses are gone.
    proc.stop_cleanly(Duration::from_secs(10));
    let on = addrs_on(&ns, "minuteman");
    assert!(
        !on.contains("198.18."),
        "addresses left after shutdown: {on}"
    );
    for s in servers {
        s.abort();
    }
}

#[test]
fn missing_cap_net_admin_is_a_one_line_error_and_exit_2() {
    skip_unless_root!();
    if Command::new("capsh").arg("--version").output().is_err() {
        eprintln!("note: capsh not installed; skipping");
        return;
    }
    let ns = netns::NetNs::new("nocap");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apps.json");
    std::fs::write(&file, apps_json(vec![])).unwrap();
    let cmdline = format!(
        "{BIN} run --apps-file {} --api-listen 127.0.0.1:0 --dns-listen 127.0.0.1:0",
        file.display()
    );
    let out = ns
        .command("capsh")
        .args(["--drop=cap_net_admin", "--", "-c", &cmdline])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("CAP_NET_ADMIN"), "{err}");
}
