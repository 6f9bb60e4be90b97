//! The VIP link heals at once (issue 13, break 5), end to end as root: the real binary in a
//! throw-away namespace, someone else flushing the link's addresses, setting it down or
//! deleting it, and the agent's netlink watch putting back what the table says — within
//! milliseconds, while clients keep connecting, with one reconcile per flush however many
//! addresses it took.

use crate::common::netns::NetNs;
use crate::common::process::Proc;
use crate::common::{BIN, wait_for};

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::apps::run_args;
use crate::common::marathon::{add_task, host_app, task};
use serde_json::Value;

const LINK: &str = "minuteman";

/// A namespace with a bridge `eth0` on 198.18.0.1/15 and a line echo server on it (the
/// backend of every VIP here); returns it with the backend's address.
fn host(prefix: &str) -> (NetNs, SocketAddr) {
    let ns = NetNs::with_eth0(prefix, "198.18.0.1/15");
    let listener = ns.run(|| async { std::net::TcpListener::bind("198.18.0.1:0").unwrap() });
    let backend = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    if c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (ns, backend)
}

/// An apps file with one app whose ports carry `vips` (each `ip:80`), one task at `backend`.
fn apps_file(dir: &std::path::Path, vips: &[String], backend: SocketAddr) -> std::path::PathBuf {
    let labels: Vec<&str> = vips.iter().map(String::as_str).collect();
    let mut app = host_app("/heal", &labels, "tcp");
    let ports = vec![backend.port(); vips.len()];
    add_task(
        &mut app,
        task(
            "/heal",
            0,
            &backend.ip().to_string(),
            &ports,
            "TASK_RUNNING",
        ),
    );
    let file = dir.join("apps.json");
    let apps: Value = serde_json::json!({ "apps": [app] });
    std::fs::write(&file, apps.to_string()).unwrap();
    file
}

/// `l4lb run` in `ns` from `file`, ready (first table applied); returns it with its API.
fn agent(ns: &NetNs, file: &std::path::Path) -> (Proc, SocketAddr) {
    let mut cmd = ns.command(BIN);
    cmd.args(run_args(file, &["--shutdown-grace", "1s"]));
    let proc = Proc::spawn("l4lb", &mut cmd);
    let log = proc.log();
    log.wait_for("first table applied", Duration::from_secs(30));
    let api = log.addr("API listening", Duration::from_secs(1));
    (proc, api)
}

/// A host `prefix` with a backend, an apps file naming it under `vips` (in the returned
/// directory) and an agent that applied it, with its API address.
fn serving(prefix: &str, vips: &[String]) -> (NetNs, tempfile::TempDir, (Proc, SocketAddr)) {
    let (ns, backend) = host(prefix);
    let dir = tempfile::tempdir().unwrap();
    let file = apps_file(dir.path(), vips, backend);
    let agent = agent(&ns, &file);
    (ns, dir, agent)
}

/// The IPv4 addresses on the link (`addr/prefix`); empty when the link is missing.
fn addrs_on(ns: &NetNs) -> BTreeSet<String> {
    let out = ns.exec(&["ip", "-o", "-4", "addr", "show", "dev", LINK]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|w| *w == "inet")?;
            w.next().map(str::to_string)
        })
        .collect()
}

