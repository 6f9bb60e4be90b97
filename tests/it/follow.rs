//! Connected sockets follow the table (issue #20): a client with a connected UDP socket to an
//! IP VIP whose backend is removed and falls silent reaches the remaining backend within 2 s,
//! through the kernel path (its socket is destroyed, it reconnects through the VIP) and through
//! the proxy (the session moves) alike; in the kernel path a TCP connection to a removed
//! backend is closed when `--drain-timeout` expires, one made to that backend directly is not;
//! and a UDP VIP stays on the kernel path although its backends answer no TCP probe.
//! Root only: each test has its own network namespace and, for the kernel path, its own BPF
//! filesystem (unmounted on drop) and programs restricted to the namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::apps::{labelled_app, run_args, write_apps};
use crate::common::netns::NetNs;
use crate::common::process::{Log, Proc};
use crate::common::{BIN, wait_for};

/// The address the backends listen on, on the namespace's `eth0`.
const HOST: &str = "198.18.0.1";
/// What the client writes before its sequence number.
const TAG: &str = "follow-client:";

/// A BPF filesystem of the test's, unmounted (and removed) on drop.
pub(crate) struct Bpffs(pub(crate) tempfile::TempDir);

impl Bpffs {
    pub(crate) fn new() -> Bpffs {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(st.success(), "mount -t bpf {}", dir.path().display());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Pins a killed agent left keep its programs attached until their file system goes.
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plane {
    Bpf,
    Proxy,
}

/// A namespace with `eth0` (a bridge holding [`HOST`]) and an agent serving the apps file.
struct Node {
    ns: NetNs,
    file: std::path::PathBuf,
    _dir: tempfile::TempDir,
    agent: Proc,
    log: Log,
    api: SocketAddr,
    _bpffs: Option<Bpffs>,
}

impl Node {
    fn start(prefix: &str, plane: Plane, extra: &[&str]) -> (Node, impl Fn(&NetNs, &str) -> Value) {
        let ns = NetNs::with_eth0(prefix, &format!("{HOST}/15"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apps.json");
        write_apps(&file, vec![]);
        let bpffs = (plane == Plane::Bpf).then(Bpffs::new);
        let mut cmd = ns.command(BIN);
        cmd.args(run_args(
            &file,
            &["--vip-cidr", "198.18.128.0/17", "--shutdown-grace", "1s"],
        ));
        match &bpffs {
            Some(fs) => {
                let instance = format!("follow-{}", std::process::id());
                cmd.args(["--data-plane", "bpf", "--bpf-netns-only", "--bpf-instance"])
                    .arg(instance)
                    .arg("--bpffs")
                    .arg(fs.0.path());
            }
            None => {
                cmd.args(["--data-plane", "proxy"]);
            }
        }
        cmd.args(extra);
        let agent = Proc::spawn("l4lb", cmd);
        let log = agent.log();
        let api = log.addr("API listening", Duration::from_secs(20));
        log.wait_for("first table applied", Duration::from_secs(20));
        let vips = |ns: &NetNs, api: &str| -> Value {
            ns.get_json(&format!("http://{api}/v1/vips"))
                .unwrap_or(Value::Null)
        };
        let node = Node {
            ns,
            file,
            _dir: dir,
            agent,
            log,
            api,
            _bpffs: bpffs,
        };
        (node, vips)
    }

    /// Write the apps file: app `id` with `protocol` on `vip`, tasks at `backends`.
    fn apps(&self, apps: &[(&str, &str, &str, &[SocketAddr])]) {
        let apps: Vec<Value> = apps
            .iter()
            .map(|(id, vip, protocol, backends)| labelled_app(id, &[vip], protocol, backends))
            .collect();
        // Renamed into place: the agent never reads half a file.
        let tmp = self.file.with_extension("new");
        write_apps(&tmp, apps);
        std::fs::rename(&tmp, &self.file).unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGTERM: the agent detaches and unpins before the file system goes.
        self.agent.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.agent.exit_within(Duration::from_secs(10));
    }
}

/// The VIP `vip` of the agent's `/v1/vips`, once it lists `n` backends for it.
fn wait_vip(
    node: &Node,
    vips: &impl Fn(&NetNs, &str) -> Value,
    vip: &str,
    proto: &str,
    n: usize,
) -> Value {
    wait_for(
        &format!("{vip}/{proto} with {n} backends"),
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let all = vips(&node.ns, &node.api.to_string());
            all.as_array()?
                .iter()
                .find(|v| {
                    v["vip"] == vip
                        && v["protocol"] == proto
                        && v["backend"].as_array().map(Vec::len) == Some(n)
                })
                .cloned()
        },
    )
}

/// A UDP backend: answers each datagram with its name; records the client's sequence numbers
/// with when they came; stops reading (no answer, no ICMP) once `silent` is set.
struct UdpBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(u64, Instant)>>>,
    silent: Arc<AtomicBool>,
}

fn udp_backend(ns: &NetNs, name: &'static str) -> UdpBackend {
    let s = ns.run(|| async { UdpSocket::bind(format!("{HOST}:0")).unwrap() });
    let addr = s.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let silent = Arc::new(AtomicBool::new(false));
    let (seen2, silent2) = (Arc::clone(&seen), Arc::clone(&silent));
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            if silent2.load(Ordering::Relaxed) {
                // The socket stays open and unread: datagrams queue, nothing answers.
                std::thread::sleep(Duration::from_millis(20));
                if Arc::strong_count(&silent2) == 1 {
                    return;
                }
                continue;
            }
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                if Arc::strong_count(&silent2) == 1 {
                    return;
                }
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            if let Some(seq) = text.strip_prefix(TAG).and_then(|n| n.parse().ok()) {
                seen2.lock().unwrap().push((seq, Instant::now()));
            }
            let _ = s.send_to(name.as_bytes(), from);
        }
    });
    UdpBackend { addr, seen, silent }
}

