//! A whole l4lb cluster in network namespaces, for the root end-to-end tests (harness only).

//! [`Cluster`] builds a switch, N hosts `198.18.0.N/15`, the fake Marathon (in this process,
//! listening inside host 1), one or two real `l4lb controller` processes (hosts 1 and 2) and a
//! real `l4lb agent` on every host. Backends are in-process servers bound inside a host
//! ([`Backend`]: HTTP and a line echo on one port, or UDP echo) or real `socat` processes
//! ([`Proc`]). Clients run inside a host: `dig`, `curl`, or Rust sockets created on a thread that
//! has entered the namespace ([`in_ns`]). Everything started is killed by PID on drop.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::marathon::{FakeMarathon, host_app};
use super::netns::{NetNs, Switch};
pub use super::process::Proc;
pub use super::wait_for;

pub const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
/// Port of the controllers' API (on their host address) and of the agents' API (on 127.0.0.1).
pub const API_PORT: u16 = 62080;
pub const DNS_PORT: u16 = 5454;
pub const ZONE: &str = "marathon.l4lb.thisdcos.directory";

/// Run `f` on a fresh thread that has entered network namespace `ns`; sockets it creates stay
/// in that namespace whichever thread uses them later.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            setns(&fd, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Median and worst of `samples` (sorted in place).
pub fn median_worst(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() - 1])
}

// ---------------------------------------------------------------------------------------------
// Backends