/// `ip addr flush dev minuteman`; it must succeed (the agent must not fight it: `ip` deletes
/// again what comes back during its flush, and gives up with an error after 10 rounds).
fn flush(ns: &NetNs) {
    let out = ns.exec(&["ip", "addr", "flush", "dev", LINK]);
    assert!(
        out.status.success(),
        "ip addr flush failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Poll the link every millisecond or so until it holds `want`; how long that took.
fn until_back(ns: &NetNs, want: &BTreeSet<String>, within: Duration) -> Duration {
    let start = Instant::now();
    wait_for(
        "the VIP addresses to come back",
        within,
        Duration::from_millis(1),
        || (addrs_on(ns) == *want).then_some(()),
    );
    start.elapsed()
}

/// The destinations of the anchor routes in `ns` (`proto 76` in the local table, IPv4).
fn anchors(ns: &NetNs) -> BTreeSet<String> {
    let out = ns.exec_ok(&[
        "ip", "-4", "route", "show", "table", "local", "proto", "76", "dev", "lo",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("local ")?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// A counter's value from the agent's `/metrics`.
fn counter(ns: &NetNs, api: SocketAddr, name: &str) -> u64 {
    let out = ns.exec_ok(&["curl", "-sS", &format!("http://{api}/metrics")]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// One connection through `vip`: connect, a line there and back, within `budget` each.
fn roundtrip(vip: SocketAddr, budget: Duration) -> std::io::Result<()> {
    let mut c = TcpStream::connect_timeout(&vip, budget)?;
    c.set_read_timeout(Some(budget))?;
    c.write_all(b"ping\n")?;
    let mut got = [0u8; 5];
    c.read_exact(&mut got)?;
    if &got != b"ping\n" {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(())
}

/// Whether one connection through `vip` from inside `ns` works.
fn answers(ns: &NetNs, vip: &str) -> bool {
    let vip: SocketAddr = vip.parse().unwrap();
    ns.run(move || async move { roundtrip(vip, Duration::from_secs(2)) })
        .is_ok()
}

fn set(s: &[&str]) -> BTreeSet<String> {
    s.iter().map(|a| a.to_string()).collect()
}

/// Spin in `ns` binding a socket to `vip` (which fails while the address is not local) until
/// `stop`; the spans during which it failed. Microsecond resolution for how long a VIP is
/// really gone, which polling `ip` (a process per look) cannot give.
fn absences(
    ns: &Arc<NetNs>,
    vip: &str,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Duration>> {
    let vip: SocketAddr = format!("{vip}:0").parse().unwrap();
    let (ns, stop) = (Arc::clone(ns), Arc::clone(stop));
    std::thread::spawn(move || {
        ns.run(move || async move {
            let mut gaps = Vec::new();
            let mut gone: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                let here = std::net::UdpSocket::bind(vip).is_ok();
                // A look every ~100 µs, leaving the CPU to the agent (two cores).
                std::thread::sleep(Duration::from_micros(50));
                match (here, gone) {
                    (false, None) => gone = Some(Instant::now()),
                    (true, Some(t)) => {
                        gaps.push(t.elapsed());
                        gone = None;
                    }
                    _ => {}
                }
            }
            if let Some(t) = gone {
                gaps.push(t.elapsed());
            }
            gaps
        })
    })
}

/// (a) After a flush the addresses are back within 100 ms, every time (the 500 ms poll this
/// replaced fails this about four times in five per flush), and meanwhile the VIP never
/// stopped being local: its anchor route (on `lo`, `proto 76`) carried it.
#[test]
fn root_a_flushed_link_is_whole_again_within_100ms() {
    skip_unless_root!();
    let vips: Vec<String> = (1..=3).map(|i| format!("198.18.5.{i}:80")).collect();
    let (ns, _dir, (mut proc, api)) = serving("flush", &vips);
    let want = set(&["198.18.5.1/32", "198.18.5.2/32", "198.18.5.3/32"]);
    assert_eq!(addrs_on(&ns), want);
    assert_eq!(
        anchors(&ns),
        set(&["198.18.5.1", "198.18.5.2", "198.18.5.3"])
    );
    let ns = Arc::new(ns);
    let stop = Arc::new(AtomicBool::new(false));
    let spin = absences(&ns, "198.18.5.3", &stop);
    let mut took = Vec::new();
    // Flushes at several phases of any periodic check.
    for gap_ms in [130, 170, 230, 290, 370] {
        std::thread::sleep(Duration::from_millis(gap_ms));
        flush(&ns);
        took.push(until_back(&ns, &want, Duration::from_millis(100)));
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let gaps = spin.join().unwrap();
    eprintln!("addresses seen back (polling ip) after each flush: {took:?}");
    eprintln!("198.18.5.3 not local for: {gaps:?}");
    // (Without anchors: one absence per flush, 3-8 ms each, measured here.)
    assert!(gaps.is_empty(), "the VIP was not local for {gaps:?}");
    assert!(answers(&ns, "198.18.5.2:80"));
    assert_eq!(
        counter(&ns, api, "l4lb_interface_reconciled_total"),
        5,
        "{}",
        proc.log_text()
    );
    proc.stop_cleanly(Duration::from_secs(10));
    assert!(addrs_on(&ns).is_empty(), "addresses left after SIGTERM");
    assert!(anchors(&ns).is_empty(), "anchor routes left after SIGTERM");
}

/// (b) A client connecting through a VIP one connection after another (2 s budget each, as
/// the soak's curl) while the link is flushed 20 times: no connection fails or stalls.
#[test]
fn root_clients_through_a_vip_never_fail_across_20_flushes() {
    skip_unless_root!();
    let (ns, _dir, (mut proc, _api)) = serving("flushload", &["198.18.5.5:80".to_string()]);
    let vip: SocketAddr = "198.18.5.5:80".parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ns = Arc::new(ns);
    let client = {
        let (ns, stop) = (Arc::clone(&ns), Arc::clone(&stop));
        std::thread::spawn(move || {
            ns.run(move || async move {
                let mut results = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = roundtrip(vip, Duration::from_secs(2));
                    results.push((r.map_err(|e| e.to_string()), t.elapsed()));
                }
                results
            })
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        flush(&ns);
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    let results = client.join().unwrap();
    let failed: Vec<&String> = results
        .iter()
        .filter_map(|(r, _)| r.as_ref().err())
        .collect();
    let slow = results
        .iter()
        .filter(|(_, t)| *t > Duration::from_millis(200))
        .count();
    let worst = results.iter().map(|(_, t)| *t).max().unwrap_or_default();
    eprintln!(
        "{} connections across 20 flushes: {} failed, {slow} slower than 200 ms, slowest {worst:?}",
        results.len(),
        failed.len()
    );
    assert!(
        results.len() > 100,
        "the client barely ran: {}",
        results.len()
    );
    assert!(
        failed.is_empty(),
        "failed connections: {failed:?}\n{}",
        proc.log_text()
    );
    // A SYN lost while the address was gone would cost a 1 s retransmission (or, on this
    // node subnet, a 3 s ARP timeout): none was, the anchor route kept the VIP local.
    assert!(
        worst < Duration::from_millis(900),
        "slowest connection {worst:?}"
    );
    proc.stop_cleanly(Duration::from_secs(10));
}

/// (c) The link deleted is re-created with its addresses; set down, it is brought up again.
#[test]
fn root_a_deleted_or_downed_link_comes_back_with_its_vips() {
    skip_unless_root!();
    let (ns, _dir, (mut proc, api)) = serving("linkdel", &["198.18.5.5:80".to_string()]);
    let want = set(&["198.18.5.5/32"]);
    let answers = |ns: &NetNs| answers(ns, "198.18.5.5:80");
    let index = |ns: &NetNs| {
        let out = ns.exec_ok(&["cat", &format!("/sys/class/net/{LINK}/ifindex")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let up = |ns: &NetNs| {
        let out = ns.exec_ok(&["ip", "-o", "link", "show", "dev", LINK]);
        String::from_utf8_lossy(&out.stdout).contains(",UP")
    };
    assert!(answers(&ns));
    let before = index(&ns);

    ns.exec_ok(&["ip", "link", "del", LINK]);
    let back = until_back(&ns, &want, Duration::from_secs(1));
    assert_ne!(index(&ns), before, "the link was not re-created");
    assert!(up(&ns), "the re-created link is down");
    assert!(answers(&ns), "VIP does not answer on the re-created link");
    eprintln!("link deleted: back with its VIP after {back:?}");

    ns.exec_ok(&["ip", "link", "set", LINK, "down"]);
    wait_for(
        "the link to come up",
        Duration::from_secs(1),
        Duration::from_millis(1),
        || up(&ns).then_some(()),
    );
    assert_eq!(addrs_on(&ns), want);
    assert!(
        answers(&ns),
        "VIP does not answer after the link was set down"
    );

    // Twice it was put right; then nothing more happens (our own changes do not loop).
    let n = counter(&ns, api, "l4lb_interface_reconciled_total");
    assert_eq!(n, 2, "{}", proc.log_text());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&ns, api, "l4lb_interface_reconciled_total"), n);
    proc.stop_cleanly(Duration::from_secs(10));
}

/// (d) 1,000 VIPs flushed at once: 1,000 notifications, one reconcile (a few at most), and
/// every address back.
#[test]
fn root_a_flush_of_1000_vips_is_one_reconcile() {
    skip_unless_root!();
    const N: usize = 1000;
    let (ns, backend) = host("flush1k");
    let dir = tempfile::tempdir().unwrap();
    let vips: Vec<String> = (0..N)
        .map(|i| format!("198.18.{}.{}:80", 8 + i / 250, 1 + i % 250))
        .collect();
    let want: BTreeSet<String> = vips
        .iter()
        .map(|v| format!("{}/32", v.trim_end_matches(":80")))
        .collect();
    let file = apps_file(dir.path(), &vips, backend);
    let (mut proc, api) = agent(&ns, &file);
    assert_eq!(addrs_on(&ns).len(), N);
    let name = "l4lb_interface_reconciled_total";
    assert_eq!(
        counter(&ns, api, name),
        0,
        "our own {N} adds looked foreign"
    );

    let mut took = Vec::new();
    for round in 1..=3 {
        flush(&ns);
        took.push(until_back(&ns, &want, Duration::from_secs(2)));
        // Let any straggling burst end before counting.
        std::thread::sleep(Duration::from_millis(100));
        let n = counter(&ns, api, name);
        assert!(
            n <= 2 * round,
            "{n} reconciles after {round} flushes of {N} addresses"
        );
    }
    let n = counter(&ns, api, name);
    let overruns = counter(&ns, api, "l4lb_interface_watch_overruns_total");
    eprintln!("3 flushes of {N} VIPs: {n} reconciles, {overruns} overruns, back after {took:?}");
    assert!(
        answers(&ns, "198.18.11.250:80"),
        "the last VIP does not answer"
    );
    proc.stop_cleanly(Duration::from_secs(20));
}

/// Anchor routes follow the table: one per VIP, left by a SIGKILLed agent like its addresses
/// (so the VIPs stay local across the restart), those of VIPs gone from the table removed by
/// the next agent's first apply, and none left after a SIGTERM.
#[test]
fn root_anchor_routes_follow_the_table_across_a_crash() {
    skip_unless_root!();
    let two = ["198.18.5.1:80".to_string(), "198.18.5.2:80".to_string()];
    let (ns, backend) = host("anchors");
    let dir = tempfile::tempdir().unwrap();
    let file = apps_file(dir.path(), &two, backend);
    let (mut first, _) = agent(&ns, &file);
    assert_eq!(anchors(&ns), set(&["198.18.5.1", "198.18.5.2"]));
    first.kill();
    assert_eq!(anchors(&ns), set(&["198.18.5.1", "198.18.5.2"]));

    let file = apps_file(dir.path(), &two[..1], backend);
    let (mut second, _) = agent(&ns, &file);
    assert_eq!(anchors(&ns), set(&["198.18.5.1"]));
    assert_eq!(addrs_on(&ns), set(&["198.18.5.1/32"]));
    assert!(answers(&ns, "198.18.5.1:80"));
    second.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        second
            .exit_within(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(anchors(&ns).is_empty(), "anchor routes left after SIGTERM");
    assert!(addrs_on(&ns).is_empty());
}
