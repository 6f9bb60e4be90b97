//! The kernel path against the real kernel (root only; skipped with a note otherwise).
//!
//! Each test makes its own network namespace (clients and backends live there; the programs
//! are restricted to it by netns cookie), its own cgroup (a child of the cgroup2 root that
//! the test process joins for the test's length) and its own BPF filesystem mount, and
//! removes them all. Tests run one at a time (they move the whole process between cgroups).

use std::collections::BTreeMap;

use super::plan::Ejected;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::model::{Backend, BackendState, Protocol, Vip, VipKey, VipTable};

static SERIAL: Mutex<()> = Mutex::new(());
static SEQ: AtomicUsize = AtomicUsize::new(0);

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: the kernel path tests need root");
    }
    root
}

fn unique(what: &str) -> String {
    format!(
        "l4lb-t{}-{}-{what}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// As root, a host (cgroup, BPF file system) and a network namespace for one test; `None`
/// (the test is skipped) otherwise.
fn root_host() -> Option<(Host, Netns)> {
    is_root().then(|| (Host::new(), Netns::new()))
}

/// A network namespace of the test's, entered by a thread per call.
struct Netns {
    fd: std::fs::File,
}

impl Netns {
    fn new() -> Netns {
        let fd = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            let ok = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(ok.success());
            std::fs::File::open("/proc/thread-self/ns/net").expect("netns fd")
        })
        .join()
        .expect("netns thread");
        Netns { fd }
    }

    /// Run `f` on a thread inside the namespace (sockets it makes belong there).
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.spawn(f).join().expect("netns thread")
    }

    fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let fd = self.fd.try_clone().expect("dup netns fd");
        std::thread::spawn(move || {
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    fn ip(&self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let ok = self.run(move || Command::new("ip").args(&args).status().expect("ip"));
        assert!(ok.success(), "ip failed");
    }
}

/// A child of the cgroup2 root that the test process is in while this lives, and a BPF
/// filesystem of the test's.
struct Host {
    cgroup: PathBuf,
    root: PathBuf,
    bpffs: PathBuf,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Host {
    fn new() -> Host {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = sys::find_cgroup2(&info).expect("a cgroup2 mount");
        let cgroup = root.join(unique("cg"));
        std::fs::create_dir(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        let bpffs = std::env::temp_dir().join(unique("bpffs"));
        sys::mount_bpffs(&bpffs).unwrap();
        Host {
            cgroup,
            root,
            bpffs,
            _serial: serial,
        }
    }

    fn config(&self, instance: &str) -> BpfConfig {
        BpfConfig {
            instance: instance.into(),
            cgroup: Some(self.cgroup.clone()),
            bpffs: self.bpffs.clone(),
            netns_only: true,
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(500),
            ..BpfConfig::default()
        }
    }

    /// Names of the programs attached to the test cgroup, by bpftool.
    fn attached(&self) -> Vec<(u64, String)> {
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&self.cgroup)
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["id"].as_u64().unwrap_or(0),
                    p["name"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.root.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = sys::unmount(&self.bpffs);
        let _ = std::fs::remove_dir(&self.bpffs);
    }
}

/// TCP backends that answer every connection with their name, then echo.
fn tcp_backend(ns: &Netns, addr: &str, name: &'static str) -> (SocketAddr, Arc<TcpListener>) {
    let addr = addr.to_string();
    let l = Arc::new(ns.run(move || TcpListener::bind(addr).expect("bind backend")));
    let a = l.local_addr().unwrap();
    let l2 = Arc::clone(&l);
    std::thread::spawn(move || {
        for s in l2.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.write_all(name.as_bytes());
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (a, l)
}

/// A UDP backend that answers each datagram with its name and the datagram.
fn udp_backend(ns: &Netns, addr: &str, name: &'static str) -> SocketAddr {
    let addr = addr.to_string();
    let s = ns.run(move || UdpSocket::bind(addr).expect("bind udp backend"));
    let a = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut out = name.as_bytes().to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from);
        }
    });
    a
}

fn key(addr: &str, protocol: Protocol) -> VipKey {
    let a: SocketAddr = addr.parse().unwrap();
    VipKey {
        ip: a.ip(),
        port: a.port(),
        protocol,
    }
}

fn table(version: u64, vips: &[(VipKey, Vec<(SocketAddr, BackendState)>)]) -> Arc<VipTable> {
    Arc::new(VipTable::new(
        version,
        vips.iter().map(|(k, bs)| Vip {
            key: *k,
            name: None,
            backends: bs
                .iter()
                .map(|(a, s)| Backend {
                    addr: *a,
                    state: *s,
                    app: "/app".into(),
                    task: format!("app.{a}").into(),
                })
                .collect(),
        }),
    ))
}

/// Connect to `vip` from inside `ns`: the backend's name, and the peer the socket reports.
fn tcp_get(ns: &Netns, vip: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        Ok((
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            s.peer_addr()?,
        ))
    })
}