/// An in-process backend bound inside a host namespace. TCP: a request starting with `GET` gets
/// an HTTP/1.0 answer whose body is `name\n`; anything else is a line echo answering each line
/// with `name line` (a long-lived connection). UDP: every datagram is answered with `name payload`.
pub struct Backend {
    pub name: String,
    pub host: usize,
    pub addr: SocketAddr,
    /// Connections (TCP) or datagrams (UDP) served.
    pub served: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Backend {
    fn new(name: &str, host: usize, addr: SocketAddr) -> Self {
        Backend {
            name: name.to_string(),
            host,
            addr,
            served: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stop listening and drop every open connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_tcp_conn(
    s: tokio::net::TcpStream,
    name: String,
    served: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Ok(());
    }
    served.fetch_add(1, Ordering::SeqCst);
    if line.starts_with("GET ") {
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                break;
            }
        }
        let body = format!("{name}\n");
        let resp = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        w.write_all(resp.as_bytes()).await?;
        w.shutdown().await?;
        // Let the client close first: no RST for unread bytes.
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut rest).await;
        return Ok(());
    }
    loop {
        w.write_all(format!("{name} {}\n", line.trim_end()).as_bytes())
            .await?;
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hosts and the cluster

pub struct Host {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    /// The host's end of its link to the switch (holds `ip`).
    pub link: String,
    pub agent: Option<Proc>,
}

impl Host {
    pub fn name(&self) -> &str {
        self.ns.name()
    }
}

/// What [`Cluster::start`] builds.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub hosts: usize,
    pub controllers: usize,
    pub extra_controller_args: Vec<String>,
    pub extra_agent_args: Vec<String>,
}

impl ClusterSpec {
    pub fn new(hosts: usize, controllers: usize) -> Self {
        ClusterSpec {
            hosts,
            controllers,
            extra_controller_args: Vec::new(),
            extra_agent_args: data_plane_args(),
        }
    }
}

/// The agents' data-plane flags: the proxy unless `L4LB_TEST_DATA_PLANE=bpf`, which runs the
/// same scenarios with the kernel path (each agent restricted to its own host namespace, as
/// several agents share this kernel). `scripts/check.sh` runs the cluster suite both ways.
fn data_plane_args() -> Vec<String> {
    match kernel_path() {
        true => ["--data-plane", "bpf", "--bpf-netns-only"]
            .map(String::from)
            .to_vec(),
        false => Vec::new(),
    }
}

/// Whether this run tests the kernel path (`L4LB_TEST_DATA_PLANE=bpf`).
pub fn kernel_path() -> bool {
    std::env::var("L4LB_TEST_DATA_PLANE").as_deref() == Ok("bpf")
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub marathon: FakeMarathon,
    pub hosts: Vec<Host>,
    /// `controllers[i]` runs in `hosts[i]`.
    pub controllers: Vec<Option<Proc>>,
    procs: Vec<Proc>,
    next_task: AtomicUsize,
    tmp: tempfile::TempDir,
    /// With the kernel path: a BPF filesystem shared by the agents (each `ip netns exec` has
    /// its own /sys), so a killed agent's pins outlive it as on a real host; unmounted at drop.
    bpffs: Option<std::path::PathBuf>,
    rt: Option<tokio::runtime::Runtime>,
    _switch: Switch,
}

impl Cluster {
    /// Build the network, start Marathon, the controllers and the agents; wait until every
    /// agent is ready (first table applied).
    pub fn start(prefix: &str, spec: ClusterSpec) -> Cluster {
        assert!(spec.hosts >= spec.controllers.max(1) && spec.hosts < 200);
        let switch = Switch::new(&format!("{prefix}sw"));
        let mut hosts = Vec::new();
        for i in 1..=spec.hosts {
            let ns = NetNs::new(&format!("{prefix}h{i}"));
            let ip = Ipv4Addr::new(198, 18, 0, i as u8);
            let link = switch.attach(&ns, &format!("{ip}/15"));
            hosts.push(Host {
                ns,
                ip,
                link,
                agent: None,
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let h1 = hosts[0].ip;
        let std_listener = in_ns(hosts[0].name(), || {
            std::net::TcpListener::bind((h1, 0)).expect("binding the fake Marathon")
        });
        std_listener.set_nonblocking(true).unwrap();
        let marathon = rt.block_on(async {
            let l = tokio::net::TcpListener::from_std(std_listener).unwrap();
            FakeMarathon::start_on(l).await
        });
        let tmp = tempfile::tempdir().unwrap();
        let bpf = kernel_path() || spec.extra_agent_args.iter().any(|a| a == "bpf");
        let bpffs = bpf.then(|| {
            let dir = tmp.path().join("bpffs");
            std::fs::create_dir(&dir).unwrap();
            let st = std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&dir)
                .status()
                .expect("mount");
            assert!(st.success(), "mount -t bpf {}", dir.display());
            dir
        });
        let mut c = Cluster {
            spec: spec.clone(),
            marathon,
            hosts,
            controllers: Vec::new(),
            procs: Vec::new(),
            next_task: AtomicUsize::new(1),
            tmp,
            bpffs,
            rt: Some(rt),
            _switch: switch,
        };
        for i in 0..spec.controllers {
            let p = c.spawn_controller(i);
            c.controllers.push(Some(p));
        }
        for i in 0..spec.controllers {
            c.wait_controller(i);
        }
        for i in 0..spec.hosts {
            let p = c.spawn_agent(i);
            c.hosts[i].agent = Some(p);
        }
        for i in 0..spec.hosts {
            c.wait_agent_ready(i, Duration::from_secs(30));
        }
        c
    }

    pub fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().unwrap()
    }

    pub fn controller_url(&self, i: usize) -> String {
        format!("http://{}:{API_PORT}", self.hosts[i].ip)
    }

    fn spawn_controller(&self, i: usize) -> Proc {
        let host = &self.hosts[i];
        let mut cmd = host.ns.command(BIN);
        cmd.args(["--worker-threads", "2", "controller", "--marathon"])
            .arg(self.marathon.url())
            .arg("--api-listen")
            .arg(format!("{}:{API_PORT}", host.ip))
            .args([
                "--vip-cidr",
                "198.18.128.0/17",
                "--resync-interval",
                "5s",
                "--allowed-vip-cidr",
                "198.18.0.0/15",
                "--marathon-timeout",
                "1s",
            ])
            .args(&self.spec.extra_controller_args);
        Proc::spawn(&format!("controller on host {}", i + 1), cmd)
    }

    fn wait_controller(&mut self, i: usize) {
        let p = self.controllers[i].as_mut().unwrap();
        p.wait_log("API listening", Duration::from_secs(30));
    }

    /// Start controller `i` again (after [`Cluster::kill_controller`]) and wait for its API.
    pub fn restart_controller(&mut self, i: usize) {
        let p = self.spawn_controller(i);
        self.controllers[i] = Some(p);
        self.wait_controller(i);
    }

    pub fn kill_controller(&mut self, i: usize) {
        if let Some(mut p) = self.controllers[i].take() {
            p.kill();
        }
    }

    pub fn spawn_agent(&self, i: usize) -> Proc {
        self.spawn_agent_with(i, &[])
    }

    /// [`Cluster::spawn_agent`] with `extra` flags after the usual ones.
    pub fn spawn_agent_with(&self, i: usize, extra: &[&str]) -> Proc {
        Proc::spawn(
            &format!("agent on host {}", i + 1),
            self.agent_command(i, extra),
        )
    }

    /// The command [`Cluster::spawn_agent_with`] runs.
    pub fn agent_command(&self, i: usize, extra: &[&str]) -> std::process::Command {
        let host = &self.hosts[i];
        let mut cmd = host.ns.command(BIN);
        cmd.args(["--worker-threads", "2", "agent"]);
        for c in 0..self.spec.controllers {
            cmd.arg("--controller").arg(self.controller_url(c));
        }
        cmd.args([
            "--interface-kind",
            "auto",
            "--dns-listen",
            &format!("127.0.0.1:{DNS_PORT}"),
            "--api-listen",
            &format!("127.0.0.1:{API_PORT}"),
            "--connect-timeout",
            "300ms",
            "--shutdown-grace",
            "5s",
        ])
        .args(&self.spec.extra_agent_args)
        .arg("--state-dir")
        .arg(self.state_dir());
        if let Some(fs) = &self.bpffs {
            cmd.arg("--bpffs")
                .arg(fs)
                .args(["--bpf-instance", &format!("h{}", i + 1)]);
        }
        cmd.args(extra);
        cmd
    }

    /// The BPF file system the agents pin into, when they run the kernel path.
    pub fn bpffs(&self) -> Option<&std::path::Path> {
        self.bpffs.as_deref()
    }

    /// Where the agents save their last table (one file per host namespace).
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.tmp.path().join("state")
    }