impl UdpBackend {
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// When the first datagram sent at or after `seq` arrived.
    fn first_since(&self, seq: u64) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(s, _)| *s >= seq)
            .map(|(_, t)| *t)
    }
}

/// A client like statsd's: one connected UDP socket to `vip`, a datagram every 50 ms, a new
/// socket (connected through the VIP again) only when the socket reports an error.
struct Client {
    stop: Arc<AtomicBool>,
    seq: Arc<std::sync::atomic::AtomicU64>,
    reconnects: Arc<std::sync::atomic::AtomicU64>,
}

fn udp_client(ns: &NetNs, vip: SocketAddr) -> Client {
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reconnects = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (stop2, seq2, rec2) = (Arc::clone(&stop), Arc::clone(&seq), Arc::clone(&reconnects));
    let fd = std::fs::File::open(format!("/run/netns/{}", ns.name())).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let connect = || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(vip).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        };
        let mut s = connect();
        let mut buf = [0u8; 256];
        while !stop2.load(Ordering::Relaxed) {
            let n = seq2.fetch_add(1, Ordering::Relaxed);
            let sent = s.send(format!("{TAG}{n}").as_bytes());
            let mut failed = matches!(&sent, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock);
            loop {
                match s.recv(&mut buf) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                rec2.fetch_add(1, Ordering::Relaxed);
                s = connect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    Client {
        stop,
        seq,
        reconnects,
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The one test body, for both data planes.
fn connected_udp_client_reaches_the_remaining_backend_within_2s(plane: Plane) {
    let (node, vips) = Node::start("follow", plane, &[]);
    let b1 = udp_backend(&node.ns, "b1");
    let b2 = udp_backend(&node.ns, "b2");
    let vip = "198.18.5.5:53";
    // The port is labelled for TCP too, where nothing listens: the TCP VIP's backends fail
    // their probes; the UDP VIP must not care.
    node.apps(&[("/stats", vip, "udp,tcp", &[b1.addr, b2.addr])]);
    let v = wait_vip(&node, &vips, "198.18.5.5:53", "udp", 2);
    if plane == Plane::Bpf {
        assert_eq!(v["data_plane"], "bpf", "{v}");
        // Three probe rounds (500 ms each) later, still on the kernel path.
        std::thread::sleep(Duration::from_millis(1600));
        let v = wait_vip(&node, &vips, "198.18.5.5:53", "udp", 2);
        assert_eq!(
            v["data_plane"], "bpf",
            "a UDP VIP left the kernel path: {v}"
        );
        let t = wait_vip(&node, &vips, "198.18.5.5:53", "tcp", 2);
        assert_eq!(t["data_plane"], "proxy", "{t}");
        assert!(
            t["data_plane_reason"]
                .as_str()
                .unwrap_or("")
                .contains("ejected"),
            "{t}"
        );
    } else {
        assert_eq!(v["data_plane"], "proxy", "{v}");
        assert_eq!(v["data_plane_reason"], "--data-plane proxy", "{v}");
    }
    // The metric says the same, one series per VIP.
    let out = node.ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "2",
        &format!("http://{}/metrics", node.api),
    ]);
    let metrics = String::from_utf8_lossy(&out.stdout);
    let want = match plane {
        Plane::Bpf => [
            r#"l4lb_data_plane{vip="198.18.5.5:53/udp",plane="bpf",reason=""} 1"#,
            r#"l4lb_data_plane{vip="198.18.5.5:53/tcp",plane="proxy",reason="all_ejected"} 1"#,
        ],
        Plane::Proxy => [
            r#"l4lb_data_plane{vip="198.18.5.5:53/udp",plane="proxy",reason="configured"} 1"#,
            r#"l4lb_data_plane{vip="198.18.5.5:53/tcp",plane="proxy",reason="configured"} 1"#,
        ],
    };
    for line in want {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }

    let client = udp_client(&node.ns, vip.parse().unwrap());
    let (on, other) = wait_for(
        "the client's datagrams at a backend",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            if b1.count() >= 3 {
                Some((&b1, &b2))
            } else if b2.count() >= 3 {
                Some((&b2, &b1))
            } else {
                None
            }
        },
    );
    // Its backend leaves the table and falls silent: no answer, no ICMP.
    on.silent.store(true, Ordering::Relaxed);
    let from = client.seq.load(Ordering::Relaxed);
    let removed = Instant::now();
    node.apps(&[("/stats", vip, "udp,tcp", &[other.addr])]);
    let moved = wait_for(
        "the client's datagrams at the remaining backend",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || other.first_since(from),
    );
    let took = moved.saturating_duration_since(removed);
    eprintln!(
        "{plane:?}: the connected client reached the remaining backend {took:?} after the removal ({} reconnects)",
        client.reconnects.load(Ordering::Relaxed)
    );
    assert!(took < Duration::from_secs(2), "{plane:?}: {took:?}");
    if plane == Plane::Bpf {
        assert!(
            client.reconnects.load(Ordering::Relaxed) >= 1,
            "the socket was destroyed"
        );
        assert!(
            node.log
                .text()
                .contains("closed sockets connected to backends that left"),
            "{}",
            node.log.text()
        );
    }
    // And it stays there.
    let n = other.count();
    std::thread::sleep(Duration::from_millis(300));
    assert!(other.count() >= n + 3, "datagrams stopped after the move");
}

