//! Root tests: l4lb as the resolver of a host (a network namespace), used unchanged by
//! resolvers no one here wrote. In one namespace: a dnsmasq at 198.18.0.53 plays the internet
//! (the only nameserver the host's resolv.conf lists); `l4lb run` listens on 198.51.100.1:53
//! (installed on its VIP interface, as DC/OS did), manages the namespace's resolv.conf
//! (`/etc/netns/<ns>/resolv.conf`, which `ip netns exec` bind-mounts) and forwards to what it
//! listed. Then glibc (`getent ahosts`, over UDP and TCP, bare names through `search`), Python,
//! Java and curl (to the VIP, by name, reaching the task), unbound
//! and BIND with l4lb's zones as primed stub zones, and dnsmasq with `server=/…/` each resolve
//! a VIP name, a task name and an internet name. The resolv.conf is back as it was after l4lb
//! exits.

use crate::common::{BIN, netns};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::NetNs;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const L4LB: &str = "198.51.100.1";
const INTERNET: &str = "198.18.0.53";
const WEB: &str = "web.marathon.l4lb.thisdcos.directory";
const TASK: &str = "cassandra.marathon.mesos";
const UPSTREAM_NAME: &str = "www.upstream.example";
const UPSTREAM_ADDR: &str = "198.18.99.1";
const TASK_HOSTS: [&str; 2] = ["198.18.1.1", "198.18.1.2"];

const APPS: &str = r#"{"apps": [
  {"id": "/web",
   "portDefinitions": [{"port": 0, "protocol": "tcp", "labels": {"VIP_0": "/web:80"}}],
   "tasks": [{"id": "web.1", "host": "198.18.1.1", "ports": [31000], "state": "TASK_RUNNING"}]},
  {"id": "/cassandra",
   "portDefinitions": [{"port": 0, "protocol": "tcp", "name": "native"}],
   "tasks": [
     {"id": "cassandra.1", "host": "198.18.1.1", "ports": [31001], "state": "TASK_RUNNING"},
     {"id": "cassandra.2", "host": "198.18.1.2", "ports": [31002], "state": "TASK_RUNNING"}]}
]}"#;

/// The namespace's resolv.conf as the host had it before l4lb.
const HOST_RESOLV_CONF: &str = "nameserver 198.18.0.53\nsearch marathon.mesos\noptions timeout:2\n";

/// `/etc/netns/<ns>/`, removed on drop.
struct EtcNetns(PathBuf);

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child killed (SIGKILL) on drop unless it already exited.
struct Daemon {
    what: &'static str,
    child: Child,
}

impl Daemon {
    fn spawn(ns: &NetNs, what: &'static str, cmd: &mut Command, log: &Path) -> Daemon {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = ns
            .spawn(cmd.stdin(Stdio::null()).stdout(out).stderr(err))
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        Daemon { what, child }
    }

    /// Still running? Panics with `log` if it exited.
    fn alive(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}):\n{}",
                self.what,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `dig` inside `ns` against `server` (`addr` or `addr:port`): its `+short` lines, or `None`