const A: BackendState = BackendState::Active;

#[test]
fn tcp_udp_ipv6_translated_and_the_vip_is_the_peer() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    let (b1, _l1) = tcp_backend(&ns, "127.0.0.1:0", "b1");
    let (b2, _l2) = tcp_backend(&ns, "127.0.0.1:0", "b2");
    let (b6, _l6) = tcp_backend(&ns, "[::1]:0", "b6");
    let u1 = udp_backend(&ns, "127.0.0.1:0", "u1");
    let vip = key("198.18.0.1:80", Protocol::Tcp);
    let vip6 = key("[fd00:18::1]:80", Protocol::Tcp);
    let uvip = key("198.18.0.1:53", Protocol::Udp);
    let cfg = host.config(&unique("agent"));
    let t = table(
        1,
        &[
            (vip, vec![(b1, A), (b2, A)]),
            (vip6, vec![(b6, A)]),
            (uvip, vec![(u1, A)]),
        ],
    );
    let (kp, ops) = ns.run(move || {
        let mut kp = KernelPath::load(&cfg).expect("load");
        let ops = kp.apply(&t, &Ejected::default()).expect("apply");
        (kp, ops)
    });
    assert!(ops > 0);
    assert_eq!(
        host.attached()
            .iter()
            .filter(|(_, n)| n.starts_with("l4lb_"))
            .count(),
        8
    );

    // TCP: a backend answers, the socket's peer is the VIP; spread over both backends.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let (name, peer) = tcp_get(&ns, vip.socket_addr()).expect("connect to the VIP");
        assert_eq!(peer, vip.socket_addr(), "getpeername shows the VIP");
        *seen.entry(name).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Uniform over two: each gets 100 ± 5 sigma (≈35).
    assert!(seen.values().all(|n| *n >= 65), "{seen:?}");
    let counted: u64 = kp
        .counters()
        .iter()
        .filter(|(k, _, _)| **k == vip)
        .map(|(_, _, c)| c.connections)
        .sum();
    assert_eq!(counted, 200, "the kernel counted every connection");
    // The batched read (what `counters` uses) agrees with one lookup per counter.
    let n = kp.planner_counter_ids_issued();
    let batched = kp.counters_batched(n).expect("batched per-CPU array read");
    let each = kp.counters_each(n);
    for (_, _, id) in kp.planner_counters() {
        assert_eq!(batched[id as usize], each[id as usize], "counter {id}");
    }
    assert!(each.iter().any(|c| c.connections > 0));
    for ((_, b), c) in kp
        .counters()
        .by_pair()
        .iter()
        .filter(|((k, _), _)| *k == vip)
    {
        let name = if *b == b1 { "b1" } else { "b2" };
        assert_eq!(c.connections as usize, seen[name], "{b}");
    }

    // IPv6, and a dual-stack socket to the IPv4 VIP's mapped address.
    let (name, peer) = tcp_get(&ns, vip6.socket_addr()).expect("v6");
    assert_eq!((name.as_str(), peer), ("b6", vip6.socket_addr()));
    let mapped: SocketAddr = "[::ffff:198.18.0.1]:80".parse().unwrap();
    let (name, peer) = tcp_get(&ns, mapped).expect("v4-mapped");
    assert!(name == "b1" || name == "b2", "{name}");
    assert_eq!(peer, mapped);

    // Connected and unconnected UDP: replies appear to come from the VIP.
    let uv = uvip.socket_addr();
    let (connected, unconnected) = ns.run(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect(uv).unwrap();
        s.send(b"ping").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).unwrap();
        let connected = (
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            s.peer_addr().unwrap(),
        );
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(b"pong", uv).unwrap();
        let (n, from) = s.recv_from(&mut buf).unwrap();
        (
            connected,
            (String::from_utf8_lossy(&buf[..n]).into_owned(), from),
        )
    });
    assert_eq!(connected, ("u1ping".to_string(), uv));
    assert_eq!(unconnected, ("u1pong".to_string(), uv));
    let c = kp.counters().by_pair()[&(uvip, u1)];
    assert_eq!((c.connections, c.datagrams), (1, 1));

    // A socket of another namespace, in the same cgroup, is left alone: it reaches what
    // that namespace has at the VIP address.
    let other = Netns::new();
    other.ip(&["addr", "add", "198.18.0.1/32", "dev", "lo"]);
    let (_o, _lo) = tcp_backend(&other, "198.18.0.1:80", "other");
    assert_eq!(tcp_get(&other, vip.socket_addr()).unwrap().0, "other");

    kp.close().expect("close");
    assert!(host.attached().is_empty(), "{:?}", host.attached());
    assert!(!host.bpffs.join("l4lb").exists(), "everything unpinned");
}

