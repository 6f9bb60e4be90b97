//! End-to-end tests of a whole cluster (root only): real `l4lb controller` and `l4lb agent`
//! processes in network namespaces joined by a bridge, a fake Marathon, real clients (`dig`,
//! `curl`, sockets inside the namespaces) and backends reached at their host address and port
//! as Marathon tasks are. Every address is in 198.18.0.0/15. See `common/cluster.rs`.

use crate::common::marathon;

use crate::common::cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cluster::{
    Cluster, ClusterSpec, ZONE, app, backend_set, echo_line, find_vip, median_worst, task_id,
    wait_for,
};
use marathon::Fault;
use nix::sys::signal::Signal;
use serde_json::json;

const SEC: Duration = Duration::from_secs(1);

fn named(label: &str, port: u16) -> String {
    format!("{label}.{ZONE}:{port}")
}

/// Scenario 1: Every host resolves the named VIP and reaches every backend across hosts, through the
/// named VIP and an IP VIP; a backend's own host reaches its own service (hairpin).
/// Whether this run tests the kernel path (`L4LB_TEST_DATA_PLANE=bpf`), where a scenario about
/// a proxy-only behaviour does not apply: say so and skip it.
fn proxy_only(why: &str) -> bool {
    let bpf = cluster::kernel_path();
    if bpf {
        eprintln!("note: proxy-only scenario skipped with the kernel path: {why}");
    }
    bpf
}

#[test]
fn s01_every_host_resolves_and_reaches_every_backend() {
    skip_unless_root!();
    let mut c = Cluster::start("s01", ClusterSpec::new(3, 1));
    // Real processes as backends: two on host 1, one on hosts 2 and 3.
    let placement = [(0usize, 31001u16), (0, 31002), (1, 31001), (2, 31001)];
    let mut tasks = Vec::new();
    let mut names = BTreeSet::new();
    let mut want = Vec::new();
    for (h, port) in placement {
        let name = format!("host{}-port{port}", h + 1);
        let p = c.socat_backend(h, port, &name);
        c.keep(p);
        names.insert(name);
        tasks.push((c.next_task_no(), c.hosts[h].ip, port, "TASK_RUNNING"));
        want.push((SocketAddr::from((c.hosts[h].ip, port)), "active"));
    }
    c.deploy(app("/web", &["/web:80"], "tcp", &tasks));
    c.deploy(app("/ipweb", &["198.18.5.5:80"], "tcp", &tasks));
    let web = named("web", 80);
    c.wait_backends(&web, &want);
    c.wait_backends("198.18.5.5:80", &want);
    let vip = c.vip_addr(0, &web);

    for h in 0..3 {
        let ips = c.dig(h, &format!("web.{ZONE}"));
        assert_eq!(ips, vec![vip.ip()], "dig on host {}", h + 1);
        for target in [vip, "198.18.5.5:80".parse().unwrap()] {
            let mut seen = BTreeMap::<String, usize>::new();
            for _ in 0..30 {
                let body = c
                    .curl(h, target)
                    .unwrap_or_else(|e| panic!("host {}: {e}", h + 1));
                *seen.entry(body).or_default() += 1;
            }
            println!("host {} -> {target}: {seen:?}", h + 1);
            let got: BTreeSet<String> = seen.keys().cloned().collect();
            assert_eq!(got, names, "host {} via {target}", h + 1);
        }
    }
    // Hairpin, explicitly: host 2's only backend reached from host 2 through the VIP.
    let own = "host2-port31001";
    let hit = (0..60).any(|_| c.curl(1, vip).as_deref() == Ok(own));
    assert!(hit, "host 2 never reached its own backend through the VIP");
}

