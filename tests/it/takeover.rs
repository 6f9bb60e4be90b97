//! `--take-over`: a second agent replaces a running one under load with nothing lost, in the
//! proxy and in the kernel data path. Clients in the host's namespace ask DNS (UDP, and TCP
//! every tenth query) and open a new connection through the VIP every 5 ms, and ten long
//! connections exchange a line every 200 ms (each living 2 s, well within the old agent's
//! 5 s --shutdown-grace, and replaced by a new one when it ends); every failure is counted.
//! Then a SIGTERM of the new agent still removes everything.

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;

use crate::common::cluster::{
    Cluster, ClusterSpec, DNS_PORT, ZONE, app, echo_line, http_get_timeout, in_ns,
};

const SEC: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    dns: Counts,
    connections: Counts,
    exchanges: Counts,
    /// The first failures, for the report.
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn count(&self, c: &Counts, r: Result<(), String>) {
        match r {
            Ok(()) => {
                c.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                let mut errs = self.errors.lock().unwrap();
                if errs.len() < 20 {
                    errs.push(e);
                }
            }
        }
    }

    fn get(c: &Counts) -> (u64, u64) {
        (
            c.ok.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
        )
    }
}

/// The clients, each on its own thread inside the host's namespace.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

/// One A query for `name`, over UDP or TCP to the agent's DNS; it must answer `want`.
fn dns_query(id: u16, name: &str, want: IpAddr, tcp: bool) -> Result<(), String> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(name).map_err(|e| e.to_string())?,
        RecordType::A,
    ));
    let bytes = q.to_vec().map_err(|e| e.to_string())?;
    let server = SocketAddr::from(([127, 0, 0, 1], DNS_PORT));
    let answer = if tcp {
        let mut s =
            TcpStream::connect_timeout(&server, SEC).map_err(|e| format!("dns tcp: {e}"))?;
        s.set_read_timeout(Some(2 * SEC))
            .map_err(|e| e.to_string())?;
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        s.write_all(&framed)
            .map_err(|e| format!("dns tcp write: {e}"))?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)
            .map_err(|e| format!("dns tcp read: {e}"))?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf)
            .map_err(|e| format!("dns tcp read: {e}"))?;
        buf
    } else {
        let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(SEC)).map_err(|e| e.to_string())?;
        s.send_to(&bytes, server)
            .map_err(|e| format!("dns udp send: {e}"))?;
        let mut buf = vec![0u8; 4096];
        let (n, _) = s.recv_from(&mut buf).map_err(|e| format!("dns udp: {e}"))?;
        buf.truncate(n);
        buf
    };
    let r = Message::from_vec(&answer).map_err(|e| format!("dns parse: {e}"))?;
    let ips: Vec<IpAddr> = r
        .answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    if r.metadata.response_code != ResponseCode::NoError || ips != [want] {
        return Err(format!(
            "dns: {:?} {ips:?} (tcp: {tcp})",
            r.metadata.response_code
        ));
    }
    Ok(())
}