#[test]
fn backend_change_and_vip_removal_while_connections_are_open() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    // The VIP address is local, with a listener standing in for the proxy (the fallback).
    ns.ip(&["addr", "add", "198.18.0.2/32", "dev", "lo"]);
    let vip = key("198.18.0.2:80", Protocol::Tcp);
    let (_proxy, _lp) = tcp_backend(&ns, "198.18.0.2:80", "proxy");
    let (b1, _l1) = tcp_backend(&ns, "127.0.0.1:0", "b1");
    let (b2, _l2) = tcp_backend(&ns, "127.0.0.1:0", "b2");
    let cfg = host.config(&unique("agent"));
    let mut kp = ns.run(move || KernelPath::load(&cfg).expect("load"));
    let none = Ejected::default();
    kp.apply(&table(1, &[(vip, vec![(b1, A)])]), &none).unwrap();

    // An open connection to b1 (direct: the kernel translated it once).
    let va = vip.socket_addr();
    let mut open = ns.run(move || {
        let mut s = TcpStream::connect(va).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"b1");
        s
    });

    // b1 leaves, b2 comes: new connections go to b2 only, the open one still works.
    kp.apply(&table(2, &[(vip, vec![(b2, A)])]), &none).unwrap();
    for _ in 0..20 {
        assert_eq!(tcp_get(&ns, va).unwrap().0, "b2");
    }
    open.write_all(b"still").unwrap();
    let mut buf = [0u8; 5];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still");

    // Only draining backends: no translation, the proxy listener on the VIP address serves.
    kp.apply(
        &table(3, &[(vip, vec![(b2, BackendState::Draining)])]),
        &none,
    )
    .unwrap();
    assert_eq!(tcp_get(&ns, va).unwrap().0, "proxy");

    // VIP removed: same, and the open connection still works.
    kp.apply(&table(4, &[(vip, vec![(b2, A)])]), &none).unwrap();
    assert_eq!(tcp_get(&ns, va).unwrap().0, "b2");
    kp.apply(&table(5, &[]), &none).unwrap();
    assert_eq!(tcp_get(&ns, va).unwrap().0, "proxy");
    assert_eq!(kp.installed_count(), 0);
    open.write_all(b"again").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again");
    kp.close().unwrap();
}