    pub fn agent(&mut self, i: usize) -> &mut Proc {
        self.hosts[i].agent.as_mut().expect("agent running")
    }

    /// Start the agent of host `i` (after it was stopped) without waiting.
    pub fn start_agent(&mut self, i: usize) {
        let p = self.spawn_agent(i);
        self.hosts[i].agent = Some(p);
    }

    #[track_caller]
    pub fn wait_agent_ready(&mut self, i: usize, within: Duration) {
        let ns = self.hosts[i].name().to_string();
        self.agent(i)
            .wait_alive("ready", within, Duration::from_millis(20), |_| {
                matches!(http_get_in(&ns, agent_api(), "/ready"), Ok((200, _)))
            });
    }

    // ----- Marathon

    /// A task id for a new task (unique in this cluster).
    pub fn next_task_no(&self) -> usize {
        self.next_task.fetch_add(1, Ordering::Relaxed)
    }

    /// Put `app` and tell the controllers (a `status_update_event` for its first task, or an
    /// `api_post_event` when it has none).
    pub fn deploy(&self, app: Value) {
        let id = app["id"].as_str().unwrap().to_string();
        let first = app["tasks"].as_array().and_then(|t| t.first()).map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                t["state"].as_str().unwrap().to_string(),
            )
        });
        self.marathon.put_app(app.clone());
        match first {
            Some((task, state)) => self.marathon.emit_status(&id, &task, &state),
            None => self.marathon.emit(
                "api_post_event",
                json!({"clientIp": "198.18.0.1", "uri": format!("/v2/apps{id}"),
                       "appDefinition": app, "eventType": "api_post_event",
                       "timestamp": "2017-07-19T17:34:41.967Z"}),
            ),
        }
    }

    /// Remove an app and emit `app_terminated_event`.
    pub fn destroy(&self, id: &str) {
        self.marathon.remove_app(id);
        self.marathon.emit(
            "app_terminated_event",
            json!({"appId": id, "eventType": "app_terminated_event",
                   "timestamp": "2017-07-19T17:34:41.967Z"}),
        );
    }

    // ----- Backends

    fn host_ns(&self, host: usize) -> String {
        self.hosts[host].name().to_string()
    }

    /// Starts in-process backend `name` on host `host`: `bind` binds its socket to the host's
    /// address (port 0) inside the host's namespace, and `serve(socket, name, served, stop)`
    /// serves it, non-blocking, on the cluster's runtime.
    fn backend<S, F>(
        &self,
        host: usize,
        name: &str,
        bind: impl FnOnce(Ipv4Addr) -> std::io::Result<S> + Send,
        serve: impl FnOnce(S, String, Arc<AtomicU64>, CancellationToken) -> F,
    ) -> Backend
    where
        S: AsFd + Send,
        F: Future<Output = ()> + Send + 'static,
    {
        let ip = self.hosts[host].ip;
        let s = in_ns(&self.host_ns(host), || bind(ip).unwrap());
        let sock = socket2::SockRef::from(&s);
        sock.set_nonblocking(true).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let b = Backend::new(name, host, addr);
        let serving = serve(s, name.to_string(), Arc::clone(&b.served), b.stop.clone());
        self.rt().spawn(serving);
        b
    }

    /// An in-process TCP backend (HTTP + line echo) on host `host` (0-based), ephemeral port.
    pub fn tcp_backend(&self, host: usize, name: &str) -> Backend {
        let bind = |ip| std::net::TcpListener::bind((ip, 0));
        self.backend(host, name, bind, |l, n, sv, st| async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let (s, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (n, sv, st) = (n.clone(), Arc::clone(&sv), st.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = serve_tcp_conn(s, n, sv) => {}
                    }
                });
            }
        })
    }

    /// An in-process UDP echo backend on host `host`, ephemeral port.
    pub fn udp_backend(&self, host: usize, name: &str) -> Backend {
        let bind = |ip| std::net::UdpSocket::bind((ip, 0));
        self.backend(host, name, bind, |s, n, sv, st| async move {
            let s = tokio::net::UdpSocket::from_std(s).unwrap();
            let mut buf = vec![0u8; 2048];
            loop {
                let (len, from) = tokio::select! {
                    _ = st.cancelled() => return,
                    r = s.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                };
                sv.fetch_add(1, Ordering::SeqCst);
                let mut out = format!("{n} ").into_bytes();
                out.extend_from_slice(&buf[..len]);
                let _ = s.send_to(&out, from).await;
            }
        })
    }

    /// A real process backend: `socat` answering HTTP with `name\n` on `host`'s address and
    /// `port`. Returns once it accepts connections.
    pub fn socat_backend(&self, host: usize, port: u16, name: &str) -> Proc {
        self.socat_backend_at(host, SocketAddr::from((self.hosts[host].ip, port)), name)
    }

    /// Like [`Cluster::socat_backend`], on `addr` (an IPv6 one too) of host `host`.
    pub fn socat_backend_at(&self, host: usize, addr: SocketAddr, name: &str) -> Proc {
        let port = addr.port();
        let body = format!("{name}\n");
        // A script, so that neither socat's nor the shell's quoting gets in the way. It reads
        // the request head first (no reset for unread bytes), then answers.
        let script = self.tmp.path().join(format!("backend-{name}-{port}.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nwhile IFS= read -r l; do [ \"$l\" = \"$(printf '\\r')\" ] && break; [ -z \"$l\" ] && break; done\n\
                 printf 'HTTP/1.0 200 OK\\r\\nContent-Length: {}\\r\\nConnection: close\\r\\n\\r\\n{name}\\n'\n",
                body.len()
            ),
        )
        .unwrap();
        let listen = match addr {
            SocketAddr::V4(a) => format!("TCP4-LISTEN:{port},bind={},fork,reuseaddr", a.ip()),
            SocketAddr::V6(a) => {
                format!(
                    "TCP6-LISTEN:{port},bind=[{}],fork,reuseaddr,ipv6only=1",
                    a.ip()
                )
            }
        };
        let mut cmd = self.hosts[host].ns.command("socat");
        cmd.arg(listen)
            .arg(format!("EXEC:/bin/sh {}", script.display()));
        let mut p = Proc::spawn(&format!("socat {name}"), cmd);
        let ns = self.host_ns(host);
        let start = Instant::now();
        while http_get_in(&ns, addr, "/").is_err() {
            if let Some(st) = p.try_exit() {
                panic!("socat {name} exited ({st}): {}", p.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "socat {name} not listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    /// A process that lives as long as the cluster (killed on drop).
    pub fn keep(&mut self, p: Proc) {
        self.procs.push(p);
    }

    // ----- Agents' view

    /// The agent of host `i`'s `/v1/vips`.
    pub fn agent_vips(&self, i: usize) -> Option<Vec<Value>> {
        match http_get_in(self.hosts[i].name(), agent_api(), "/v1/vips") {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// Indices of hosts whose agent runs.
    pub fn agent_hosts(&self) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|&i| self.hosts[i].agent.is_some())
            .collect()
    }

    /// Wait until `pred` holds for the table of every running agent; returns the time it took.
    #[track_caller]
    pub fn wait_agents(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Duration {
        let start = Instant::now();
        let hosts = self.agent_hosts();
        let mut last = Vec::new();
        loop {
            last.clear();
            let mut ok = true;
            for &i in &hosts {
                let t = self.agent_vips(i).unwrap_or_default();
                if !pred(&t) {
                    ok = false;
                }
                last.push(t);
            }
            if ok {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "agents: timed out after {within:?} waiting for {what}; tables: {}",
                serde_json::to_string(&last).unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until every agent serves `vip` (its `vip` field) with exactly `backends` as
    /// `(addr, state)`.
    #[track_caller]
    pub fn wait_backends(&self, vip: &str, backends: &[(SocketAddr, &str)]) -> Duration {
        let want: BTreeSet<(SocketAddr, String)> =
            backends.iter().map(|(a, s)| (*a, s.to_string())).collect();
        self.wait_agents(
            &format!("{vip} -> {want:?}"),
            Duration::from_secs(30),
            |t| backend_set(t, vip) == Some(want.clone()),
        )
    }

    /// The VIP's address as the agent of host `i` serves it.
    #[track_caller]
    pub fn vip_addr(&self, i: usize, vip: &str) -> SocketAddr {
        let t = self.agent_vips(i).expect("agent table");
        find_vip(&t, vip)
            .map(vip_socket)
            .unwrap_or_else(|| panic!("{vip} not in {t:?}"))
    }

    // ----- Clients

    /// `dig` the A record of `name` from host `i` (its agent's DNS).
    pub fn dig(&self, i: usize, name: &str) -> Vec<Ipv4Addr> {
        let out = self.hosts[i].ns.exec(&[
            "dig",
            "@127.0.0.1",
            "-p",
            &DNS_PORT.to_string(),
            "+short",
            "+time=2",
            "+tries=2",
            name,
            "A",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// `curl` `http://addr/` from host `i`: the body, or curl's error.
    pub fn curl(&self, i: usize, addr: SocketAddr) -> Result<String, String> {
        curl_in(&self.hosts[i].ns, addr)
    }

    /// One HTTP GET through an in-process client in host `i`: the body, or the error.
    pub fn get(&self, i: usize, addr: SocketAddr) -> Result<String, String> {
        match http_get_in(self.hosts[i].name(), addr, "/") {
            Ok((200, b)) => Ok(b.trim().to_string()),
            Ok((s, b)) => Err(format!("status {s}: {b}")),
            Err(e) => Err(e),
        }
    }

    /// Like [`Cluster::get`] but gives up connecting after 200 ms and reading after 500 ms (for
    /// polling while a VIP address may be missing, when a SYN goes unanswered or astray).
    pub fn get_quick(&self, i: usize, addr: SocketAddr) -> Result<String, String> {
        match in_ns(self.hosts[i].name(), || {
            http_get_timeout(
                addr,
                "/",
                Duration::from_millis(200),
                Duration::from_millis(500),
            )
        }) {
            Ok((200, b)) => Ok(b.trim().to_string()),
            Ok((s, b)) => Err(format!("status {s}: {b}")),
            Err(e) => Err(e),
        }
    }

    /// A TCP connection from inside host `i` (connect timeout 3 s).
    pub fn connect(&self, i: usize, addr: SocketAddr) -> std::io::Result<TcpStream> {
        in_ns(self.hosts[i].name(), || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        })
    }

    /// A UDP socket bound inside host `i` on an ephemeral port.
    pub fn udp_socket(&self, i: usize) -> UdpSocket {
        in_ns(self.hosts[i].name(), || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        })
    }

    /// Addresses on the VIP interface of host `i` (`ip -o -4 addr show dev minuteman`).
    pub fn minuteman_addrs(&self, i: usize) -> BTreeSet<String> {
        let out = self.hosts[i]
            .ns
            .exec(&["ip", "-o", "addr", "show", "dev", "minuteman"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.find(|x| *x == "inet" || *x == "inet6")?;
                w.next().map(str::to_string)
            })
            // The kernel's own IPv6 link-local address is not l4lb's business.
            .filter(|a| !a.starts_with("fe80:"))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if let Some(mut a) = h.agent.take() {
                a.kill();
            }
        }
        for c in &mut self.controllers {
            if let Some(mut p) = c.take() {
                p.kill();
            }
        }
        self.procs.clear();
        if let Some(fs) = self.bpffs.take() {
            // Killed agents' pins keep their programs attached until their file system goes.
            let _ = std::process::Command::new("umount").arg(&fs).status();
        }
        self.marathon.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        // Namespaces (hosts, then the switch) are deleted as the fields drop.
    }
}

// ---------------------------------------------------------------------------------------------
// Free helpers

pub fn agent_api() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, API_PORT))
}

/// An app with host networking (see [`host_app`]) and one task per `(host, port, state)`,
/// task numbers from `nos`.
pub fn app(
    id: &str,
    labels: &[&str],
    protocol: &str,
    tasks: &[(usize, Ipv4Addr, u16, &str)],
) -> Value {
    let mut a = host_app(id, labels, protocol);
    for (no, host, port, state) in tasks {
        let ports = vec![*port; labels.len()];
        super::marathon::add_task(
            &mut a,
            super::marathon::task(id, *no, &host.to_string(), &ports, state),
        );
    }
    a
}

/// The task id [`super::marathon::task`] gives task `no` of `app_id`.
pub fn task_id(app_id: &str, no: usize) -> String {
    super::marathon::task(app_id, no, "198.18.0.1", &[], "TASK_RUNNING")["id"]
        .as_str()
        .unwrap()
        .to_string()
}

pub fn find_vip<'a>(t: &'a [Value], vip: &str) -> Option<&'a Value> {
    t.iter().find(|v| v["vip"].as_str() == Some(vip))
}

pub fn vip_socket(v: &Value) -> SocketAddr {
    SocketAddr::new(
        v["ip"].as_str().unwrap().parse().unwrap(),
        v["port"].as_u64().unwrap() as u16,
    )
}

/// `(addr, state)` of every backend of `vip` in table `t`, or `None` when the VIP is absent.
pub fn backend_set(t: &[Value], vip: &str) -> Option<BTreeSet<(SocketAddr, String)>> {
    let v = find_vip(t, vip)?;
    Some(
        v["backend"]
            .as_array()?
            .iter()
            .map(|b| {
                (
                    SocketAddr::new(
                        b["ip"].as_str().unwrap().parse().unwrap(),
                        b["port"].as_u64().unwrap() as u16,
                    ),
                    b["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect(),
    )
}

pub fn curl_in(ns: &NetNs, addr: SocketAddr) -> Result<String, String> {
    let url = format!("http://{addr}/");
    let out = ns.exec(&["curl", "-sS", "--max-time", "5", &url]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "curl {url}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A blocking `GET path` to `addr` from inside namespace `ns`: `(status, body)`.
pub fn http_get_in(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    in_ns(ns, || http_get(addr, path))
}

/// A blocking HTTP/1.1 `GET path` (Connection: close), from the calling thread's namespace.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_get_timeout(addr, path, Duration::from_secs(3), Duration::from_secs(5))
}

/// [`http_get`] with a given connect timeout.
pub fn http_get_timeout(
    addr: SocketAddr,
    path: &str,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, connect_timeout)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(read_timeout))
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read {addr}: {e}"))?;
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no HTTP header in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: bad status line in {head:?}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Send `line` on a line-echo connection and read the answer line.
pub fn echo_line(s: &mut TcpStream, line: &str) -> std::io::Result<String> {
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = s.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&buf).to_string());
        }
        buf.push(byte[0]);
    }
}