impl Load {
    fn start(ns: &str, vip: SocketAddr, name: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut threads = Vec::new();
        let spawn = |threads: &mut Vec<JoinHandle<()>>, f: Box<dyn FnOnce() + Send>| {
            let ns = ns.to_string();
            threads.push(std::thread::spawn(move || in_ns(&ns, f)));
        };
        let (st, t, n) = (stop.clone(), tally.clone(), name.to_string());
        spawn(
            &mut threads,
            Box::new(move || {
                let mut i: u16 = 0;
                while !st.load(Ordering::Relaxed) {
                    i = i.wrapping_add(1);
                    t.count(&t.dns, dns_query(i, &n, vip.ip(), i.is_multiple_of(10)));
                    std::thread::sleep(Duration::from_millis(5));
                }
            }),
        );
        let (st, t) = (stop.clone(), tally.clone());
        spawn(
            &mut threads,
            Box::new(move || {
                while !st.load(Ordering::Relaxed) {
                    let r = match http_get_timeout(vip, "/", SEC, 2 * SEC) {
                        Ok((200, body)) if body.trim() == "web1" => Ok(()),
                        Ok((s, body)) => Err(format!("connection: {s} {body:?}")),
                        Err(e) => Err(format!("connection: {e}")),
                    };
                    t.count(&t.connections, r);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }),
        );
        for k in 0..10 {
            let (st, t) = (stop.clone(), tally.clone());
            spawn(
                &mut threads,
                Box::new(move || {
                    while !st.load(Ordering::Relaxed) {
                        let mut s = match TcpStream::connect_timeout(&vip, SEC) {
                            Ok(s) => s,
                            Err(e) => {
                                t.count(&t.connections, Err(format!("long {k}: {e}")));
                                continue;
                            }
                        };
                        let _ = s.set_read_timeout(Some(2 * SEC));
                        for j in 0..10 {
                            let line = format!("c{k}-{j}");
                            let r = match echo_line(&mut s, &line) {
                                Ok(got) if got == format!("web1 {line}") => Ok(()),
                                Ok(got) => Err(format!("long {k}: answered {got:?}")),
                                Err(e) => Err(format!("long {k} exchange {j}: {e}")),
                            };
                            let failed = r.is_err();
                            t.count(&t.exchanges, r);
                            if failed {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }),
            );
        }
        Load {
            stop,
            tally,
            threads,
        }
    }

    fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a client thread panicked");
        }
        self.tally
    }
}

/// The namespace inode of host `i`'s namespace (the agents name their files with it).
fn netns_ino(c: &Cluster, i: usize) -> u64 {
    std::fs::metadata(format!("/var/run/netns/{}", c.hosts[i].name()))
        .expect("the namespace's file")
        .ino()
}

fn take_over_under_load(prefix: &str, plane: &[&str]) {
    let mut spec = ClusterSpec::new(1, 1);
    spec.extra_agent_args = plane.iter().map(|s| s.to_string()).collect();
    let mut c = Cluster::start(prefix, spec);
    let b = c.tcp_backend(0, "web1");
    let no = c.next_task_no();
    let ip = c.hosts[0].ip;
    c.deploy(app(
        "/web",
        &["/web:80"],
        "tcp",
        &[(no, ip, b.port(), "TASK_RUNNING")],
    ));
    let web = format!("web.{ZONE}:80");
    c.wait_backends(&web, &[(b.addr, "active")]);
    let vip = c.vip_addr(0, &web);
    let addrs = c.minuteman_addrs(0);
    let load = Load::start(c.hosts[0].name(), vip, &format!("web.{ZONE}."));
    std::thread::sleep(SEC);

    let new = c.spawn_agent_with(0, &["--take-over"]);
    let mut old = c.hosts[0].agent.replace(new).expect("the first agent");
    let status = old.wait_exit(20 * SEC);
    assert!(
        status.success(),
        "the old agent: {status}\n{}",
        old.log_text()
    );
    assert!(old.log_has("handed over"), "{}", old.log_text());
    assert!(!old.log_has("VIP addresses removed"), "{}", old.log_text());
    c.wait_agent_ready(0, 10 * SEC);
    assert!(c.agent(0).log_has("taking over from the running agent"));
    if c.bpffs().is_some() {
        // The successor adopted the pinned programs; the old agent detached nothing.
        let new = c.agent(0);
        new.wait_log(
            "kernel data path taken over from the earlier agent",
            10 * SEC,
        );
        assert!(old.log_has("kernel data path left to the successor"));
        assert!(
            !old.log_has("kernel data path detached"),
            "{}",
            old.log_text()
        );
    }
    // Traffic through the successor alone for a while.
    std::thread::sleep(2 * SEC);
    let tally = load.stop();
    let (dns, conns, exch) = (
        Tally::get(&tally.dns),
        Tally::get(&tally.connections),
        Tally::get(&tally.exchanges),
    );
    println!(
        "{prefix}: take-over under load: DNS {} ok {} failed, connections {} ok {} failed, \
         exchanges {} ok {} failed",
        dns.0, dns.1, conns.0, conns.1, exch.0, exch.1
    );
    let errors = tally.errors.lock().unwrap().clone();
    assert_eq!((dns.1, conns.1, exch.1), (0, 0, 0), "{errors:#?}");
    assert!(
        dns.0 > 100 && conns.0 > 100 && exch.0 > 100,
        "too little load to judge"
    );
    assert_eq!(c.minuteman_addrs(0), addrs, "the addresses stayed");

    // A SIGTERM of the successor is still a stop: addresses, saved table, hand-over socket,
    // lock and pins all go.
    c.agent(0).stop_cleanly(20 * SEC);
    assert!(
        c.minuteman_addrs(0).is_empty(),
        "{:?}",
        c.minuteman_addrs(0)
    );
    let ino = netns_ino(&c, 0);
    let state = c.state_dir();
    for f in [
        format!("minuteman.{ino}.table.json"),
        format!("minuteman.{ino}.handoff.sock"),
    ] {
        assert!(!state.join(&f).exists(), "{f} left behind");
    }
    let lock = format!("/run/l4lb/minuteman.{ino}.lock");
    assert!(!std::path::Path::new(&lock).exists(), "{lock} left behind");
    if let Some(fs) = c.bpffs() {
        let pins = fs.join("l4lb");
        let left: Vec<_> = std::fs::read_dir(&pins)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "pins left: {left:?}");
    }
}

#[test]
fn proxy_take_over_loses_nothing() {
    skip_unless_root!();
    take_over_under_load("tkp", &["--data-plane", "proxy"]);
}

#[test]
fn kernel_path_take_over_loses_nothing() {
    skip_unless_root!();
    take_over_under_load("tkb", &["--data-plane", "bpf", "--bpf-netns-only"]);
}

/// SIGKILLs a process that is not our child (a successor the agent started) on drop.
struct Orphan(i32);

impl Drop for Orphan {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The unit's upgrade (`ExecReload=kill -USR2 $MAINPID`, `Type=notify`, `NotifyAccess=all`)
/// against a notify socket the test binds: READY=1 at start; on SIGUSR2 RELOADING=1 from the
/// old agent, then MAINPID=<new> and READY=1 from the successor it started with
/// `--take-over`; the old one exits 0; a SIGTERM of the new one sends STOPPING=1.
#[test]
fn sigusr2_upgrades_in_place_and_tells_systemd() {
    skip_unless_root!();
    let mut c = Cluster::start("tks", ClusterSpec::new(1, 1));
    c.agent(0).stop_cleanly(20 * SEC);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let fake = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    fake.set_read_timeout(Some(30 * SEC)).unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = fake.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let mut cmd = c.agent_command(0, &[]);
    cmd.env("NOTIFY_SOCKET", &path);
    let agent = crate::common::cluster::Proc::spawn("agent with NOTIFY_SOCKET", cmd);
    c.hosts[0].agent = Some(agent);
    assert_eq!(recv(), "READY=1\n");
    c.wait_agent_ready(0, 10 * SEC);
    let old_pid = c.agent(0).pid();
    c.agent(0).signal(nix::sys::signal::Signal::SIGUSR2);
    let reloading = recv();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let ready = recv();
    let new_pid: i32 = ready
        .strip_prefix("MAINPID=")
        .and_then(|r| r.strip_suffix("\nREADY=1\n"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{ready:?}"));
    let _guard = Orphan(new_pid);
    assert_ne!(new_pid as u32, old_pid);
    let cmdline = std::fs::read(format!("/proc/{new_pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect();
    assert_eq!(
        args.iter().filter(|a| *a == "--take-over").count(),
        1,
        "{args:?}"
    );
    let mut old = c.hosts[0].agent.take().unwrap();
    let status = old.wait_exit(20 * SEC);
    assert!(status.success(), "{status}\n{}", old.log_text());
    // The successor serves alone (its log goes to the old agent's stderr, inherited).
    crate::common::wait_for("the successor's API", 10 * SEC, SEC / 10, || {
        matches!(
            crate::common::cluster::http_get_in(
                c.hosts[0].name(),
                crate::common::cluster::agent_api(),
                "/ready"
            ),
            Ok((200, _))
        )
        .then_some(())
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(recv(), "STOPPING=1\n");
    crate::common::wait_for("the successor gone", 20 * SEC, SEC / 10, || {
        let stat = std::fs::read_to_string(format!("/proc/{new_pid}/stat")).ok();
        // Gone, or a zombie waiting for init.
        stat.is_none_or(|s| s.contains(") Z ")).then_some(())
    });
    assert!(c.minuteman_addrs(0).is_empty());
}