/// Whether `r` is the error a destroyed socket reports (or the one a UDP socket it
/// disconnected gives on its next send).
fn aborted<T>(r: &std::io::Result<T>) -> bool {
    matches!(
        r.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(
            libc::ECONNABORTED | libc::EDESTADDRREQ | libc::ECONNRESET
        ))
    )
}

#[test]
fn sockets_translated_to_a_gone_backend_are_destroyed_and_direct_ones_kept() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    let (b1, _l1) = tcp_backend(&ns, "127.0.0.1:0", "b1");
    let u1 = udp_backend(&ns, "127.0.0.1:0", "u1");
    let tvip = key("198.18.0.7:80", Protocol::Tcp);
    let uvip = key("198.18.0.7:53", Protocol::Udp);
    let cfg = host.config(&unique("agent"));
    let t = table(1, &[(tvip, vec![(b1, A)]), (uvip, vec![(u1, A)])]);
    let (tv, uv) = (tvip.socket_addr(), uvip.socket_addr());
    ns.run(move || {
        let mut kp = KernelPath::load(&cfg).expect("load");
        assert_eq!(
            kp.closes_sockets(),
            Ok(()),
            "this kernel runs the socket iterators"
        );
        kp.apply(&t, &Ejected::default()).expect("apply");
        let udp = |to: SocketAddr| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.connect(to).unwrap();
            s.send(b"x").unwrap();
            let mut buf = [0u8; 64];
            s.recv(&mut buf).expect("an answer");
            s
        };
        let tcp = |to: SocketAddr| {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf).unwrap();
            s
        };
        let (via_vip, direct) = (udp(uv), udp(u1));
        let (mut tcp_via_vip, mut tcp_direct) = (tcp(tv), tcp(b1));
        // A pair nobody is connected through destroys nothing.
        assert_eq!(kp.destroy_sockets(&[(uvip, b1)]).unwrap(), 0);
        let n = kp.destroy_sockets(&[(uvip, u1), (tvip, b1)]).unwrap();
        assert_eq!(n, 2, "the two sockets connected via the VIPs");
        let mut buf = [0u8; 64];
        let first = via_vip.recv(&mut buf);
        assert!(aborted(&first), "{first:?}");
        let again = via_vip.send(b"x");
        assert!(
            again.is_err(),
            "the destroyed UDP socket is no longer connected"
        );
        let r = tcp_via_vip.read(&mut buf);
        assert!(aborted(&r) || matches!(r, Ok(0)), "{r:?}");
        // The ones connected to the backends directly still talk to them.
        direct.send(b"y").unwrap();
        let n = direct.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"u1y");
        tcp_direct.write_all(b"z").unwrap();
        tcp_direct.read_exact(&mut buf[..1]).unwrap();
        assert_eq!(&buf[..1], b"z");
        // The map of pairs is empty again: a later run destroys nothing.
        let (_again, _tcp_again) = (udp(uv), tcp(tv));
        assert_eq!(kp.destroy_sockets(&[]).unwrap(), 0);
        kp.close().unwrap();
    });
}