/// when no server answered.
fn dig(ns: &NetNs, server: &str, name: &str, qtype: &str, tcp: bool) -> Option<Vec<String>> {
    let (addr, port) = server.split_once(':').unwrap_or((server, "53"));
    let mut args = vec![
        "dig", "+short", "+time=3", "+tries=1", "-p", port, name, qtype,
    ];
    let at = format!("@{addr}");
    args.push(&at);
    if tcp {
        args.push("+tcp");
    }
    let out = ns.exec(&args);
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

/// Wait until `server` answers anything (any rcode).
fn wait_answering(ns: &NetNs, server: &str, probe: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while dig(ns, server, probe, "A", false).is_none() {
        assert!(Instant::now() < deadline, "{what} never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// dnsmasq in the foreground in `ns`, listening on `server` (`addr` or `addr:port`), with
/// `extra` options, its pid file and log (`<name>.log`) in `dir`; once it answers `probe`.
fn dnsmasq(
    ns: &NetNs,
    dir: &Path,
    name: &'static str,
    (server, probe): (&str, &str),
    extra: &[String],
) -> (Daemon, PathBuf) {
    let (addr, port) = server.split_once(':').unwrap_or((server, "53"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--log-facility=-",
    ])
    .arg(format!("--listen-address={addr}"))
    .arg(format!("--port={port}"))
    .arg(format!(
        "--pid-file={}",
        dir.join(format!("{name}.pid")).display()
    ))
    .args(extra);
    answering(ns, name, &mut cmd, log, (server, probe))
}

/// Spawn `cmd` as the DNS server `what` logging to `log`; once `server` answers `probe`.
fn answering(
    ns: &NetNs,
    what: &'static str,
    cmd: &mut Command,
    log: PathBuf,
    (server, probe): (&str, &str),
) -> (Daemon, PathBuf) {
    let daemon = Daemon::spawn(ns, what, cmd, &log);
    wait_answering(ns, server, probe, what);
    (daemon, log)
}

/// `getent ahosts name` inside `ns` (glibc's resolver reading the namespace's resolv.conf),
/// with `RES_OPTIONS` when given: the addresses, sorted and unique.
fn getent(ns: &NetNs, name: &str, res_options: Option<&str>) -> Vec<String> {
    let mut cmd = ns.command("getent");
    cmd.args(["ahosts", name]).stdin(Stdio::null());
    if let Some(o) = res_options {
        cmd.env("RES_OPTIONS", o);
    }
    let out = cmd.output().expect("getent");
    let mut addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn stock_resolvers_use_l4lb_unchanged() {
    skip_unless_root!();
    for p in ["dnsmasq", "unbound", "named", "dig", "getent"] {
        if !have(p) {
            eprintln!("note: skipping: {p} not installed (.ci/run installs it)");
            return;
        }
    }
    let ns = NetNs::new("dnsres");
    let etc = EtcNetns(PathBuf::from(format!("/etc/netns/{}", ns.name())));
    std::fs::create_dir_all(&etc.0).expect("mkdir /etc/netns/<ns>");
    let resolv_conf = etc.0.join("resolv.conf");
    std::fs::write(&resolv_conf, HOST_RESOLV_CONF).expect("write resolv.conf");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for a in [INTERNET, TASK_HOSTS[0], TASK_HOSTS[1]] {
        ns.exec_ok(&["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    // /web's task: an HTTP server on its host port.
    let www = d.join("www");
    std::fs::create_dir(&www).expect("mkdir");
    std::fs::write(www.join("hello.txt"), "hello through the VIP\n").expect("write");
    let web_log = d.join("web.log");
    let _web = Daemon::spawn(
        &ns,
        "web task",
        ns.command("python3")
            .args([
                "-m",
                "http.server",
                "31000",
                "--bind",
                TASK_HOSTS[0],
                "--directory",
            ])
            .arg(&www),
        &web_log,
    );

    // The internet.
    let (_internet, inet_log) = dnsmasq(
        &ns,
        d,
        "internet",
        (INTERNET, UPSTREAM_NAME),
        &[
            format!("--host-record={UPSTREAM_NAME},{UPSTREAM_ADDR}"),
            // A TTL, as a real upstream gives (dnsmasq's own default is 0, never cached),
            // and a log line per query, to count what reaches the internet.
            "--local-ttl=60".into(),
            "--log-queries".into(),
        ],
    );

    // l4lb, managing the namespace's resolv.conf.
    let apps = d.join("apps.json");
    std::fs::write(&apps, APPS).expect("apps file");
    let l4lb_log = d.join("l4lb.log");
    let mut l4lb = Daemon::spawn(
        &ns,
        "l4lb",
        ns.command(BIN)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .args(["--worker-threads", "2", "run", "--apps-file"])
            .arg(&apps)
            .args([
                "--interface-kind",
                "auto",
                "--dns-listen",
                &format!("{L4LB}:53"),
                "--dns-manage-resolv-conf",
                "--dns-resolv-conf",
            ])
            .arg(&resolv_conf)
            .args(["--api-listen", "127.0.0.1:62080", "--shutdown-grace", "1s"]),
        &l4lb_log,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let vip = loop {
        l4lb.alive(&l4lb_log);
        if let Some(a) = dig(&ns, L4LB, WEB, "A", false).filter(|a| !a.is_empty()) {
            break a;
        }
        assert!(Instant::now() < deadline, "l4lb never answered {WEB}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(vip.len(), 1, "{vip:?}");
    let tasks: Vec<String> = TASK_HOSTS.iter().map(|s| s.to_string()).collect();
    let upstream = vec![UPSTREAM_ADDR.to_string()];
    let managed = std::fs::read_to_string(&resolv_conf).expect("read resolv.conf");
    assert!(
        managed.contains(&format!("nameserver {L4LB}\n"))
            && managed.contains("search marathon.mesos"),
        "{managed}"
    );

    // glibc, over UDP and over TCP; a bare name through the search line.
    let upstream_asked = || {
        std::fs::read_to_string(&inet_log)
            .unwrap_or_default()
            .matches(&format!("query[A] {UPSTREAM_NAME} "))
            .count()
    };
    let asked_before = upstream_asked();
    for opts in [None, Some("use-vc")] {
        assert_eq!(getent(&ns, WEB, opts), vip, "glibc {opts:?}: VIP name");
        assert_eq!(getent(&ns, TASK, opts), tasks, "glibc {opts:?}: task name");
        assert_eq!(
            getent(&ns, "cassandra", opts),
            tasks,
            "glibc {opts:?}: search"
        );
        assert_eq!(
            getent(&ns, UPSTREAM_NAME, opts),
            upstream,
            "glibc {opts:?}: upstream"
        );
    }
    // l4lb's cache: glibc's second lookup (over TCP) of the internet name did not reach the
    // internet (its AAAA, NODATA without an SOA, is not cached and does).
    assert_eq!(
        upstream_asked() - asked_before,
        1,
        "A queries for {UPSTREAM_NAME} that reached the internet"
    );

    // Other programs, unchanged: Python, Java (both through the host's resolver), curl to the
    // VIP by name, through l4lb to the task.
    let py = ns
        .command("python3")
        .args([
            "-c",
            "import socket,sys\nfor n in sys.argv[1:]:\n  print(n, sorted({a[4][0] for a in socket.getaddrinfo(n, 80, socket.AF_INET)}))",
            WEB,
            TASK,
            UPSTREAM_NAME,
        ])
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&py.stdout),
        format!(
            "{WEB} {vip:?}\n{TASK} {tasks:?}\n{UPSTREAM_NAME} {upstream:?}\n",
            vip = vip,
            tasks = tasks,
            upstream = upstream
        )
        .replace('"', "'"),
        "python: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    if have("java") {
        let src = d.join("Resolve.java");
        std::fs::write(
            &src,
            "public class Resolve { public static void main(String[] a) throws Exception {\n\
             for (String n : a) { java.util.TreeSet<String> s = new java.util.TreeSet<>();\n\
             for (var x : java.net.InetAddress.getAllByName(n)) s.add(x.getHostAddress());\n\
             System.out.println(n + \" \" + s); } } }\n",
        )
        .expect("java source");
        let java = ns
            .command("java")
            .arg(&src)
            .args([WEB, TASK, UPSTREAM_NAME])
            .output()
            .expect("java");
        assert_eq!(
            String::from_utf8_lossy(&java.stdout),
            format!(
                "{WEB} [{}]\n{TASK} [{}]\n{UPSTREAM_NAME} [{}]\n",
                vip.join(", "),
                tasks.join(", "),
                upstream.join(", ")
            ),
            "java: {}",
            String::from_utf8_lossy(&java.stderr)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "3",
            &format!("http://{WEB}/hello.txt"),
        ]);
        if out.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "hello through the VIP\n"
            );
            break;
        }
        // (The task's HTTP server may still be starting.)
        assert!(
            Instant::now() < deadline,
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // unbound: l4lb's zones as stub zones with priming; everything else forwarded to l4lb.
    let unbound_conf = d.join("unbound.conf");
    std::fs::write(
        &unbound_conf,
        format!(
            "server:\n  interface: 127.0.0.1@5301\n  port: 5301\n  do-daemonize: no\n  \
             username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  pidfile: \"{dir}/unbound.pid\"\n  \
             use-syslog: no\n  do-ip6: no\n  module-config: \"iterator\"\n  \
             access-control: 127.0.0.0/8 allow\n  verbosity: 1\n\
             stub-zone:\n  name: \"l4lb.thisdcos.directory\"\n  stub-addr: {L4LB}\n  stub-prime: yes\n\
             stub-zone:\n  name: \"mesos\"\n  stub-addr: {L4LB}\n  stub-prime: yes\n\
             forward-zone:\n  name: \".\"\n  forward-addr: {L4LB}\n",
            dir = d.display()
        ),
    )
    .expect("unbound.conf");
    let (mut unbound, unbound_log) = answering(
        &ns,
        "unbound",
        ns.command("unbound").arg("-d").arg("-c").arg(&unbound_conf),
        d.join("unbound.log"),
        ("127.0.0.1:5301", "localhost"),
    );
    unbound.alive(&unbound_log);

    // BIND: stub zones (refreshed from l4lb, which must answer its NS name), forwarding
    // everything else to l4lb.
    let named_conf = d.join("named.conf");
    std::fs::write(
        &named_conf,
        format!(
            "options {{\n  directory \"{dir}\";\n  pid-file \"{dir}/named.pid\";\n  \
             listen-on port 5302 {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  \
             recursion yes;\n  allow-query {{ any; }};\n  dnssec-validation no;\n  \
             forwarders {{ {L4LB}; }};\n  forward only;\n}};\ncontrols {{ }};\n\
             zone \"l4lb.thisdcos.directory\" {{ type stub; masters {{ {L4LB}; }}; \
             file \"{dir}/l4lb.stub\"; forwarders {{ }}; }};\n\
             zone \"mesos\" {{ type stub; masters {{ {L4LB}; }}; file \"{dir}/mesos.stub\"; \
             forwarders {{ }}; }};\n",
            dir = d.display()
        ),
    )
    .expect("named.conf");
    let (mut named, named_log) = answering(
        &ns,
        "named",
        ns.command("named")
            .args(["-g", "-n", "1", "-c"])
            .arg(&named_conf),
        d.join("named.log"),
        ("127.0.0.1:5302", "localhost"),
    );
    // Ready once both stub zones are refreshed from l4lb (named writes their files then).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(d.join("l4lb.stub").exists() && d.join("mesos.stub").exists()) {
        named.alive(&named_log);
        assert!(
            Instant::now() < deadline,
            "named never loaded its stub zones:\n{}",
            std::fs::read_to_string(&named_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // dnsmasq: l4lb's zones by server=/…/, the rest to the internet.
    let (_dnsmasq, dnsmasq_log) = dnsmasq(
        &ns,
        d,
        "dnsmasq",
        ("127.0.0.1:5303", UPSTREAM_NAME),
        &[
            format!("--server=/l4lb.thisdcos.directory/{L4LB}"),
            format!("--server=/mesos/{L4LB}"),
            format!("--server={INTERNET}"),
        ],
    );

    for (server, what, log) in [
        ("127.0.0.1:5301", "unbound", &unbound_log),
        ("127.0.0.1:5302", "named", &named_log),
        ("127.0.0.1:5303", "dnsmasq", &dnsmasq_log),
    ] {
        // Each asked once, first time, no retry: a resolver that fails the first name after
        // priming (unbound's SERVFAIL, BIND's NXDOMAIN for ns.<zone>) fails here.
        let ctx = |name: &str| {
            let (addr, port) = server.split_once(':').unwrap_or((server, "53"));
            let full = ns.exec(&["dig", "-p", port, &format!("@{addr}"), name]);
            format!(
                "{what} {name}:\n{}\n{}",
                String::from_utf8_lossy(&full.stdout),
                std::fs::read_to_string(log).unwrap_or_default()
            )
        };
        for tcp in [false, true] {
            assert_eq!(
                dig(&ns, server, WEB, "A", tcp),
                Some(vip.clone()),
                "{}",
                ctx(WEB)
            );
            let got = dig(&ns, server, TASK, "A", tcp).map(sorted);
            assert_eq!(got, Some(tasks.clone()), "{}", ctx(TASK));
            let got = dig(&ns, server, UPSTREAM_NAME, "A", tcp);
            assert_eq!(got, Some(upstream.clone()), "{}", ctx(UPSTREAM_NAME));
        }
        let srv = dig(&ns, server, "_cassandra._tcp.marathon.mesos", "SRV", false).map(sorted);
        assert_eq!(
            srv,
            Some(vec![
                "0 0 31001 cassandra-1.cassandra.marathon.mesos.".to_string(),
                "0 0 31002 cassandra-2.cassandra.marathon.mesos.".to_string(),
            ]),
            "{}",
            ctx("SRV")
        );
    }
    // The DC/OS task zone, straight from l4lb.
    let auto = dig(
        &ns,
        L4LB,
        "cassandra.marathon.autoip.dcos.thisdcos.directory",
        "A",
        false,
    );
    assert_eq!(auto.map(sorted), Some(tasks.clone()));

    // l4lb exits on SIGTERM and puts the resolv.conf back.
    let pid = Pid::from_raw(i32::try_from(l4lb.child.id()).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Ok(Some(s)) = l4lb.child.try_wait() {
            break s;
        }
        assert!(Instant::now() < deadline, "l4lb did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{status}:\n{}",
        std::fs::read_to_string(&l4lb_log).unwrap_or_default()
    );
    assert_eq!(
        std::fs::read_to_string(&resolv_conf).expect("read resolv.conf"),
        HOST_RESOLV_CONF
    );
    assert!(!etc.0.join("resolv.conf.l4lb-orig").exists());
}