/// Scenario 2: Scale up/down by Marathon events; measure event -> first connection served by the new
/// backend (and event -> removed backend gone from the agent).
#[test]
fn s02_scale_by_event_delay() {
    skip_unless_root!();
    let c = Cluster::start("s02", ClusterSpec::new(3, 1));
    let id = "/scale";
    let vip = named("scale", 80);
    let mut current = c.tcp_backend(1, "gen0");
    let mut cur_no = c.next_task_no();
    let task_of =
        |b: &cluster::Backend, no: usize| (no, c.hosts[b.host].ip, b.port(), "TASK_RUNNING");
    c.deploy(app(id, &["/scale:80"], "tcp", &[task_of(&current, cur_no)]));
    c.wait_backends(&vip, &[(current.addr, "active")]);
    let addr = c.vip_addr(2, &vip);
    let client = c.hosts[2].name().to_string();

    let mut ups = Vec::new();
    let mut downs = Vec::new();
    for round in 1..=20usize {
        // Up: a new backend on host 1 or 2.
        let name = format!("gen{round}");
        let new = c.tcp_backend(round % 2, &name);
        let new_no = c.next_task_no();
        c.marathon.put_app(app(
            id,
            &["/scale:80"],
            "tcp",
            &[task_of(&current, cur_no), task_of(&new, new_no)],
        ));
        let t0 = Instant::now();
        c.marathon
            .emit_status(id, &task_id(id, new_no), "TASK_RUNNING");
        let delay = cluster::in_ns(&client, || {
            let start = Instant::now();
            loop {
                match cluster::http_get(addr, "/") {
                    Ok((200, b)) if b.trim() == name => return Ok(t0.elapsed()),
                    Ok((200, _)) => {}
                    other => return Err(format!("request failed during scale-up: {other:?}")),
                }
                if start.elapsed() > Duration::from_secs(20) {
                    return Err("new backend never served".to_string());
                }
            }
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        ups.push(delay);

        // Down: the old backend's task goes away.
        c.marathon
            .put_app(app(id, &["/scale:80"], "tcp", &[task_of(&new, new_no)]));
        let t0 = Instant::now();
        c.marathon
            .emit_status(id, &task_id(id, cur_no), "TASK_KILLED");
        c.wait_backends(&vip, &[(new.addr, "active")]);
        downs.push(t0.elapsed());
        let before = current.served.load(Ordering::SeqCst);
        for _ in 0..10 {
            assert_eq!(
                c.get(2, addr).as_deref(),
                Ok(name.as_str()),
                "round {round}"
            );
        }
        assert_eq!(
            current.served.load(Ordering::SeqCst),
            before,
            "removed backend still served"
        );
        current.stop();
        current = new;
        cur_no = new_no;
    }
    let (m, w) = median_worst(&mut ups);
    println!(
        "scale-up event -> first connection on the new backend: n={} median={m:?} worst={w:?}",
        ups.len()
    );
    println!("all up samples: {ups:?}");
    let (dm, dw) = median_worst(&mut downs);
    println!(
        "scale-down event -> backend gone on every agent: n={} median={dm:?} worst={dw:?}",
        downs.len()
    );
    assert!(w < Duration::from_secs(5), "worst scale-up delay {w:?}");
}

/// Scenario 3: A backend SIGKILLed without Marathon knowing: clients see no failed connection.
#[test]
fn s03_killed_backend_is_invisible_to_clients() {
    skip_unless_root!();
    if proxy_only(
        "the kernel path cannot retry a client connection on another backend; a dead backend is out once a probe fails (s12 and the bpf lib tests measure that)",
    ) {
        return;
    }
    let mut c = Cluster::start("s03", ClusterSpec::new(3, 1));
    let mut procs = Vec::new();
    let mut tasks = Vec::new();
    let mut want = Vec::new();
    for h in 0..3 {
        let name = format!("host{}", h + 1);
        procs.push(c.socat_backend(h, 31000, &name));
        tasks.push((c.next_task_no(), c.hosts[h].ip, 31000, "TASK_RUNNING"));
        want.push((SocketAddr::from((c.hosts[h].ip, 31000)), "active"));
    }
    c.deploy(app("/svc", &["/svc:80"], "tcp", &tasks));
    let vip = named("svc", 80);
    c.wait_backends(&vip, &want);
    let addr = c.vip_addr(0, &vip);
    procs[1].kill();
    let mut seen = BTreeMap::<String, usize>::new();
    let start = Instant::now();
    for i in 0..100 {
        let client = i % 3;
        let body = c.curl(client, addr).unwrap_or_else(|e| {
            panic!(
                "request {i} from host {} failed after the kill: {e}",
                client + 1
            )
        });
        *seen.entry(body).or_default() += 1;
    }
    println!(
        "100 curls after SIGKILL of host2's backend in {:?}: {seen:?}",
        start.elapsed()
    );
    assert!(!seen.contains_key("host2"));
    for p in procs {
        c.keep(p);
    }
}

/// How a backend is made to drain in scenario 4.
#[derive(Clone, Copy, Debug)]
enum Drain {
    Killing,
    Unhealthy,
}

fn drain_keeps_open_connection(prefix: &str, how: Drain) {
    let c = Cluster::start(prefix, ClusterSpec::new(3, 1));
    let id = "/long";
    let a = c.tcp_backend(0, "A");
    let b = c.tcp_backend(1, "B");
    let (na, nb) = (c.next_task_no(), c.next_task_no());
    let build = |drained: Option<&str>| {
        let mut app = app(
            id,
            &["/long:7000"],
            "tcp",
            &[
                (na, c.hosts[0].ip, a.port(), "TASK_RUNNING"),
                (nb, c.hosts[1].ip, b.port(), "TASK_RUNNING"),
            ],
        );
        if matches!(how, Drain::Unhealthy) {
            app["healthChecks"] = json!([{"protocol": "TCP", "portIndex": 0, "gracePeriodSeconds": 5,
                "intervalSeconds": 10, "timeoutSeconds": 2, "maxConsecutiveFailures": 3}]);
        }
        for t in app["tasks"].as_array_mut().unwrap() {
            let is_drained = Some(t["id"].as_str().unwrap()) == drained;
            match how {
                Drain::Killing if is_drained => t["state"] = json!("TASK_KILLING"),
                Drain::Killing => {}
                Drain::Unhealthy => {
                    t["healthCheckResults"] = json!([{"alive": !is_drained, "consecutiveFailures": 0,
                        "firstSuccess": "2017-07-19T17:35:20.000Z", "lastFailure": null,
                        "lastSuccess": "2017-07-19T17:35:20.000Z", "lastFailureCause": null,
                        "instanceId": t["id"]}]);
                }
            }
        }
        app
    };
    c.deploy(build(None));
    let vip = named("long", 7000);
    c.wait_backends(&vip, &[(a.addr, "active"), (b.addr, "active")]);
    let addr = c.vip_addr(2, &vip);

    let mut conn = c.connect(2, addr).expect("connect through the VIP");
    let first = echo_line(&mut conn, "hello").expect("echo");
    let (pinned, other) = if first.starts_with("A ") {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let pinned_no = if pinned.name == "A" { na } else { nb };
    println!(
        "long-lived connection pinned to {} ({how:?} next)",
        pinned.name
    );

    let drained_id = task_id(id, pinned_no);
    c.marathon.put_app(build(Some(&drained_id)));
    match how {
        Drain::Killing => c.marathon.emit_status(id, &drained_id, "TASK_KILLING"),
        Drain::Unhealthy => c.marathon.emit(
            "health_status_changed_event",
            json!({"appId": id, "taskId": drained_id, "instanceId": drained_id,
                   "version": "2017-07-19T17:34:41.967Z", "alive": false,
                   "eventType": "health_status_changed_event", "timestamp": "2017-07-19T17:36:00.000Z"}),
        ),
    }
    c.wait_backends(&vip, &[(pinned.addr, "draining"), (other.addr, "active")]);

    for i in 0..20 {
        let line = format!("ping{i}");
        let got = echo_line(&mut conn, &line).expect("the open connection broke while draining");
        assert_eq!(got, format!("{} {line}", pinned.name));
    }
    for i in 0..20 {
        let got = c.get(i % 3, addr).expect("new connection");
        assert_eq!(
            got, other.name,
            "a new connection went to the draining backend"
        );
    }
    let got = echo_line(&mut conn, "still there").expect("open connection after new ones");
    assert_eq!(got, format!("{} still there", pinned.name));
}

/// Scenario 4a: A task in TASK_KILLING keeps its open connection; new ones go elsewhere.
#[test]
fn s04a_task_killing_drains() {
    skip_unless_root!();
    drain_keeps_open_connection("s04a", Drain::Killing);
}

/// Scenario 4b: A task whose health check fails keeps its open connection; new ones go elsewhere.
#[test]
fn s04b_failed_health_check_drains() {
    skip_unless_root!();
    drain_keeps_open_connection("s04b", Drain::Unhealthy);
}

/// Scenario 5: Blue/green: two apps share a VIP; the old one is removed; no request fails.
#[test]
fn s05_blue_green_switch_without_failures() {
    skip_unless_root!();
    let c = Cluster::start("s05", ClusterSpec::new(3, 1));
    let vip = named("bg", 80);
    let blue = [c.tcp_backend(0, "blue1"), c.tcp_backend(1, "blue2")];
    let green = [c.tcp_backend(1, "green1"), c.tcp_backend(2, "green2")];
    let tasks = |bs: &[cluster::Backend]| -> Vec<(usize, std::net::Ipv4Addr, u16, &'static str)> {
        bs.iter()
            .map(|b| {
                (
                    c.next_task_no(),
                    c.hosts[b.host].ip,
                    b.port(),
                    "TASK_RUNNING",
                )
            })
            .collect()
    };
    c.deploy(app("/bg-blue", &["/bg:80"], "tcp", &tasks(&blue)));
    c.wait_backends(&vip, &[(blue[0].addr, "active"), (blue[1].addr, "active")]);
    let addr = c.vip_addr(0, &vip);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    // Wait for at least `n` more requests by the client loops.
    let more = |n: usize| {
        let from = done.load(Ordering::SeqCst);
        wait_for(
            "client requests",
            30 * SEC,
            Duration::from_millis(5),
            || (done.load(Ordering::SeqCst) >= from + n).then_some(()),
        );
    };
    let results = std::thread::scope(|s| {
        let loops: Vec<_> = (0..3)
            .map(|h| {
                let (c, stop, done) = (&c, Arc::clone(&stop), Arc::clone(&done));
                s.spawn(move || {
                    let mut seen = BTreeMap::<String, usize>::new();
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        match c.curl(h, addr) {
                            Ok(b) => *seen.entry(b).or_default() += 1,
                            Err(e) => failures.push(e),
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    (seen, failures)
                })
            })
            .collect();
        more(30);
        c.deploy(app("/bg-green", &["/bg:80"], "tcp", &tasks(&green)));
        c.wait_backends(
            &vip,
            &[
                (blue[0].addr, "active"),
                (blue[1].addr, "active"),
                (green[0].addr, "active"),
                (green[1].addr, "active"),
            ],
        );
        c.destroy("/bg-blue");
        c.wait_backends(
            &vip,
            &[(green[0].addr, "active"), (green[1].addr, "active")],
        );
        // Marathon then kills the old tasks.
        for b in &blue {
            b.stop();
        }
        let after: Vec<u64> = green
            .iter()
            .map(|g| g.served.load(Ordering::SeqCst))
            .collect();
        wait_for(
            "green to serve after the switch",
            20 * SEC,
            Duration::from_millis(20),
            || {
                green
                    .iter()
                    .zip(&after)
                    .all(|(g, a)| g.served.load(Ordering::SeqCst) > a + 3)
                    .then_some(())
            },
        );
        more(30);
        stop.store(true, Ordering::SeqCst);
        loops
            .into_iter()
            .map(|l| l.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (h, (seen, failures)) in results.iter().enumerate() {
        println!("host {}: {seen:?}, {} failures", h + 1, failures.len());
        assert!(
            failures.is_empty(),
            "host {}: failures during the switch: {failures:?}",
            h + 1
        );
    }
    assert_eq!(c.vip_addr(1, &vip), addr, "the named VIP changed address");
    for i in 0..10 {
        let got = c.curl(i % 3, addr).unwrap();
        assert!(got.starts_with("green"), "{got} after the switch");
    }
}

/// Scenario 6: Every controller down: agents keep forwarding; one comes back and changes flow again.
#[test]
fn s06_controllers_down_then_back() {
    skip_unless_root!();
    let mut c = Cluster::start("s06", ClusterSpec::new(3, 2));
    let id = "/ha";
    let vip = named("ha", 80);
    let b1 = c.tcp_backend(0, "b1");
    let b2 = c.tcp_backend(1, "b2");
    let mut tasks = vec![
        (c.next_task_no(), c.hosts[0].ip, b1.port(), "TASK_RUNNING"),
        (c.next_task_no(), c.hosts[1].ip, b2.port(), "TASK_RUNNING"),
    ];
    c.deploy(app(id, &["/ha:80"], "tcp", &tasks));
    c.wait_backends(&vip, &[(b1.addr, "active"), (b2.addr, "active")]);
    let addr = c.vip_addr(0, &vip);

    c.kill_controller(0);
    c.kill_controller(1);
    // The agents notice (their watches fail) and keep the table: traffic flows for a while.
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < 3 * SEC {
        for h in 0..3 {
            let got = c
                .curl(h, addr)
                .unwrap_or_else(|e| panic!("controllers down: {e}"));
            assert!(got == "b1" || got == "b2", "{got}");
            n += 1;
        }
    }
    println!("{n} requests served with every controller down");
    c.wait_agents("tables kept", SEC, |t| {
        backend_set(t, &vip).map(|s| s.len()) == Some(2)
    });

    c.restart_controller(1);
    let b3 = c.tcp_backend(2, "b3");
    let no = c.next_task_no();
    tasks.push((no, c.hosts[2].ip, b3.port(), "TASK_RUNNING"));
    c.marathon.put_app(app(id, &["/ha:80"], "tcp", &tasks));
    let t0 = Instant::now();
    c.marathon.emit_status(id, &task_id(id, no), "TASK_RUNNING");
    third_backend_arrives(
        &c,
        &vip,
        addr,
        [&b1, &b2, &b3],
        t0,
        "after a controller came back",
    );
}

/// Scenario 7: Marathon returns garbage, then hangs: tables stay; after recovery they update.
#[test]
fn s07_marathon_garbage_and_hang_keep_tables() {
    skip_unless_root!();
    let c = Cluster::start("s07", ClusterSpec::new(3, 1));
    let id = "/steady";
    let vip = named("steady", 80);
    let b1 = c.tcp_backend(0, "b1");
    let b2 = c.tcp_backend(1, "b2");
    let b3 = c.tcp_backend(2, "b3");
    let t1 = (c.next_task_no(), c.hosts[0].ip, b1.port(), "TASK_RUNNING");
    let t2 = (c.next_task_no(), c.hosts[1].ip, b2.port(), "TASK_RUNNING");
    let t3 = (c.next_task_no(), c.hosts[2].ip, b3.port(), "TASK_RUNNING");
    c.deploy(app(id, &["/steady:80"], "tcp", &[t1, t2]));
    c.wait_backends(&vip, &[(b1.addr, "active"), (b2.addr, "active")]);
    let addr = c.vip_addr(0, &vip);
    let before: Vec<_> = (0..3)
        .map(|h| backend_set(&c.agent_vips(h).unwrap(), &vip))
        .collect();

    // While Marathon misbehaves, it "has" a third task the controller cannot read.
    c.marathon
        .put_app(app(id, &["/steady:80"], "tcp", &[t1, t2, t3]));
    for fault in [Fault::Garbage, Fault::Hang] {
        c.marathon.set_fault(fault);
        let reqs = || {
            c.marathon.app_requests.load(Ordering::SeqCst)
                + c.marathon.apps_requests.load(Ordering::SeqCst)
        };
        let r0 = reqs();
        c.marathon
            .emit_status(id, &task_id(id, t3.0), "TASK_RUNNING");
        wait_for(
            "the controller to ask Marathon",
            10 * SEC,
            Duration::from_millis(10),
            || (reqs() > r0).then_some(()),
        );
        // Past the controller's 1 s Marathon timeout, and through a 5 s resync for Hang.
        let watch = if fault == Fault::Hang {
            6 * SEC
        } else {
            2 * SEC
        };
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < watch {
            for (h, want) in before.iter().enumerate() {
                assert_eq!(
                    &backend_set(&c.agent_vips(h).unwrap(), &vip),
                    want,
                    "host {} table changed under {fault:?}",
                    h + 1
                );
                let got = c.get(h, addr).unwrap_or_else(|e| panic!("{fault:?}: {e}"));
                assert!(got == "b1" || got == "b2", "{got}");
                n += 1;
            }
        }
        println!(
            "{fault:?}: {} Marathon requests, {n} requests served, tables unchanged",
            reqs() - r0
        );
    }
    c.marathon.set_fault(Fault::None);
    let t0 = Instant::now();
    c.marathon
        .emit_status(id, &task_id(id, t3.0), "TASK_RUNNING");
    third_backend_arrives(&c, &vip, addr, [&b1, &b2, &b3], t0, "after recovery");
}

/// Scenario 8: Hostile IP VIP labels are refused everywhere; the app's other VIPs are unaffected.
#[test]
fn s08_hostile_ip_vips_refused() {
    skip_unless_root!();
    let c = Cluster::start("s08", ClusterSpec::new(3, 1));
    let b2 = c.tcp_backend(1, "host2-backend");
    let tasks = [(c.next_task_no(), c.hosts[1].ip, b2.port(), "TASK_RUNNING")];
    c.deploy(app(
        "/hostile",
        &["198.18.0.2:80", "127.0.0.1:80", "198.18.6.6:80", "/fine:80"],
        "tcp",
        &tasks,
    ));
    c.wait_agents("the fine VIPs", 30 * SEC, |t| {
        find_vip(t, "198.18.6.6:80").is_some() && find_vip(t, &named("fine", 80)).is_some()
    });
    for h in 0..3 {
        let t = c.agent_vips(h).unwrap();
        let vips: Vec<&str> = t.iter().filter_map(|v| v["vip"].as_str()).collect();
        assert!(!vips.contains(&"198.18.0.2:80"), "host {}: {vips:?}", h + 1);
        assert!(!vips.contains(&"127.0.0.1:80"), "host {}: {vips:?}", h + 1);
        let addrs = c.minuteman_addrs(h);
        println!("host {} minuteman: {addrs:?}", h + 1);
        assert!(addrs.contains("198.18.6.6/32"), "host {}: {addrs:?}", h + 1);
        assert!(
            !addrs
                .iter()
                .any(|a| a.starts_with("198.18.0.2/") || a.starts_with("127.")),
            "host {}: hostile address installed: {addrs:?}",
            h + 1
        );
        // The other VIPs work; host 2's real address still reaches host 2.
        assert_eq!(
            c.curl(h, "198.18.6.6:80".parse().unwrap()).unwrap(),
            "host2-backend"
        );
        let fine = c.vip_addr(h, &named("fine", 80));
        assert_eq!(c.curl(h, fine).unwrap(), "host2-backend");
        assert_eq!(c.curl(h, b2.addr).unwrap(), "host2-backend");
        assert!(
            c.curl(h, "127.0.0.1:80".parse().unwrap()).is_err(),
            "something serves 127.0.0.1:80"
        );
    }
}

/// Scenario 9a: An agent restart clears left-over addresses and restores service quickly.
#[test]
fn s09a_agent_restart_clears_leftovers() {
    skip_unless_root!();
    let mut c = Cluster::start("s09a", ClusterSpec::new(2, 1));
    let b = c.tcp_backend(0, "b");
    c.deploy(app(
        "/r",
        &["/r:80"],
        "tcp",
        &[(c.next_task_no(), c.hosts[0].ip, b.port(), "TASK_RUNNING")],
    ));
    let vip = named("r", 80);
    c.wait_backends(&vip, &[(b.addr, "active")]);
    let addr = c.vip_addr(1, &vip);
    // The agent dies; a stranger's address is on its link (added after the kill: a live agent
    // removes it at once, which is another scenario).
    c.agent(1).kill();
    c.hosts[1].agent = None;
    c.hosts[1]
        .ns
        .exec_ok(&["ip", "addr", "add", "198.18.200.200/32", "dev", "minuteman"]);
    assert!(c.minuteman_addrs(1).contains("198.18.200.200/32"));
    let t0 = Instant::now();
    c.start_agent(1);
    wait_for(
        "service restored without the left-over",
        20 * SEC,
        Duration::from_millis(5),
        || {
            (c.get_quick(1, addr).as_deref() == Ok("b")
                && !c.minuteman_addrs(1).contains("198.18.200.200/32"))
            .then_some(())
        },
    );
    let restored = t0.elapsed();
    println!("agent restart: left-over gone and service restored {restored:?} after spawn");
    let neigh = c.hosts[1]
        .ns
        .exec(&["ip", "neigh", "show", &addr.ip().to_string()]);
    println!(
        "host 2 neighbour entry for the VIP (ARP answered by another host's agent?): {:?}",
        String::from_utf8_lossy(&neigh.stdout).trim()
    );
    let addrs = c.minuteman_addrs(1);
    assert_eq!(addrs, BTreeSet::from([format!("{}/32", addr.ip())]));
    assert!(
        restored < 3 * SEC,
        "service restored only after {restored:?}"
    );
}

/// Scenario 9c (kernel path): an agent SIGKILLed and restarted loses no client connection: the
/// killed agent's pinned programs keep translating until the new one has its table in its own
/// maps and takes over.
#[test]
fn s09c_agent_kill_and_restart_loses_no_connection() {
    skip_unless_root!();
    if !cluster::kernel_path() {
        eprintln!("note: kernel-path-only scenario: with the proxy the agent is the data path");
        return;
    }
    let mut c = Cluster::start("s09c", ClusterSpec::new(2, 1));
    let b = c.tcp_backend(0, "b");
    c.deploy(app(
        "/k",
        &["/k:80"],
        "tcp",
        &[(c.next_task_no(), c.hosts[0].ip, b.port(), "TASK_RUNNING")],
    ));
    let vip = named("k", 80);
    c.wait_backends(&vip, &[(b.addr, "active")]);
    let addr = c.vip_addr(1, &vip);
    assert_eq!(c.get(1, addr).as_deref(), Ok("b"));
    // A client in host 2 connects again and again through the restarts.
    let stop = Arc::new(AtomicBool::new(false));
    let (ns, stop2) = (c.hosts[1].name().to_string(), Arc::clone(&stop));
    let client = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0usize, Vec::new());
        while !stop2.load(Ordering::Relaxed) {
            let r = cluster::in_ns(&ns, || cluster::http_get_timeout(addr, "/", SEC, 2 * SEC));
            match r {
                Ok((200, body)) if body.trim() == "b" => ok += 1,
                other => failed.push(format!("{other:?}")),
            }
        }
        (ok, failed)
    });
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        c.agent(1).kill();
        c.hosts[1].agent = None;
        std::thread::sleep(Duration::from_millis(300));
        c.start_agent(1);
        c.wait_agent_ready(1, 20 * SEC);
        println!("round {round}: agent killed, restarted and ready");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().unwrap();
    println!(
        "{ok} connections through 3 agent kills and restarts, {} failed",
        failed.len()
    );
    assert!(ok > 30, "too few connections to tell: {ok}");
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    // The new agent serves from its own maps: a backend change reaches the kernel path.
    let b2 = c.tcp_backend(0, "b2");
    c.deploy(app(
        "/k",
        &["/k:80"],
        "tcp",
        &[(c.next_task_no(), c.hosts[0].ip, b2.port(), "TASK_RUNNING")],
    ));
    wait_for(
        "the new backend served",
        10 * SEC,
        Duration::from_millis(20),
        || (c.get_quick(1, addr).as_deref() == Ok("b2")).then_some(()),
    );
}

/// Scenario 9d: an agent restarted while every controller is down serves the table it saved
/// (addresses, listeners or kernel maps, and DNS) until a controller is back; a clean stop
/// removes the saved table.
#[test]
fn s09d_agent_restart_with_controllers_down_serves_its_saved_table() {
    skip_unless_root!();
    let mut c = Cluster::start("s09d", ClusterSpec::new(2, 1));
    let b = c.tcp_backend(0, "b");
    c.deploy(app(
        "/saved",
        &["/saved:80"],
        "tcp",
        &[(c.next_task_no(), c.hosts[0].ip, b.port(), "TASK_RUNNING")],
    ));
    let vip = named("saved", 80);
    c.wait_backends(&vip, &[(b.addr, "active")]);
    let addr = c.vip_addr(1, &vip);
    let saved_files = |c: &Cluster| -> Vec<String> {
        std::fs::read_dir(c.state_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".table.json"))
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for(
        "both agents saved their table",
        5 * SEC,
        Duration::from_millis(50),
        || (saved_files(&c).len() == 2).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(1200)); // the table with the VIP, saved
    c.kill_controller(0);
    c.agent(1).kill();
    c.hosts[1].agent = None;
    let t0 = Instant::now();
    c.start_agent(1);
    c.wait_agent_ready(1, 10 * SEC);
    let ready = t0.elapsed();
    assert_eq!(
        c.get(1, addr).as_deref(),
        Ok("b"),
        "the saved table is served"
    );
    let std::net::IpAddr::V4(v4) = addr.ip() else {
        panic!("an IPv4 VIP: {addr}")
    };
    assert_eq!(c.dig(1, &format!("saved.{ZONE}")), vec![v4], "and its name");
    println!("agent restarted with every controller down: ready and serving {ready:?} after spawn");
    // The controller comes back with a change: the agent follows it.
    c.restart_controller(0);
    let b2 = c.tcp_backend(0, "b2");
    c.deploy(app(
        "/saved",
        &["/saved:80"],
        "tcp",
        &[(c.next_task_no(), c.hosts[0].ip, b2.port(), "TASK_RUNNING")],
    ));
    wait_for(
        "the new table served",
        10 * SEC,
        Duration::from_millis(20),
        || (c.get_quick(1, addr).as_deref() == Ok("b2")).then_some(()),
    );
    // A clean stop removes the saved table: a stopped agent's successor waits to be told.
    c.agent(1).signal(Signal::SIGTERM);
    let st = c.agent(1).wait_exit(15 * SEC);
    assert!(st.success(), "{st}");
    c.hosts[1].agent = None;
    assert_eq!(saved_files(&c).len(), 1, "{:?}", saved_files(&c));
}

/// Scenario 9b: SIGTERM: an open connection keeps working through the grace period, new connections
/// are refused, and the VIP addresses are gone after exit.
#[test]
fn s09b_agent_sigterm_drains() {
    skip_unless_root!();
    if proxy_only(
        "with the kernel path open connections go straight to the backend, so the agent has nothing to drain",
    ) {
        return;
    }
    let mut c = Cluster::start("s09b", ClusterSpec::new(2, 1));
    let b = c.tcp_backend(0, "b");
    c.deploy(app(
        "/d",
        &["/d:80"],
        "tcp",
        &[(c.next_task_no(), c.hosts[0].ip, b.port(), "TASK_RUNNING")],
    ));
    let vip = named("d", 80);
    c.wait_backends(&vip, &[(b.addr, "active")]);
    let addr = c.vip_addr(1, &vip);
    let mut conn = c.connect(1, addr).unwrap();
    assert_eq!(echo_line(&mut conn, "hi").unwrap(), "b hi");

    let t0 = Instant::now();
    c.agent(1).signal(Signal::SIGTERM);
    // New connections are refused (the listener is closed) while the open one keeps working.
    wait_for(
        "new connections refused",
        3 * SEC,
        Duration::from_millis(10),
        || c.connect(1, addr).is_err().then_some(()),
    );
    let mut i = 0;
    while t0.elapsed() < 3 * SEC {
        let line = format!("during-grace-{i}");
        assert_eq!(echo_line(&mut conn, &line).unwrap(), format!("b {line}"));
        assert!(
            c.connect(1, addr).is_err(),
            "a new connection was accepted while draining"
        );
        assert!(
            c.agent(1).try_exit().is_none(),
            "agent exited before the grace period"
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = c.agent(1).wait_exit(15 * SEC);
    let exited = t0.elapsed();
    println!("agent exited {exited:?} after SIGTERM ({st}); {i} round trips during the grace");
    assert!(st.success(), "exit status {st}");
    assert!(
        exited >= 4 * SEC,
        "exited after {exited:?}, before the 5 s grace"
    );
    let left = c.minuteman_addrs(1);
    assert!(left.is_empty(), "addresses left on minuteman: {left:?}");
    c.hosts[1].agent = None;
}

/// Scenario 10: UDP: a client's session is pinned; its backend's task is removed -> the next datagrams
/// are answered by the other backend at once.
#[test]
fn s10_udp_session_moves_when_backend_removed() {
    skip_unless_root!();
    if proxy_only(
        "a connected UDP socket the kernel path translated stays on its backend (the kernel cannot move it)",
    ) {
        return;
    }
    let c = Cluster::start("s10", ClusterSpec::new(3, 1));
    let id = "/uecho";
    let vip = named("uecho", 5000);
    let u1 = c.udp_backend(0, "u1");
    let u2 = c.udp_backend(1, "u2");
    let (n1, n2) = (c.next_task_no(), c.next_task_no());
    let t1 = (n1, c.hosts[0].ip, u1.port(), "TASK_RUNNING");
    let t2 = (n2, c.hosts[1].ip, u2.port(), "TASK_RUNNING");
    c.deploy(app(id, &["/uecho:5000"], "udp", &[t1, t2]));
    c.wait_agents("the UDP VIP", 30 * SEC, |t| {
        find_vip(t, &vip).is_some_and(|v| {
            v["protocol"] == "udp" && v["backend"].as_array().map(Vec::len) == Some(2)
        })
    });
    let addr = c.vip_addr(2, &vip);
    let sock = c.udp_socket(2);
    let ask = |payload: &str| -> (String, SocketAddr) {
        sock.send_to(payload.as_bytes(), addr).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no answer to {payload}: {e}"));
        (String::from_utf8_lossy(&buf[..n]).to_string(), from)
    };
    let (first, from) = ask("d0");
    assert_eq!(from, addr, "reply not from the VIP address");
    let pinned = first.split_whitespace().next().unwrap().to_string();
    for i in 1..10 {
        let (got, from) = ask(&format!("d{i}"));
        assert_eq!(got, format!("{pinned} d{i}"), "session not pinned");
        assert_eq!(from, addr);
    }
    let (gone, stays, gone_no) = if pinned == "u1" {
        (&u1, &u2, n1)
    } else {
        (&u2, &u1, n2)
    };
    let keep = if pinned == "u1" { t2 } else { t1 };
    c.marathon
        .put_app(app(id, &["/uecho:5000"], "udp", &[keep]));
    let t0 = Instant::now();
    c.marathon
        .emit_status(id, &task_id(id, gone_no), "TASK_KILLED");
    c.wait_backends(&vip, &[(stays.addr, "active")]);
    let applied = t0.elapsed();
    // The removed backend still runs (as a slow-to-die task would): it must get nothing more.
    let before = gone.served.load(Ordering::SeqCst);
    for i in 0..10 {
        let (got, from) = ask(&format!("after{i}"));
        assert_eq!(
            got,
            format!("{} after{i}", stays.name),
            "datagram {i} after the removal"
        );
        assert_eq!(from, addr);
    }
    assert_eq!(gone.served.load(Ordering::SeqCst), before);
    println!(
        "UDP: backend {} removed; table applied {applied:?} after the event; next datagrams answered by {}",
        gone.name, stays.name
    );
}

/// Scenario 11: Task names follow Marathon on every agent, through the controller's deltas:
/// `<app>.marathon.mesos` (Mesos-DNS's name for a grouped app), its SRV records and the DC/OS
/// `agentip` name list every running task; a task that stops and an app that goes leave them.
#[test]
fn s11_task_names_follow_marathon_on_every_agent() {
    skip_unless_root!();
    let c = Cluster::start("s11", ClusterSpec::new(2, 1));
    let id = "/db/cassandra";
    let hosts = [c.hosts[0].ip, c.hosts[1].ip];
    let (t1, t2) = (c.next_task_no(), c.next_task_no());
    c.deploy(app(
        id,
        &["/cassandra:9042"],
        "tcp",
        &[
            (t1, hosts[0], 31042, "TASK_RUNNING"),
            (t2, hosts[1], 31043, "TASK_RUNNING"),
        ],
    ));
    // Marathon runs /db/cassandra's tasks as `cassandra.db`: Mesos-DNS's `cassandra-db`.
    let a = "cassandra-db.marathon.mesos";
    let srv = |h: usize| -> Vec<String> {
        let out = c.hosts[h].ns.exec(&[
            "dig",
            "@127.0.0.1",
            "-p",
            &cluster::DNS_PORT.to_string(),
            "+short",
            "_cassandra-db._tcp.marathon.mesos",
            "SRV",
        ]);
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect();
        lines.sort();
        lines
    };
    for h in 0..2 {
        let got = wait_for("both tasks named", 10 * SEC, SEC / 10, || {
            let mut ips = c.dig(h, a);
            ips.sort();
            (ips == hosts).then_some(ips)
        });
        assert_eq!(got, hosts);
        assert_eq!(
            srv(h),
            vec!["0 0 31042", "0 0 31043"],
            "SRV on host {}",
            h + 1
        );
        let mut agentip = c.dig(h, "cassandra-db.marathon.agentip.dcos.thisdcos.directory");
        agentip.sort();
        assert_eq!(agentip, hosts, "agentip on host {}", h + 1);
    }
    // One task stops: its name goes, on every agent.
    c.deploy(app(
        id,
        &["/cassandra:9042"],
        "tcp",
        &[
            (t1, hosts[0], 31042, "TASK_RUNNING"),
            (t2, hosts[1], 31043, "TASK_FINISHED"),
        ],
    ));
    for h in 0..2 {
        wait_for("the stopped task gone", 10 * SEC, SEC / 10, || {
            (c.dig(h, a) == [hosts[0]]).then_some(())
        });
        assert_eq!(srv(h), vec!["0 0 31042"]);
    }
    c.destroy(id);
    for h in 0..2 {
        wait_for("the app's names gone", 10 * SEC, SEC / 10, || {
            c.dig(h, a).is_empty().then_some(())
        });
    }
}

/// Scenario 12: the kernel data path (`--data-plane bpf`, each agent restricted to its own
/// namespace's sockets, as several agents share this kernel): every host reaches every backend
/// through the VIP with no proxy in the path, the API says `bpf` and counts the connections,
/// and a backend killed without Marathon knowing stops getting connections within 2 s.
#[test]
fn s12_kernel_data_path() {
    skip_unless_root!();
    let mut spec = ClusterSpec::new(2, 1);
    spec.extra_agent_args = ["--data-plane", "bpf", "--bpf-netns-only"]
        .map(String::from)
        .to_vec();
    let mut c = Cluster::start("s12", spec);
    let mut procs = Vec::new();
    let mut tasks = Vec::new();
    let mut want = Vec::new();
    let mut names = BTreeSet::new();
    for (h, port) in [(0usize, 31001u16), (1, 31001), (1, 31002)] {
        let name = format!("host{}-port{port}", h + 1);
        procs.push(c.socat_backend(h, port, &name));
        names.insert(name);
        tasks.push((c.next_task_no(), c.hosts[h].ip, port, "TASK_RUNNING"));
        want.push((SocketAddr::from((c.hosts[h].ip, port)), "active"));
    }
    c.deploy(app("/web", &["/web:80"], "tcp", &tasks));
    let web = named("web", 80);
    c.wait_backends(&web, &want);
    let vip = c.vip_addr(0, &web);
    for h in 0..2 {
        let mut seen = BTreeMap::<String, usize>::new();
        for _ in 0..30 {
            let body = c
                .curl(h, vip)
                .unwrap_or_else(|e| panic!("host {}: {e}", h + 1));
            *seen.entry(body).or_default() += 1;
        }
        println!("host {} -> {vip} (kernel path): {seen:?}", h + 1);
        let got: BTreeSet<String> = seen.keys().cloned().collect();
        assert_eq!(got, names, "host {}", h + 1);
    }
    // The API says which data plane serves the VIP and what the kernel counted (read back
    // every second).
    wait_for("kernel counters in /v1/vips", 5 * SEC, SEC / 10, || {
        let vips = c.agent_vips(0)?;
        let v = find_vip(&vips, &web)?;
        if v["data_plane"] != "bpf" {
            return None;
        }
        let n: u64 = v["backend"]
            .as_array()?
            .iter()
            .filter_map(|b| b["kernel_connections"].as_u64())
            .sum();
        (n >= 30).then_some(n)
    });

    // Kill host 2's first backend without telling Marathon: within 2 s (probes every
    // 500 ms) no connection goes to it.
    procs[1].kill();
    let killed = Instant::now();
    let mut last_failure = Duration::ZERO;
    let mut ok_in_a_row = 0;
    while ok_in_a_row < 30 {
        assert!(
            killed.elapsed() < 10 * SEC,
            "the dead backend is still chosen"
        );
        match c.curl((ok_in_a_row % 2) as usize, vip) {
            Ok(body) if body != "host2-port31001" => ok_in_a_row += 1,
            _ => {
                ok_in_a_row = 0;
                last_failure = killed.elapsed();
            }
        }
    }
    println!("dead backend: last connection sent to it {last_failure:?} after the kill");
    assert!(last_failure < 2 * SEC, "{last_failure:?}");
    for p in procs {
        c.keep(p);
    }
}

/// Wait until every agent lists `backends` active on `vip`, say how long that took since
/// `t0`, then require that the last of them is reached through `addr`.
fn third_backend_arrives(
    c: &Cluster,
    vip: &str,
    addr: SocketAddr,
    backends: [&cluster::Backend; 3],
    t0: Instant,
    when: &str,
) {
    let want: Vec<_> = backends.iter().map(|b| (b.addr, "active")).collect();
    c.wait_backends(vip, &want);
    println!(
        "the change {when} reached every agent in {:?}",
        t0.elapsed()
    );
    let last = &backends[2].name;
    let hit = (0..60).any(|i| c.get(i % 3, addr).as_deref() == Ok(last.as_str()));
    assert!(hit, "{last} was never reached {when}");
}

/// Scenario 13: a container-network app whose one task, on host 2, has an IPv4 and an IPv6
/// address (a `dcos6`-style overlay; the hosts reach each other over IPv6 too), no IPv6 flag
/// given anywhere. Every agent lists its name once per address, each with its own family's
/// backend, and answers A and AAAA; from every host curl to the A address reaches the IPv4
/// backend and curl to the AAAA address the IPv6 one, across hosts, with the proxy or the
/// kernel path (`L4LB_TEST_DATA_PLANE=bpf`) alike.
#[test]
fn s13_a_dual_stack_task_is_reached_per_family_across_hosts() {
    skip_unless_root!();
    let mut c = Cluster::start("s13", ClusterSpec::new(3, 1));
    let six = |h: usize| format!("fd00:18::{}", h + 1);
    for (h, host) in c.hosts.iter().enumerate() {
        // nodad: usable at once, not "tentative" for a second.
        let addr = format!("{}/64", six(h));
        host.ns
            .exec_ok(&["ip", "-6", "addr", "add", &addr, "dev", &host.link, "nodad"]);
    }
    let (v4, v6): (SocketAddr, SocketAddr) = (
        SocketAddr::from((c.hosts[1].ip, 8080)),
        SocketAddr::new(six(1).parse().unwrap(), 8080),
    );
    let p = c.socat_backend_at(1, v4, "four");
    c.keep(p);
    let p = c.socat_backend_at(1, v6, "six");
    c.keep(p);
    let no = c.next_task_no();
    c.deploy(json!({
        "id": "/dual",
        "networks": [{"mode": "container", "name": "dcos6"}],
        "container": {"type": "MESOS", "portMappings": [
            {"containerPort": 8080, "protocol": "tcp", "labels": {"VIP_0": "/dual:80"}}]},
        "tasks": [{
            "id": task_id("/dual", no), "host": c.hosts[1].ip.to_string(), "ports": [],
            "state": "TASK_RUNNING",
            "ipAddresses": [{"ipAddress": v4.ip().to_string(), "protocol": "IPv4"},
                            {"ipAddress": v6.ip().to_string(), "protocol": "IPv6"}]
        }]
    }));
    let vip = named("dual", 80);
    let of_family = |t: &[serde_json::Value], backend: SocketAddr| -> Option<SocketAddr> {
        t.iter()
            .filter(|v| v["vip"].as_str() == Some(vip.as_str()))
            .find(|v| {
                let b = v["backend"].as_array();
                b.map(Vec::len) == Some(1)
                    && b.and_then(|b| b[0]["ip"].as_str())
                        == Some(backend.ip().to_string().as_str())
            })
            .map(cluster::vip_socket)
    };
    c.wait_agents("the name once per family", 30 * SEC, |t| {
        t.iter()
            .filter(|v| v["vip"].as_str() == Some(vip.as_str()))
            .count()
            == 2
            && of_family(t, v4).is_some()
            && of_family(t, v6).is_some()
    });
    let t = c.agent_vips(0).unwrap();
    let (a, aaaa) = (of_family(&t, v4).unwrap(), of_family(&t, v6).unwrap());
    assert!(a.is_ipv4() && aaaa.is_ipv6(), "{a} {aaaa}");
    let a4 = match a.ip() {
        std::net::IpAddr::V4(ip) => ip,
        ip => panic!("{ip} is no IPv4 address"),
    };
    // An IPv6 socket to the A address, written IPv4-mapped, reaches the IPv4 backend too.
    let mapped = SocketAddr::from((a4.to_ipv6_mapped(), 80));
    for h in 0..3 {
        // The same addresses on every agent, and in its DNS.
        let t = c.agent_vips(h).unwrap();
        assert_eq!(
            (of_family(&t, v4), of_family(&t, v6)),
            (Some(a), Some(aaaa))
        );
        assert_eq!(c.dig(h, &format!("dual.{ZONE}")), [a4]);
        let out = c.hosts[h].ns.exec_ok(&[
            "dig",
            "@127.0.0.1",
            "-p",
            &cluster::DNS_PORT.to_string(),
            "+short",
            &format!("dual.{ZONE}"),
            "AAAA",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            aaaa.ip().to_string()
        );
        for (to, want) in [(a, "four"), (aaaa, "six"), (mapped, "four")] {
            for _ in 0..3 {
                assert_eq!(c.curl(h, to).as_deref(), Ok(want), "host {} to {to}", h + 1);
            }
        }
    }
}