#[test]
fn a_dead_backend_stops_getting_connections_within_2s() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    let vip = key("198.18.0.3:80", Protocol::Tcp);
    let (b1, l1) = tcp_backend(&ns, "127.0.0.1:0", "b1");
    let (b2, _l2) = tcp_backend(&ns, "127.0.0.1:0", "b2");
    let cfg = host.config(&unique("agent"));
    let cfg2 = cfg.clone();
    let kp = ns.run(move || KernelPath::load(&cfg2).expect("load"));
    let (tx, rx) = tokio::sync::watch::channel(table(1, &[(vip, vec![(b1, A), (b2, A)])]));
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    let stats = KernelStats::default();
    let stats2 = stats.clone();
    // The agent (and so its probes) lives in the namespace.
    let driver = ns.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(kp, &cfg, rx, stats2, stop2, Default::default()))
    });
    let va = vip.socket_addr();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcp_get(&ns, va).map(|r| r.0).ok().as_deref() != Some("b1") {
        assert!(Instant::now() < deadline, "b1 never chosen");
    }

    // Kill b1 without telling the table: close its listener (connects are refused).
    let fd = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&*l1),
        nix::sys::socket::Shutdown::Both,
    );
    fd.expect("shutdown listener");
    drop(l1);
    let killed = Instant::now();
    // Connect until 30 in a row reach b2; the last one that did not (refused by dead b1)
    // bounds the time to ejection.
    let mut streak = 0;
    let mut last_bad = Duration::ZERO;
    while streak < 30 {
        assert!(killed.elapsed() < Duration::from_secs(5), "b1 still chosen");
        match tcp_get(&ns, va) {
            Ok((name, _)) if name == "b2" => streak += 1,
            _ => {
                streak = 0;
                last_bad = killed.elapsed();
            }
        }
    }
    // Every connection that reached a backend was counted by the kernel (read back every s).
    std::thread::sleep(Duration::from_millis(1200));
    let counted = stats.backend(&vip, b2).expect("b2 counted").connections;
    assert!(counted >= 30, "{counted}");
    eprintln!("dead backend: last connection sent to it {last_bad:?} after the kill");
    assert!(last_bad < Duration::from_secs(2), "{last_bad:?}");
    stop.cancel();
    driver.join().unwrap().unwrap();
    drop(tx);
    assert!(host.attached().is_empty());
}

#[test]
fn restart_after_kill_takes_over_without_a_gap() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    let vip = key("198.18.0.4:80", Protocol::Tcp);
    let (b1, _l1) = tcp_backend(&ns, "127.0.0.1:0", "b1");
    let (b2, _l2) = tcp_backend(&ns, "127.0.0.1:0", "b2");
    let instance = unique("agent");
    let cfg = host.config(&instance);
    let home = host.bpffs.join("l4lb").join(&instance);
    let t1 = table(1, &[(vip, vec![(b1, A)])]);
    let (cfg1, t) = (cfg.clone(), Arc::clone(&t1));
    let first = ns.run(move || {
        let mut kp = KernelPath::load(&cfg1).expect("load");
        kp.apply(&t, &Ejected::default()).unwrap();
        kp
    });
    let old_ids = first.prog_ids();
    assert_eq!(old_ids.len(), 8);
    // As after SIGKILL: every descriptor closed, the pins left.
    first.abandon();
    assert!(home.join("link_l4lb_connect4").exists());
    assert_eq!(
        host.attached().len(),
        8,
        "pinned links keep the programs attached"
    );
    // A connection made by the old programs, held across the takeover.
    let held = ns.run(move || {
        let s = TcpStream::connect_timeout(&vip.socket_addr(), Duration::from_secs(2)).unwrap();
        assert_eq!(s.peer_addr().unwrap(), vip.socket_addr());
        s
    });

    // The new agent loads aside; the old programs serve until it has a table.
    let cfg2 = cfg.clone();
    let mut second = ns.run(move || KernelPath::load(&cfg2).expect("reload"));
    assert!(second.taking_over());
    assert_ne!(second.pin_dir(), home.as_path());
    let ids = |h: &Host| -> Vec<u32> { h.attached().iter().map(|(id, _)| *id as u32).collect() };
    assert_eq!(ids(&host), old_ids, "the old programs still serve");
    assert_eq!(tcp_get(&ns, vip.socket_addr()).unwrap().0, "b1");
    second.apply(&table(0, &[]), &Ejected::default()).unwrap();
    assert!(
        second.taking_over(),
        "the empty startup table does not take over"
    );
    assert_eq!(ids(&host), old_ids);
    assert_eq!(tcp_get(&ns, vip.socket_addr()).unwrap().0, "b1");

    // Its first table (now b2) goes into its maps, then it serves and the old ones go.
    second
        .apply(&table(2, &[(vip, vec![(b2, A)])]), &Ejected::default())
        .unwrap();
    assert!(!second.taking_over());
    assert_eq!(second.pin_dir(), home.as_path());
    let new_ids = second.prog_ids();
    let mut want = new_ids.clone();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(2);
    let attached_now = || {
        let mut now = ids(&host);
        now.sort();
        now
    };
    while attached_now() != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        attached_now(),
        want,
        "exactly the new programs are attached"
    );
    assert!(new_ids.iter().all(|id| !old_ids.contains(id)));
    assert_eq!(tcp_get(&ns, vip.socket_addr()).unwrap().0, "b2");
    assert_eq!(
        held.peer_addr().unwrap(),
        vip.socket_addr(),
        "the old reverse translation was carried over"
    );
    let leftovers: Vec<_> = std::fs::read_dir(host.bpffs.join("l4lb"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from(&instance)]);
    drop(held);
    second.close().unwrap();
    assert!(host.attached().is_empty());
    assert!(!host.bpffs.join("l4lb").exists());
    let progs = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .unwrap();
    let progs: serde_json::Value = serde_json::from_slice(&progs.stdout).unwrap_or_default();
    let live: Vec<u64> = progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    // Program release is deferred: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut left: Vec<u32> = old_ids.clone();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left.retain(|id| live.contains(&(*id as u64)) && prog_exists(*id));
    }
    assert!(left.is_empty(), "programs still loaded: {left:?}");
}