#[test]
fn root_bpf_connected_udp_client_follows_a_removed_silent_backend() {
    skip_unless_root!();
    connected_udp_client_reaches_the_remaining_backend_within_2s(Plane::Bpf);
}

#[test]
fn root_proxy_connected_udp_client_follows_a_removed_silent_backend() {
    skip_unless_root!();
    connected_udp_client_reaches_the_remaining_backend_within_2s(Plane::Proxy);
}

/// A TCP backend that first sends its name, then echoes.
fn tcp_backend(ns: &NetNs, name: &'static str) -> SocketAddr {
    let l = ns.run(|| async { TcpListener::bind(format!("{HOST}:0")).unwrap() });
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.write_all(name.as_bytes());
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Connect to `to` inside `ns`: the stream and the backend's name.
fn tcp_connect(ns: &NetNs, to: SocketAddr) -> (TcpStream, String) {
    let fd = std::fs::File::open(format!("/run/netns/{}", ns.name())).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        (s, String::from_utf8_lossy(&buf).into_owned())
    })
    .join()
    .unwrap()
}

/// One echo on `s`: `Ok` when it came back.
fn echo(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
}

#[test]
fn root_bpf_tcp_to_a_removed_backend_is_closed_when_the_drain_expires() {
    skip_unless_root!();
    let (node, vips) = Node::start("drain", Plane::Bpf, &["--drain-timeout", "1s"]);
    let b1 = tcp_backend(&node.ns, "b1");
    let b2 = tcp_backend(&node.ns, "b2");
    let vip: SocketAddr = "198.18.5.6:80".parse().unwrap();
    node.apps(&[("/web", "198.18.5.6:80", "tcp", &[b1, b2])]);
    let v = wait_vip(&node, &vips, "198.18.5.6:80", "tcp", 2);
    assert_eq!(v["data_plane"], "bpf", "{v}");
    // A connection through the VIP that landed on b1, and one made to b1 directly.
    let mut via_vip = wait_for(
        "a connection via the VIP on b1",
        Duration::from_secs(5),
        Duration::ZERO,
        || {
            let (s, name) = tcp_connect(&node.ns, vip);
            (name == "b1").then_some(s)
        },
    );
    let (mut direct, name) = tcp_connect(&node.ns, b1);
    assert_eq!(name, "b1");

    node.apps(&[("/web", "198.18.5.6:80", "tcp", &[b2])]);
    let removed = Instant::now();
    wait_vip(&node, &vips, "198.18.5.6:80", "tcp", 1);
    // Within the drain both still work.
    echo(&mut via_vip).expect("draining, not closed yet");
    echo(&mut direct).unwrap();
    let closed = wait_for(
        "the drained connection closed",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || echo(&mut via_vip).is_err().then(Instant::now),
    );
    let after = closed.saturating_duration_since(removed);
    eprintln!("drained connection closed {after:?} after the removal (--drain-timeout 1s)");
    assert!(
        after >= Duration::from_millis(900),
        "closed before the drain expired: {after:?}"
    );
    // The direct connection to the same backend is untouched.
    echo(&mut direct).expect("the direct connection still works");
    echo(&mut direct).unwrap();
}