#[test]
fn stopped_before_taking_over_removes_the_old_path_too() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    let vip = key("198.18.0.5:80", Protocol::Tcp);
    let (b1, _l1) = tcp_backend(&ns, "127.0.0.1:0", "b1");
    let cfg = host.config(&unique("agent"));
    let t = table(1, &[(vip, vec![(b1, A)])]);
    let cfg1 = cfg.clone();
    let first = ns.run(move || {
        let mut kp = KernelPath::load(&cfg1).expect("load");
        kp.apply(&t, &Ejected::default()).unwrap();
        kp
    });
    first.abandon();
    let second = ns.run(move || KernelPath::load(&cfg).expect("reload"));
    assert!(second.taking_over());
    assert_eq!(host.attached().len(), 8);
    // A clean stop means no VIP translation on this host any more, old or new.
    second.close().unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !host.attached().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(host.attached().is_empty(), "{:?}", host.attached());
    assert!(!host.bpffs.join("l4lb").exists());
}

fn prog_exists(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn two_agents_in_two_namespaces_serve_their_own() {
    if !is_root() {
        return;
    }
    let host = Host::new();
    let (ns1, ns2) = (Netns::new(), Netns::new());
    let vip = key("198.18.0.5:80", Protocol::Tcp);
    let (b1, _l1) = tcp_backend(&ns1, "127.0.0.1:0", "ns1");
    let (b2, _l2) = tcp_backend(&ns2, "127.0.0.1:0", "ns2");
    let (c1, c2) = (host.config(&unique("a1")), host.config(&unique("a2")));
    let t1 = table(1, &[(vip, vec![(b1, A)])]);
    let t2 = table(1, &[(vip, vec![(b2, A)])]);
    let mut k1 = ns1.run(move || KernelPath::load(&c1).expect("load 1"));
    let mut k2 = ns2.run(move || KernelPath::load(&c2).expect("load 2"));
    k1.apply(&t1, &Ejected::default()).unwrap();
    k2.apply(&t2, &Ejected::default()).unwrap();
    assert_eq!(host.attached().len(), 16);
    for _ in 0..10 {
        assert_eq!(tcp_get(&ns1, vip.socket_addr()).unwrap().0, "ns1");
        assert_eq!(tcp_get(&ns2, vip.socket_addr()).unwrap().0, "ns2");
    }
    k1.close().unwrap();
    assert_eq!(host.attached().len(), 8);
    assert_eq!(tcp_get(&ns2, vip.socket_addr()).unwrap().0, "ns2");
    assert!(
        tcp_get(&ns1, vip.socket_addr()).is_err(),
        "agent 1's namespace is no longer served"
    );
    k2.close().unwrap();
    assert!(host.attached().is_empty());
}

#[test]
fn one_backend_change_on_10000_vips_applies_under_1ms() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    let backends: Vec<SocketAddr> = (0..3)
        .map(|i| format!("198.19.0.{}:8080", i + 1).parse().unwrap())
        .collect();
    let vips: Vec<(VipKey, Vec<(SocketAddr, BackendState)>)> = (0..10_000u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0xC612_0000 + i); // 198.18.0.0 + i
            let k = VipKey {
                ip: ip.into(),
                port: 80,
                protocol: Protocol::Tcp,
            };
            (k, backends.iter().map(|b| (*b, A)).collect())
        })
        .collect();
    let t0 = table(1, &vips);
    let cfg = host.config(&unique("agent"));
    let mut kp = ns.run(move || KernelPath::load(&cfg).expect("load"));
    let started = Instant::now();
    kp.apply(&t0, &Ejected::default()).unwrap();
    let full = started.elapsed();
    assert_eq!(kp.installed_count(), 10_000);

    // Each round: one VIP gains a fourth backend (or loses it again), sharing every other VIP
    // with the table before, as tables from the control plane do.
    let extra: SocketAddr = "198.19.0.9:8080".parse().unwrap();
    let mut prev = t0;
    let mut times = Vec::new();
    for round in 0..41u32 {
        let k = *prev
            .vips
            .keys()
            .nth((round as usize * 241) % 10_000)
            .unwrap();
        let mut next = (*prev).clone();
        next.version += 1;
        let mut v = (*next.vips[&k]).clone();
        if v.backends.iter().any(|b| b.addr == extra) {
            v.backends.retain(|b| b.addr != extra);
        } else {
            v.backends.push(Backend {
                addr: extra,
                state: A,
                app: "/app".into(),
                task: "app.extra".into(),
            });
            v.normalize();
        }
        next.vips.insert(k, Arc::new(v));
        let next = Arc::new(next);
        let started = Instant::now();
        let ops = kp.apply(&next, &Ejected::default()).unwrap();
        times.push(started.elapsed());
        assert!(ops <= 1 + 4 + 1 + 4, "O(change) map operations, got {ops}");
        assert_eq!(kp.installed(&k).len(), next.vips[&k].backends.len());
        prev = next;
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "10,000 VIPs: first apply {full:?}; one-backend change median {median:?}, max {:?}",
        times[times.len() - 1]
    );
    // The < 1 ms target is for an optimised build (benches/bpf.rs measures it); a debug
    // build spends most of that walking the 10,000-entry table diff.
    let bound = if cfg!(debug_assertions) { 20 } else { 1 };
    assert!(median < Duration::from_millis(bound), "median {median:?}");
    kp.close().unwrap();
}

/// Many short connections through the kernel path: every one is translated and counted once.
/// (Speed is the bench's job, `scripts/bench.sh`'s `bpf` column: a timed assertion here was at
/// the mercy of TIME_WAIT collisions between the direct and the translated runs.)
#[test]
fn every_short_connection_via_the_vip_is_translated_and_counted() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    let vip = key("198.18.0.6:80", Protocol::Tcp);
    // A backend that accepts and closes.
    let l = ns.run(|| TcpListener::bind("127.0.0.1:0").expect("bind"));
    let b = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    let cfg = host.config(&unique("agent"));
    let mut kp = ns.run(move || KernelPath::load(&cfg).expect("load"));
    kp.apply(&table(1, &[(vip, vec![(b, A)])]), &Ejected::default())
        .unwrap();
    let n = 2000;
    let started = Instant::now();
    ns.run(move || {
        for i in 0..n {
            let s = TcpStream::connect(vip.socket_addr())
                .unwrap_or_else(|e| panic!("connection {i} via the VIP: {e}"));
            assert_eq!(
                s.peer_addr().unwrap(),
                vip.socket_addr(),
                "getpeername shows the VIP"
            );
            drop(s);
        }
    });
    eprintln!(
        "{n} connections via the VIP in {:?} (information only; scripts/bench.sh measures)",
        started.elapsed()
    );
    assert_eq!(kp.counters().by_pair()[&(vip, b)].connections, n);
    kp.close().unwrap();
}

/// The agent process of [`restart_after_sigkill_of_a_real_process`]: loads and applies, says
/// so on stderr, then waits to be killed. Run only by that test (ignored otherwise).
#[test]
#[ignore = "run as a child process by restart_after_sigkill_of_a_real_process"]
fn child_agent_process() {
    let Ok(spec) = std::env::var("L4LB_BPF_CHILD") else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [bpffs, cgroup, instance, vip, backend] = parts[..] else {
        panic!("bad L4LB_BPF_CHILD {spec}");
    };
    let cfg = BpfConfig {
        instance: instance.into(),
        cgroup: Some(cgroup.into()),
        bpffs: bpffs.into(),
        netns_only: true,
        ..BpfConfig::default()
    };
    let mut kp = KernelPath::load(&cfg).expect("child load");
    let t = table(
        1,
        &[(key(vip, Protocol::Tcp), vec![(backend.parse().unwrap(), A)])],
    );
    kp.apply(&t, &Ejected::default()).expect("child apply");
    eprintln!("L4LB_CHILD_READY {}", kp.prog_ids().len());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn restart_after_sigkill_of_a_real_process() {
    use std::io::BufRead;
    let Some((host, ns)) = root_host() else {
        return;
    };
    let vip = key("198.18.0.7:80", Protocol::Tcp);
    let (b1, _l1) = tcp_backend(&ns, "127.0.0.1:0", "b1");
    let instance = unique("agent");
    let spec = format!(
        "{}|{}|{instance}|{}|{b1}",
        host.bpffs.display(),
        host.cgroup.display(),
        vip.socket_addr()
    );
    // Spawned from inside the namespace, so the child agent lives there.
    let exe = std::env::current_exe().unwrap();
    let mut child = ns.run(move || {
        Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "agent::bpf::tests::child_agent_process",
                "--nocapture",
            ])
            .env("L4LB_BPF_CHILD", spec)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the child agent")
    });
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("L4LB_CHILD_READY"));
    assert_eq!(ready.as_deref(), Some("L4LB_CHILD_READY 8"));
    let before = host.attached();
    assert_eq!(before.len(), 8);
    assert_eq!(tcp_get(&ns, vip.socket_addr()).unwrap().0, "b1");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    assert_eq!(
        host.attached(),
        before,
        "pinned links outlive the killed agent"
    );
    assert_eq!(
        tcp_get(&ns, vip.socket_addr()).unwrap().0,
        "b1",
        "and keep translating"
    );

    let cfg = host.config(&instance);
    let t = table(1, &[(vip, vec![(b1, A)])]);
    let kp = ns.run(move || {
        let mut kp = KernelPath::load(&cfg).expect("restart");
        kp.apply(&t, &Ejected::default()).expect("take over");
        kp
    });
    let after = host.attached();
    assert_eq!(after.len(), 8, "{after:?}");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "old programs detached: {after:?}"
    );
    assert_eq!(tcp_get(&ns, vip.socket_addr()).unwrap().0, "b1");
    kp.close().unwrap();
    assert!(host.attached().is_empty());
    assert!(!host.bpffs.join("l4lb").exists());
}

#[test]
fn mounts_a_bpf_filesystem_where_none_is_and_unmounts_it() {
    let Some((host, ns)) = root_host() else {
        return;
    };
    let dir = std::env::temp_dir().join(unique("nobpffs"));
    std::fs::create_dir(&dir).unwrap();
    assert!(!sys::is_bpffs(&dir));
    let mut cfg = host.config(&unique("agent"));
    cfg.bpffs = dir.clone();
    let kp = ns.run(move || KernelPath::load(&cfg).expect("load"));
    assert!(sys::is_bpffs(&dir), "mounted");
    assert!(kp.pin_dir().starts_with(&dir));
    assert!(kp.pin_dir().join("map_services").exists());
    assert_eq!(host.attached().len(), 8);
    kp.close().unwrap();
    assert!(!sys::is_bpffs(&dir), "unmounted at close");
    assert!(host.attached().is_empty());
    // close() removes the empty mount point too.
    assert!(!dir.exists() || std::fs::remove_dir(&dir).is_ok());
}
