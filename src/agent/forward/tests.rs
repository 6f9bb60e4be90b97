//! Loopback tests of the forwarder with real sockets: echo backends on port 0 that announce
//! their id, VIPs on 127.0.0.1 at a port found free by a throwaway bind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::model::test_util::backend;
use crate::model::{BackendState, Vip, VipKey, VipTable};

const T: Duration = Duration::from_secs(10);

/// A backend on a free loopback port. Over TCP it writes `b<id>\n` on connect, then echoes
/// until EOF, then half-closes; over UDP it answers each datagram with `b<id>:<payload>`.
struct Backend {
    id: u8,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(protocol: Protocol, id: u8) -> Self {
        let (addr, task) = match protocol {
            Protocol::Tcp => {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                (l.local_addr().unwrap(), tokio::spawn(serve_tcp(l, id)))
            }
            Protocol::Udp => {
                let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                (s.local_addr().unwrap(), tokio::spawn(serve_udp(s, id)))
            }
        };
        Backend { id, addr, task }
    }

    async fn tcp(id: u8) -> Self {
        Backend::start(Protocol::Tcp, id).await
    }

    async fn udp(id: u8) -> Self {
        Backend::start(Protocol::Udp, id).await
    }

    /// Stop serving: a TCP backend's listener closes (open connections stay, new connects
    /// are refused); a UDP backend's socket closes.
    fn kill(&self) {
        self.task.abort();
    }
}

async fn serve_tcp(l: TcpListener, id: u8) {
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            if w.write_all(format!("b{id}\n").as_bytes()).await.is_err() {
                return;
            }
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn serve_udp(s: UdpSocket, id: u8) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = s.recv_from(&mut buf).await {
        let mut reply = format!("b{id}:").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        let _ = s.send_to(&reply, from).await;
    }
}

/// A loopback VIP of `protocol` on a port found free by a throwaway bind.
fn free_vip(protocol: Protocol) -> VipKey {
    let a = match protocol {
        Protocol::Tcp => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap(),
        Protocol::Udp => std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap(),
    };
    VipKey {
        ip: a.ip(),
        port: a.port(),
        protocol,
    }
}

fn free_tcp_vip() -> VipKey {
    free_vip(Protocol::Tcp)
}

fn free_udp_vip() -> VipKey {
    free_vip(Protocol::Udp)
}

fn vip(key: VipKey, backends: &[(SocketAddr, BackendState)]) -> Vip {
    Vip {
        key,
        name: None,
        backends: backends
            .iter()
            .map(|(a, s)| backend(&a.to_string(), *s))
            .collect(),
    }
}

fn active(addrs: &[SocketAddr]) -> Vec<(SocketAddr, BackendState)> {
    addrs.iter().map(|a| (*a, BackendState::Active)).collect()
}

fn table(version: u64, vips: Vec<Vip>) -> VipTable {
    VipTable::new(version, vips)
}

/// Table `version` with one VIP, `key`, on `backends`, all active.
fn one_vip(version: u64, key: VipKey, backends: &[SocketAddr]) -> VipTable {
    table(version, vec![vip(key, &active(backends))])
}

/// A forwarder under test with its metrics and registry. It derefs to the [`Forwarder`] and
/// stops when dropped: listeners closed, open connections cut at once, so a test that ends
/// (or fails) leaves nothing serving. [`Fwd::shutdown`] is the agent's bounded drain.
struct Fwd {
    fwd: Option<Forwarder>,
    m: ForwardMetrics,
    reg: Registry,
}

impl Fwd {
    fn new(cfg: ForwardConfig) -> Self {
        let mut reg = Registry::with_prefix("l4lb");
        let m = ForwardMetrics::new(&mut reg);
        let fwd = Forwarder::new(cfg, m.clone(), CancellationToken::new());
        Fwd {
            fwd: Some(fwd),
            m,
            reg,
        }
    }

    /// A forwarder with `cfg` serving `key` on `backends` (all active) as table 1.
    async fn serving(cfg: ForwardConfig, key: VipKey, backends: &[SocketAddr]) -> Self {
        let mut f = Fwd::new(cfg);
        f.serve(1, key, backends).await;
        f
    }

    /// Apply table `version`: `key` on `backends`, all active.
    async fn serve(&mut self, version: u64, key: VipKey, backends: &[SocketAddr]) -> ApplyReport {
        self.apply(&one_vip(version, key, backends)).await
    }

    /// The same forwarder, changed by one of its test switches (`without_splice`, ...).
    fn with(mut self, f: impl FnOnce(Forwarder) -> Forwarder) -> Self {
        self.fwd = self.fwd.take().map(f);
        self
    }

    /// The metrics as `/metrics` shows them.
    fn scrape(&self) -> String {
        scrape(&self.reg)
    }

    /// The forwarder itself, no longer stopped on drop (a test that hands it over).
    fn into_inner(mut self) -> Forwarder {
        self.fwd.take().expect("a forwarder until shutdown")
    }

    /// Stop accepting and drain for up to `grace`, as the agent does on shutdown.
    async fn shutdown(mut self, grace: Duration) {
        if let Some(f) = self.fwd.take() {
            f.shutdown(grace).await;
        }
    }
}

impl std::ops::Deref for Fwd {
    type Target = Forwarder;
    fn deref(&self) -> &Forwarder {
        self.fwd.as_ref().expect("a forwarder until shutdown")
    }
}

impl std::ops::DerefMut for Fwd {
    fn deref_mut(&mut self) -> &mut Forwarder {
        self.fwd.as_mut().expect("a forwarder until shutdown")
    }
}

impl Drop for Fwd {
    fn drop(&mut self) {
        if let Some(f) = self.fwd.take() {
            f.accept_stop.cancel();
            f.ctx.hard_kill.cancel();
        }
    }
}

/// `n` backends of `protocol`, ids 0..n.
async fn backends(protocol: Protocol, n: u8) -> Vec<Backend> {
    let mut bs = Vec::new();
    for id in 0..n {
        bs.push(Backend::start(protocol, id).await);
    }
    bs
}

/// A UDP client on a fresh loopback port.
async fn udp_client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// One backend (id 0) behind a free VIP of `protocol`, served by a forwarder with `cfg`.
async fn one(protocol: Protocol, cfg: ForwardConfig) -> (Backend, VipKey, Fwd) {
    let b = Backend::start(protocol, 0).await;
    let key = free_vip(protocol);
    let fwd = Fwd::serving(cfg, key, &[b.addr]).await;
    (b, key, fwd)
}

/// The set-up most tests share: `n` backends (ids 0..n), a free VIP on loopback serving all
/// of them as active, and a forwarder with `cfg` that has applied that table.
struct Fixture {
    bs: Vec<Backend>,
    key: VipKey,
    fwd: Fwd,
    addrs: Vec<SocketAddr>,
}

impl Fixture {
    async fn new(protocol: Protocol, n: u8, cfg: ForwardConfig) -> Self {
        let bs = backends(protocol, n).await;
        let key = free_vip(protocol);
        let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
        let mut fwd = Fwd::new(cfg);
        let r = fwd.serve(1, key, &addrs).await;
        assert_eq!(r.bound, vec![key], "the VIP binds");
        Fixture {
            bs,
            key,
            fwd,
            addrs,
        }
    }
}

/// Expect the peer to close `s` (EOF, or an error) within `within`.
async fn assert_closed(s: &mut TcpStream, within: Duration, what: &str) {
    let mut buf = [0u8; 8];
    let n = timeout(within, s.read(&mut buf))
        .await
        .expect(what)
        .unwrap_or(0);
    assert_eq!(n, 0, "{what}");
}

/// Wait (up to `tries` times 20 ms) until `/metrics` no longer mentions `what`; the scrape.
async fn scrape_without(fwd: &Fwd, what: &str, tries: u32) -> String {
    for _ in 0..tries {
        if !fwd.scrape().contains(what) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fwd.scrape()
}

/// The default settings, with a drain timeout of `ms` milliseconds.
fn draining_for(ms: u64) -> ForwardConfig {
    ForwardConfig {
        drain_timeout: Some(Duration::from_millis(ms)),
        ..ForwardConfig::default()
    }
}

/// Connect to the VIP and read the backend's id line.
async fn open(vip: VipKey) -> (TcpStream, u8) {
    let mut s = timeout(T, TcpStream::connect(vip.socket_addr()))
        .await
        .unwrap()
        .unwrap();
    let mut id = [0u8; 3];
    timeout(T, s.read_exact(&mut id)).await.unwrap().unwrap();
    assert_eq!((id[0], id[2]), (b'b', b'\n'), "{id:?}");
    (s, id[1] - b'0')
}

/// Send `msg` and expect it echoed back.
async fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    timeout(T, s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, msg);
}

async fn udp_ask(s: &UdpSocket, vip: VipKey, msg: &str) -> String {
    s.send_to(msg.as_bytes(), vip.socket_addr()).await.unwrap();
    let mut buf = [0u8; 1024];
    let (n, from) = timeout(T, s.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(
        from,
        vip.socket_addr(),
        "reply must come from the VIP address"
    );
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn tcp_reaches_every_backend_evenly() {
    let Fixture {
        bs: _bs,
        key,
        fwd,
        addrs,
    } = Fixture::new(Protocol::Tcp, 3, ForwardConfig::default()).await;

    let mut hits = [0u32; 3];
    for _ in 0..300 {
        let (mut s, id) = open(key).await;
        echo(&mut s, b"ping").await;
        hits[id as usize] += 1;
    }
    for h in hits {
        assert!(h >= 60, "uneven spread: {hits:?}");
    }
    assert_eq!(fwd.m.connections.get(), 300);
    assert!(fwd.m.bytes_c2b.get() >= 300 * 4);
    let stats = fwd.stats();
    let total: u64 = addrs
        .iter()
        .map(|a| stats.backend(&key, *a).unwrap().bytes)
        .sum();
    // id line + echo per connection.
    assert!(total >= 300 * (3 + 4 + 4), "{total}");
}

#[tokio::test]
async fn tcp_dead_backend_costs_no_client_connection() {
    let Fixture {
        bs,
        key,
        fwd,
        addrs: _,
    } = Fixture::new(Protocol::Tcp, 3, ForwardConfig::default()).await;
    let (mut warm, _) = open(key).await;
    echo(&mut warm, b"x").await;

    bs[1].kill();
    tokio::task::yield_now().await;
    let mut seen = [0u32; 3];
    for _ in 0..60 {
        let (mut s, id) = open(key).await;
        echo(&mut s, b"still here").await;
        seen[id as usize] += 1;
    }
    assert_eq!(seen[1], 0, "{seen:?}");
    assert!(seen[0] > 0 && seen[2] > 0, "{seen:?}");
    // The dead backend was tried at most once before ejection (refused ejects at once).
    assert!(fwd.m.connections_retried.get() >= 1);
    assert!(fwd.stats().backend(&key, bs[1].addr).unwrap().ejected);
    // The connection opened before the kill still works.
    echo(&mut warm, b"y").await;
}

#[tokio::test]
async fn tcp_all_backends_dead_fails_cleanly() {
    let b = Backend::tcp(0).await;
    b.kill();
    tokio::task::yield_now().await;
    let key = free_tcp_vip();
    let fwd = Fwd::serving(ForwardConfig::default(), key, &[b.addr]).await;
    let mut s = TcpStream::connect(key.socket_addr()).await.unwrap();
    let mut buf = [0u8; 8];
    let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(fwd.m.connections_no_backend.get(), 1);
    assert_eq!(fwd.m.connections_refused.get(), 0);
}

#[tokio::test]
async fn tcp_connect_retries_bound_the_backends_one_connection_tries() {
    // Three dead backends: a refused connect ejects at once, so the number ejected after one
    // client connection is the number of backends it tried.
    for (retries, tried) in [(0, 1), (1, 2), (2, 3), (5, 3)] {
        let bs = backends(Protocol::Tcp, 3).await;
        for b in &bs {
            b.kill();
        }
        tokio::task::yield_now().await;
        let key = free_tcp_vip();
        let cfg = ForwardConfig {
            connect_retries: retries,
            ..ForwardConfig::default()
        };
        let mut fwd = Fwd::new(cfg);
        let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
        fwd.serve(1, key, &addrs).await;
        let mut s = TcpStream::connect(key.socket_addr()).await.unwrap();
        let mut buf = [0u8; 8];
        let n = timeout(T, s.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
        let ejected = addrs
            .iter()
            .filter(|a| fwd.stats().backend(&key, **a).unwrap().ejected)
            .count();
        assert_eq!(ejected, tried, "--connect-retries {retries}");
        assert_eq!(
            fwd.m.connections_retried.get(),
            tried as u64 - 1,
            "{retries}"
        );
        assert_eq!(fwd.m.connections_no_backend.get(), 1);
    }
}

#[tokio::test]
async fn tcp_draining_backend_keeps_open_connection_gets_no_new_one() {
    let Fixture {
        bs, key, mut fwd, ..
    } = Fixture::new(Protocol::Tcp, 2, ForwardConfig::default()).await;
    let (mut held, id) = open(key).await;
    let (drained, other) = (bs[id as usize].addr, bs[1 - id as usize].addr);

    let r = fwd
        .apply(&table(
            2,
            vec![vip(
                key,
                &[
                    (drained, BackendState::Draining),
                    (other, BackendState::Active),
                ],
            )],
        ))
        .await;
    assert!(r.bound.is_empty() && r.removed.is_empty());
    for _ in 0..30 {
        let (mut s, new_id) = open(key).await;
        assert_eq!(new_id, 1 - id, "draining backend got a new connection");
        echo(&mut s, b"n").await;
    }
    echo(&mut held, b"still flowing").await;
    let st = fwd.stats().backend(&key, drained).unwrap();
    assert_eq!(st.active_connections, 1);
}

#[tokio::test]
async fn tcp_table_change_leaves_staying_connections_intact() {
    let bs = backends(Protocol::Tcp, 3).await;
    let key = free_tcp_vip();
    let other_key = free_tcp_vip();
    let mut fwd = Fwd::new(ForwardConfig::default());
    let t1 = table(
        1,
        vec![
            vip(key, &active(&[bs[0].addr, bs[1].addr])),
            vip(other_key, &active(&[bs[2].addr])),
        ],
    );
    fwd.apply(&t1).await;
    // Hold a connection to each of backends 0 and 1.
    let mut held: HashMap<u8, TcpStream> = HashMap::new();
    while held.len() < 2 {
        let (s, id) = open(key).await;
        held.insert(id, s);
    }
    // Backend 1 leaves, backend 2 joins; the other VIP goes away.
    let t2 = one_vip(2, key, &[bs[0].addr, bs[2].addr]).share_with(&t1);
    let r = fwd.apply(&t2).await;
    assert!(r.bound.is_empty());
    assert_eq!(r.removed, vec![other_key]);
    for (_, s) in held.iter_mut() {
        echo(s, b"unchanged").await;
    }
    for _ in 0..20 {
        let (_, id) = open(key).await;
        assert_ne!(id, 1);
    }
    // The removed VIP stopped accepting.
    assert!(
        TcpStream::connect(other_key.socket_addr()).await.is_err(),
        "removed VIP still accepts"
    );
    // Stats follow the table.
    assert!(fwd.stats().backend(&key, bs[1].addr).is_none());
    assert!(fwd.stats().backend(&key, bs[2].addr).is_some());
}

#[tokio::test]
async fn tcp_drain_timeout_closes_connections_to_removed_backend() {
    let (_b, key, mut fwd) = one(Protocol::Tcp, draining_for(200)).await;
    let (mut held, _) = open(key).await;
    fwd.apply(&table(2, vec![vip(key, &[])])).await;
    echo(&mut held, b"within the drain timeout").await;
    let closes = "drain timeout did not close the connection";
    assert_closed(&mut held, Duration::from_secs(3), closes).await;
}

#[tokio::test]
async fn tcp_connection_cap_refuses_cleanly() {
    let cfg = ForwardConfig {
        max_connections: 2,
        ..ForwardConfig::default()
    };
    let (_b, key, fwd) = one(Protocol::Tcp, cfg).await;
    let (mut c1, _) = open(key).await;
    let (c2, _) = open(key).await;
    let mut c3 = TcpStream::connect(key.socket_addr()).await.unwrap();
    let mut buf = [0u8; 8];
    let n = timeout(T, c3.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "over the cap the connection must close at once");
    assert_eq!(fwd.m.connections_refused.get(), 1);
    // Nothing else degrades.
    echo(&mut c1, b"fine").await;
    drop(c2);
    // Once one closes, a new one gets in.
    let mut ok = false;
    for _ in 0..100 {
        let mut s = TcpStream::connect(key.socket_addr()).await.unwrap();
        let mut id = [0u8; 3];
        if timeout(T, s.read_exact(&mut id)).await.unwrap().is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok);
}

#[tokio::test]
async fn tcp_half_close_still_delivers_the_reply() {
    half_close(true).await;
}

#[tokio::test]
async fn tcp_half_close_with_copy_fallback() {
    half_close(false).await;
}

/// A forwarder with the default settings, splicing or (`splice` false) copying.
fn splicing(splice: bool) -> Fwd {
    match splice {
        true => Fwd::new(ForwardConfig::default()),
        false => Fwd::new(ForwardConfig::default()).with(Forwarder::without_splice),
    }
}

async fn half_close(splice: bool) {
    let b = Backend::tcp(4).await;
    let key = free_tcp_vip();
    let mut fwd = splicing(splice);
    fwd.serve(1, key, &[b.addr]).await;
    let mut s = TcpStream::connect(key.socket_addr()).await.unwrap();
    s.write_all(b"request body").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(T, s.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"b4\nrequest body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_large_transfer_is_byte_exact() {
    large_transfer(64 << 20, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_large_transfer_with_copy_fallback() {
    large_transfer(8 << 20, false).await;
}

/// Splice refused on the way out, mid-stream: what is already in the pipe is copied out, then
/// the direction copies; not a byte lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_large_transfer_when_splice_out_is_refused() {
    let fwd = Fwd::new(ForwardConfig::default()).with(Forwarder::refusing_splice_out);
    transfer_through(fwd, 8 << 20).await;
}

async fn large_transfer(len: usize, splice: bool) {
    transfer_through(splicing(splice), len).await;
}

/// `len` bytes through `fwd` to an echo backend and back, byte for byte.
async fn transfer_through(mut fwd: Fwd, len: usize) {
    let b = Backend::tcp(0).await;
    let key = free_tcp_vip();
    fwd.serve(1, key, &[b.addr]).await;
    let (s, _) = open(key).await;
    let (mut r, mut w) = s.into_split();
    // A cheap deterministic pattern that is not periodic at any small size.
    let data: Vec<u8> = (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let data = std::sync::Arc::new(data);
    let d2 = std::sync::Arc::clone(&data);
    let writer = tokio::spawn(async move {
        w.write_all(&d2).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(len);
    timeout(Duration::from_secs(120), r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), len);
    assert!(got == *data, "payload differs");
    assert_eq!(fwd.m.bytes_c2b.get(), len as u64);
    assert_eq!(fwd.m.bytes_b2c.get(), len as u64 + 3);
}

#[tokio::test]
async fn tcp_shutdown_stops_accepting_and_drains_with_deadline() {
    let Fixture {
        bs: _bs, key, fwd, ..
    } = Fixture::new(Protocol::Tcp, 1, ForwardConfig::default()).await;
    let (mut held, _) = open(key).await;
    let start = tokio::time::Instant::now();
    fwd.shutdown(Duration::from_millis(300)).await;
    assert!(start.elapsed() >= Duration::from_millis(300));
    let mut buf = [0u8; 8];
    let n = timeout(T, held.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "connection must be closed after the grace");
    assert!(TcpStream::connect(key.socket_addr()).await.is_err());
}

#[tokio::test]
async fn apply_reports_bind_failures_and_retries_them() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = squatter.local_addr().unwrap();
    let key = VipKey {
        ip: a.ip(),
        port: a.port(),
        protocol: Protocol::Tcp,
    };
    let b = Backend::tcp(0).await;
    let mut fwd = Fwd::new(ForwardConfig::default());
    let t = one_vip(1, key, &[b.addr]);
    let r = fwd.apply(&t).await;
    assert!(r.bound.is_empty());
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].0, key);
    drop(squatter);
    let r = fwd.apply(&t).await;
    assert_eq!(r.bound, vec![key]);
    let (_, id) = open(key).await;
    assert_eq!(id, 0);
}

#[tokio::test]
async fn udp_reaches_every_backend_and_sessions_stick() {
    let Fixture {
        bs: _bs, key, fwd, ..
    } = Fixture::new(Protocol::Udp, 3, ForwardConfig::default()).await;
    let mut hits: HashMap<String, u32> = HashMap::new();
    // Keep every client socket open so no client port is reused (that would be one session).
    let mut clients = Vec::new();
    for i in 0..90 {
        let c = udp_client().await;
        let first = udp_ask(&c, key, &format!("hello{i}")).await;
        let (id, payload) = first.split_once(':').unwrap();
        assert_eq!(payload, format!("hello{i}"));
        // The same client stays on the same backend.
        let again = udp_ask(&c, key, "again").await;
        assert_eq!(again, format!("{id}:again"));
        *hits.entry(id.to_string()).or_default() += 1;
        clients.push(c);
    }
    assert_eq!(hits.len(), 3, "{hits:?}");
    for h in hits.values() {
        assert!(*h >= 15, "uneven spread: {hits:?}");
    }
    assert_eq!(fwd.m.udp_c2b.get(), 180);
    assert_eq!(fwd.m.udp_b2c.get(), 180);
    assert_eq!(fwd.m.udp_sessions_active.get(), 90);
}

#[tokio::test]
async fn udp_sessions_move_when_their_backend_leaves() {
    let bs = backends(Protocol::Udp, 2).await;
    let key = free_udp_vip();
    let mut fwd = Fwd::new(ForwardConfig::default());
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let t1 = one_vip(1, key, &addrs);
    fwd.apply(&t1).await;
    let c = udp_client().await;
    let first = udp_ask(&c, key, "x").await;
    let id: usize = first[1..2].parse().unwrap();
    let (leaving, staying) = (bs[id].addr, bs[1 - id].addr);
    assert_eq!(
        fwd.stats()
            .backend(&key, leaving)
            .unwrap()
            .active_connections,
        1
    );

    fwd.apply(&one_vip(2, key, &[staying]).share_with(&t1))
        .await;
    assert_eq!(
        fwd.m.udp_sessions_active.get(),
        0,
        "session must drop at once"
    );
    let moved = udp_ask(&c, key, "y").await;
    assert_eq!(moved, format!("b{}:y", 1 - id));
    // The old backend is still up but gets nothing more from this client.
    let again = udp_ask(&c, key, "z").await;
    assert_eq!(again, format!("b{}:z", 1 - id));
    bs[id].kill();
}

#[tokio::test]
async fn udp_vip_removed_closes_its_socket_and_sessions() {
    let (_b, key, mut fwd) = one(Protocol::Udp, ForwardConfig::default()).await;
    let c = udp_client().await;
    assert_eq!(udp_ask(&c, key, "x").await, "b0:x");
    assert_eq!(fwd.m.udp_sessions_active.get(), 1);

    fwd.apply(&table(2, vec![])).await;
    // The address is free again: something else can bind it (without SO_REUSEADDR, which the
    // forwarder's socket had), and what a client sends there reaches that, not a backend.
    let deadline = Instant::now() + Duration::from_secs(2);
    let taker = loop {
        match UdpSocket::bind(key.socket_addr()).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "VIP socket still open: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    c.send_to(b"after", key.socket_addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = timeout(T, taker.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"after");
    assert_eq!(fwd.m.udp_sessions_active.get(), 0);
}

#[tokio::test]
async fn udp_sessions_expire_when_idle() {
    let cfg = ForwardConfig {
        udp_idle_timeout: Duration::from_millis(100),
        ..ForwardConfig::default()
    };
    let (_b, key, fwd) = one(Protocol::Udp, cfg).await;
    let c = udp_client().await;
    assert_eq!(udp_ask(&c, key, "a").await, "b0:a");
    assert_eq!(fwd.m.udp_sessions_active.get(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(fwd.m.udp_sessions_active.get(), 0);
    assert_eq!(udp_ask(&c, key, "b").await, "b0:b");
}

#[tokio::test]
async fn udp_session_cap_refuses_new_clients() {
    let cfg = ForwardConfig {
        max_udp_sessions: 1,
        ..ForwardConfig::default()
    };
    let (b, key, mut fwd) = one(Protocol::Udp, cfg).await;
    let c1 = udp_client().await;
    assert_eq!(udp_ask(&c1, key, "a").await, "b0:a");
    let c2 = udp_client().await;
    c2.send_to(b"b", key.socket_addr()).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        timeout(Duration::from_millis(200), c2.recv_from(&mut buf))
            .await
            .is_err()
    );
    assert_eq!(fwd.m.udp_sessions_refused.get(), 1);
    assert_eq!(udp_ask(&c1, key, "c").await, "b0:c");
    // The cap is global: another UDP VIP is refused too.
    let key2 = free_udp_vip();
    fwd.apply(&table(
        2,
        vec![vip(key, &active(&[b.addr])), vip(key2, &active(&[b.addr]))],
    ))
    .await;
    c2.send_to(b"d", key2.socket_addr()).await.unwrap();
    assert!(
        timeout(Duration::from_millis(200), c2.recv_from(&mut buf))
            .await
            .is_err()
    );
    assert_eq!(fwd.m.udp_sessions_refused.get(), 2);
}

#[tokio::test]
async fn apply_of_unchanged_table_is_a_no_op() {
    let b = Backend::tcp(0).await;
    let key = free_tcp_vip();
    let mut fwd = Fwd::new(ForwardConfig::default());
    let t = one_vip(1, key, &[b.addr]);
    assert_eq!(fwd.apply(&t).await.bound.len(), 1);
    let r = fwd.apply(&t).await;
    assert!(r.bound.is_empty() && r.failed.is_empty() && r.removed.is_empty());
    assert_eq!(b.id, open(key).await.1);
}

/// A one-backend change on a 10,000-VIP table touches one VIP: no rebind, no rebuild.
#[tokio::test]
async fn apply_of_one_change_on_a_large_table_is_cheap() {
    const N: u32 = 10_000;
    let port = {
        let l = std::net::TcpListener::bind("127.10.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let key = |i: u32| VipKey {
        ip: std::net::Ipv4Addr::from(0x7f0a_0000 + i + 1).into(),
        port,
        protocol: Protocol::Tcp,
    };
    let bk = |i: u32, j: u32| -> SocketAddr {
        SocketAddr::new(
            std::net::Ipv4Addr::from(0x0a00_0000 + i * 4 + j).into(),
            8080,
        )
    };
    let vips = |changed: Option<u32>| {
        (0..N).map(move |i| {
            let mut addrs = vec![bk(i, 0), bk(i, 1), bk(i, 2)];
            if changed == Some(i) {
                addrs.push(bk(i, 3));
            }
            vip(key(i), &active(&addrs))
        })
    };
    let mut fwd = Fwd::new(ForwardConfig::default());
    let t1 = VipTable::new(1, vips(None));
    let start = std::time::Instant::now();
    let r = fwd.apply(&t1).await;
    let bind_all = start.elapsed();
    assert_eq!(r.bound.len(), N as usize, "{:?}", r.failed.first());

    let t2 = VipTable::new(2, vips(Some(N / 2))).share_with(&t1);
    let start = std::time::Instant::now();
    let r = fwd.apply(&t2).await;
    let one_change = start.elapsed();
    assert!(r.bound.is_empty() && r.removed.is_empty() && r.failed.is_empty());
    assert!(fwd.stats().backend(&key(N / 2), bk(N / 2, 3)).is_some());
    eprintln!("apply: {N} VIPs bound in {bind_all:?}; one-backend change in {one_change:?}");
    // Debug build, shared CI machine: generous, but far below a rebuild.
    assert!(one_change < bind_all / 10, "{one_change:?} vs {bind_all:?}");
}

#[tokio::test]
async fn tcp_idle_timeout_closes_quiet_connections() {
    let cfg = ForwardConfig {
        tcp_idle_timeout: Some(Duration::from_millis(200)),
        ..ForwardConfig::default()
    };
    let (_b, key, fwd) = one(Protocol::Tcp, cfg).await;
    let (mut s, _) = open(key).await;
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo(&mut s, b"tick").await;
    }
    // ...silence closes it.
    assert_closed(&mut s, Duration::from_secs(3), "idle connection not closed").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fwd.m.connections_active.get(), 0);
}

#[tokio::test]
async fn metrics_are_exported_with_the_l4lb_prefix() {
    let b = Backend::tcp(0).await;
    let dead = Backend::tcp(1).await;
    dead.kill();
    tokio::task::yield_now().await;
    let key = free_tcp_vip();
    let mut fwd = Fwd::new(ForwardConfig::default());
    fwd.serve(1, key, &[b.addr, dead.addr]).await;
    for _ in 0..10 {
        let (mut s, id) = open(key).await;
        assert_eq!(id, 0);
        echo(&mut s, b"m").await;
    }
    let out = fwd.scrape();
    for want in [
        "l4lb_connections_total 10",
        "l4lb_connections_active",
        "l4lb_connections_refused_total 0",
        "l4lb_connections_no_backend_total 0",
        "l4lb_bytes_total{direction=\"client_to_backend\"}",
        "l4lb_bytes_total{direction=\"backend_to_client\"}",
        "l4lb_udp_sessions_active",
        "l4lb_udp_datagrams_total{direction=\"client_to_backend\"}",
        "l4lb_udp_bytes_total{direction=\"backend_to_client\"}",
    ] {
        assert!(out.contains(want), "missing {want} in\n{out}");
    }
    let failed = format!(
        "l4lb_backend_connect_failures_total{{backend=\"{}\"}} 1",
        dead.addr
    );
    let ejected = format!(
        "l4lb_backend_ejections_total{{backend=\"{}\"}} 1",
        dead.addr
    );
    assert!(out.contains(&failed), "{out}");
    assert!(out.contains(&ejected), "{out}");
}

#[tokio::test]
async fn tcp_over_ipv6_loopback() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback; skipped");
        return;
    };
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let l = TcpListener::bind("[::1]:0").await.unwrap();
    let baddr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"b6\n").await;
        }
    });
    let key = VipKey {
        ip: "::1".parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    };
    let mut fwd = Fwd::new(ForwardConfig::default());
    let r = fwd.apply(&one_vip(1, key, &[baddr])).await;
    assert_eq!(r.bound, vec![key], "{:?}", r.failed);
    assert_eq!(open(key).await.1, 6);
}

/// A listener whose accept queue is full drops SYNs: connects to it time out.
fn blackhole() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            fillers.push(c);
        }
    }
    (s, fillers, addr)
}

#[tokio::test]
async fn tcp_connect_timeouts_are_retried_and_eject() {
    let good = Backend::tcp(0).await;
    let (_hole, _fillers, hole) = blackhole();
    let key = free_tcp_vip();
    let cfg = ForwardConfig {
        connect_timeout: Duration::from_millis(100),
        ..ForwardConfig::default()
    };
    let fwd = Fwd::serving(cfg, key, &[good.addr, hole]).await;
    for _ in 0..20 {
        let (mut s, id) = open(key).await;
        assert_eq!(id, 0);
        echo(&mut s, b"t").await;
    }
    // Timeouts count one by one: the black hole is ejected after FAILURES_TO_EJECT.
    let st = fwd.stats().backend(&key, hole).unwrap();
    assert!(st.ejected, "{st:?}");
    assert_eq!(
        fwd.m.backend.connect_failures(hole),
        u64::from(balancer::FAILURES_TO_EJECT)
    );
    assert_eq!(
        fwd.m.connections_retried.get(),
        u64::from(balancer::FAILURES_TO_EJECT)
    );
}

#[tokio::test]
async fn udp_dead_backend_session_moves_to_a_live_one() {
    let Fixture { bs, key, fwd, .. } =
        Fixture::new(Protocol::Udp, 2, ForwardConfig::default()).await;
    let c = udp_client().await;
    let first = udp_ask(&c, key, "x").await;
    let id: usize = first[1..2].parse().unwrap();
    bs[id].kill();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The datagram that meets the dead backend is lost (ICMP ends the session); a retry by
    // the client reaches the live backend.
    let mut buf = [0u8; 64];
    let mut moved = None;
    for _ in 0..10 {
        c.send_to(b"y", key.socket_addr()).await.unwrap();
        if let Ok(r) = timeout(Duration::from_millis(200), c.recv_from(&mut buf)).await {
            let (n, _) = r.unwrap();
            moved = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            break;
        }
    }
    assert_eq!(moved, Some(format!("b{}:y", 1 - id)));
    assert!(fwd.stats().backend(&key, bs[id].addr).unwrap().ejected);
}

#[tokio::test]
async fn tcp_backend_active_again_cancels_its_drain_timeout() {
    let (b, key, mut fwd) = one(Protocol::Tcp, draining_for(200)).await;
    let (mut held, _) = open(key).await;
    fwd.apply(&table(
        2,
        vec![vip(key, &[(b.addr, BackendState::Draining)])],
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    fwd.serve(3, key, &[b.addr]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    echo(&mut held, b"survived").await;
}

#[test]
fn connect_errors_of_this_host_never_blame_the_backend() {
    use super::balancer::Failure;
    use super::tcp::ConnectError::{self, Backend, Local};
    let errno = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
    use nix::errno::Errno::*;
    let cases: &[(std::io::Error, bool, ConnectError)] = &[
        (errno(EMFILE), true, Local("emfile")),
        (errno(EMFILE), false, Local("emfile")),
        (errno(ENFILE), true, Local("enfile")),
        (errno(ENOBUFS), false, Local("enobufs")),
        (errno(ENOMEM), false, Local("enomem")),
        (errno(EADDRNOTAVAIL), false, Local("eaddrnotavail")),
        // Any other failure to create a socket is still this host's.
        (errno(EAFNOSUPPORT), true, Local("socket")),
        (errno(ECONNREFUSED), false, Backend(Failure::Refused)),
        (errno(ETIMEDOUT), false, Backend(Failure::Other)),
        (errno(EHOSTUNREACH), false, Backend(Failure::Other)),
        (errno(ENETUNREACH), false, Backend(Failure::Other)),
    ];
    for (e, creating, want) in cases {
        assert_eq!(
            ConnectError::classify(e, *creating),
            *want,
            "{e} {creating}"
        );
    }
}

#[tokio::test]
async fn accepted_sockets_inherit_keepalive_and_nodelay_from_the_listener() {
    let l = tcp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    let _c = TcpStream::connect(addr).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    let sock = socket2::SockRef::from(&s);
    assert!(sock.tcp_nodelay().unwrap());
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
    assert_eq!(
        sock.tcp_keepalive_interval().unwrap(),
        Duration::from_secs(10)
    );
    assert_eq!(sock.tcp_keepalive_retries().unwrap(), 6);
}

#[tokio::test]
async fn tcp_short_exchanges_never_touch_a_pipe() {
    let Fixture {
        bs: _bs, key, fwd, ..
    } = Fixture::new(Protocol::Tcp, 1, ForwardConfig::default()).await;
    for _ in 0..20 {
        let (mut s, _) = open(key).await;
        echo(&mut s, b"GET / HTTP/1.1\r\n\r\n").await;
    }
    assert_eq!(fwd.ctx.pipes.leased(), 0);
    assert_eq!(fwd.ctx.pipes.pooled(), 0, "no pipe was ever created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_connections_hold_no_pipe() {
    let Fixture {
        bs: _bs, key, fwd, ..
    } = Fixture::new(Protocol::Tcp, 1, ForwardConfig::default()).await;
    // Bulk both ways (past the auto-splice threshold), then every connection sits idle.
    let big = vec![7u8; 256 << 10];
    let mut conns = Vec::new();
    for _ in 0..20 {
        let (mut s, _) = open(key).await;
        let (mut r, mut w) = s.split();
        let mut got = vec![0u8; big.len()];
        let (wr, rd) = tokio::join!(w.write_all(&big), timeout(T, r.read_exact(&mut got)));
        wr.unwrap();
        rd.unwrap().unwrap();
        assert!(got == big);
        conns.push(s);
    }
    assert!(
        fwd.ctx.pipes.pooled() > 0,
        "bulk traffic went through pipes"
    );
    assert_eq!(
        pipes_leased_after(&fwd).await,
        0,
        "idle connections hold no pipe"
    );
    for mut s in conns {
        echo(&mut s, b"still alive").await;
    }
    assert_eq!(pipes_leased_after(&fwd).await, 0);
}

/// The pipes `fwd` still leases once its connections are quiet: the last bytes can reach the
/// client just before the forwarder returns its pipe, so this waits up to a second for 0.
async fn pipes_leased_after(fwd: &Fwd) -> usize {
    for _ in 0..100 {
        if fwd.ctx.pipes.leased() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fwd.ctx.pipes.leased()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Runs in a child process (RLIMIT_NOFILE is process-wide): the test re-executes its own
/// binary with `L4LB_FD_CHILD` set, and the child lowers its limit and exhausts it.
#[test]
fn tcp_out_of_descriptors_is_a_local_error_not_a_backend_failure() {
    const NAME: &str =
        "agent::forward::tests::tcp_out_of_descriptors_is_a_local_error_not_a_backend_failure";
    if std::env::var_os("L4LB_FD_CHILD").is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env("L4LB_FD_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("1 passed"), "child ran no test:\n{text}");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(out_of_descriptors());
}

async fn out_of_descriptors() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let b = Backend::tcp(0).await;
    let ub = Backend::udp(5).await;
    let key = free_tcp_vip();
    let ukey = free_udp_vip();
    let mut fwd = Fwd::new(ForwardConfig::default());
    let vips = vec![vip(key, &active(&[b.addr])), vip(ukey, &active(&[ub.addr]))];
    fwd.apply(&table(1, vips)).await;
    let (mut s, _) = open(key).await;
    echo(&mut s, b"warm").await;
    let uc = udp_client().await;
    drop(s);
    // Let that connection close on every side, so no descriptor frees up later.
    while fwd.m.connections_active.get() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, open_fds() as u64 + 64, hard).unwrap();
    // Take every descriptor, then give back `free` of them.
    let fill = |free: usize| {
        let mut f = Vec::new();
        while let Ok(x) = std::fs::File::open("/dev/null") {
            f.push(x);
        }
        f.truncate(f.len() - free);
        f
    };
    let emfile = || {
        fwd.m
            .local_errors
            .get_or_create(&KindLabels { kind: "emfile" })
            .get()
    };

    // No descriptor left for the upstream socket: a local error, no retry, no blame.
    let filler = fill(0);
    let live = &fwd.live[&key];
    let r = tcp::connect_upstream(&fwd.ctx, &live.shared).await;
    drop(filler);
    assert!(
        matches!(r, Err(tcp::Unreached::Local("emfile"))),
        "{:?}",
        r.map(|_| ())
    );
    assert_eq!(fwd.m.backend.connect_failures(b.addr), 0);
    assert_eq!(fwd.m.connections_retried.get(), 0);
    let stats = fwd.stats().backend(&key, b.addr).unwrap();
    assert!(!stats.ejected, "healthy backend was ejected");
    assert_eq!(stats.active_connections, 0);

    // No descriptor for accept: it backs off instead of spinning, counts, and serves the
    // client once descriptors are free again.
    let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    c.set_nonblocking(true).unwrap();
    let filler = fill(0);
    match c.connect(&key.socket_addr().into()) {
        Err(e) if e.raw_os_error() != Some(nix::libc::EINPROGRESS) => panic!("{e}"),
        _ => {}
    }
    let mut c = TcpStream::from_std(std::net::TcpStream::from(c)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let accept_errors = emfile();
    drop(filler);
    assert!(
        (1..=10).contains(&accept_errors),
        "accept errors in 300 ms: {accept_errors}"
    );
    c.writable().await.unwrap();
    let mut id = [0u8; 3];
    timeout(T, c.read_exact(&mut id)).await.unwrap().unwrap();
    assert_eq!(&id, b"b0\n");
    echo(&mut c, b"after").await;
    assert_eq!(fwd.m.connections_no_backend.get(), 0);
    assert_eq!(fwd.m.backend.connect_failures(b.addr), 0);

    // No descriptor for a UDP session's upstream socket: the datagram is dropped and
    // counted, the backend not blamed; the next datagram makes the session.
    let before = emfile();
    let filler = fill(0);
    uc.send_to(b"lost", ukey.socket_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(filler);
    assert_eq!(emfile(), before + 1);
    assert_eq!(udp_ask(&uc, ukey, "hi").await, "b5:hi");
    assert_eq!(fwd.m.backend.connect_failures(ub.addr), 0);
}

/// A client-first backend: reads one request (up to `\n`), answers `b<id>:<request>`, then
/// closes at once (`Connection: close`), or with `reset`, aborts (RST right after the reply).
async fn request_reply_backend(id: u8, reset: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while s.read_exact(&mut byte).await.is_ok() {
                    req.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                let mut reply = format!("b{id}:").into_bytes();
                reply.extend_from_slice(&req);
                if s.write_all(&reply).await.is_err() {
                    return;
                }
                if reset {
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_client_bytes_sent_with_the_connect_arrive_once() {
    let b = request_reply_backend(3, false).await;
    let key = free_tcp_vip();
    let fwd = Fwd::serving(ForwardConfig::default(), key, &[b]).await;
    let req = b"GET / HTTP/1.0\n";
    for early in [true, false] {
        let mut s = if early {
            // Connected and written before the forwarder's task runs at all (this runtime has
            // one thread): the request is already in the socket when it is accepted.
            let std = std::net::TcpStream::connect(key.socket_addr()).unwrap();
            std::io::Write::write_all(&mut &std, req).unwrap();
            std.set_nonblocking(true).unwrap();
            TcpStream::from_std(std).unwrap()
        } else {
            let mut s = TcpStream::connect(key.socket_addr()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(req).await.unwrap();
            s
        };
        let mut got = Vec::new();
        timeout(T, s.read_to_end(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, b"b3:GET / HTTP/1.0\n", "early={early}");
    }
    assert_eq!(
        fwd.m.bytes_c2b.get(),
        2 * req.len() as u64,
        "no byte sent twice"
    );
    assert_eq!(fwd.m.bytes_b2c.get(), 2 * (req.len() as u64 + 3));
}

#[tokio::test]
async fn tcp_reply_then_close_or_reset_still_delivers_the_reply() {
    for reset in [false, true] {
        let b = request_reply_backend(5, reset).await;
        let key = free_tcp_vip();
        let _fwd = Fwd::serving(ForwardConfig::default(), key, &[b]).await;
        for _ in 0..20 {
            let mut s = TcpStream::connect(key.socket_addr()).await.unwrap();
            s.write_all(b"ping\n").await.unwrap();
            let mut got = Vec::new();
            // After a reset the client may see the reply then an error, never less.
            let _ = timeout(T, s.read_to_end(&mut got)).await.unwrap();
            assert_eq!(got, b"b5:ping\n", "reset={reset}");
        }
    }
}

#[tokio::test]
async fn udp_bursts_from_many_clients_arrive_whole_and_stay_on_their_backend() {
    let Fixture {
        bs: _bs, key, fwd, ..
    } = Fixture::new(Protocol::Udp, 2, ForwardConfig::default()).await;
    // Every client fires its whole burst before anyone reads: the VIP socket and the
    // upstream sockets hold many datagrams at once, so they move in multi-datagram batches
    // that interleave clients, and past one batch (32).
    const CLIENTS: usize = 6;
    const BURST: usize = 50;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let s = udp_client().await;
        clients.push((c, s));
    }
    let (mut sent_bytes, mut got_bytes) = (0u64, 0u64);
    for i in 0..BURST {
        for (c, s) in &clients {
            let msg = format!("c{c}-{i}");
            s.send_to(msg.as_bytes(), key.socket_addr()).await.unwrap();
            sent_bytes += msg.len() as u64;
        }
    }
    for (c, s) in &clients {
        let mut seen = Vec::new();
        let mut backend = None;
        let mut buf = [0u8; 256];
        while seen.len() < BURST {
            let (n, from) = timeout(T, s.recv_from(&mut buf)).await.unwrap().unwrap();
            assert_eq!(from, key.socket_addr());
            got_bytes += n as u64;
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (id, payload) = reply.split_once(':').unwrap();
            assert_eq!(
                *backend.get_or_insert(id.to_string()),
                id,
                "client {c} moved"
            );
            seen.push(payload.to_string());
        }
        let want: Vec<String> = (0..BURST).map(|i| format!("c{c}-{i}")).collect();
        assert_eq!(seen, want, "client {c}: every datagram, in order");
    }
    assert_eq!(fwd.m.udp_c2b.get(), (CLIENTS * BURST) as u64);
    assert_eq!(fwd.m.udp_b2c.get(), (CLIENTS * BURST) as u64);
    assert_eq!(fwd.m.udp_bytes_c2b.get(), sent_bytes);
    assert_eq!(fwd.m.udp_bytes_b2c.get(), got_bytes);
    assert_eq!(fwd.m.udp_sessions_active.get(), CLIENTS as i64);
}

#[tokio::test]
async fn tcp_removed_vip_retires_until_its_last_connection_ends() {
    let b = Backend::tcp(0).await;
    let (idle, busy) = (free_tcp_vip(), free_tcp_vip());
    let mut fwd = Fwd::new(ForwardConfig::default());
    let both = |v| {
        table(
            v,
            vec![vip(idle, &active(&[b.addr])), vip(busy, &active(&[b.addr]))],
        )
    };
    fwd.apply(&both(1)).await;
    let (mut held, _) = open(busy).await;
    fwd.apply(&table(2, vec![])).await;
    // Only the VIP with an open connection keeps its address; it still answers.
    assert_eq!(
        fwd.retiring_addrs().collect::<Vec<_>>(),
        vec![busy.ip],
        "one VIP retiring"
    );
    assert!(TcpStream::connect(busy.socket_addr()).await.is_err());
    echo(&mut held, b"still served").await;
    assert!(
        timeout(Duration::from_millis(300), fwd.retired())
            .await
            .is_err(),
        "retired while a connection is open"
    );
    drop(held);
    let k = timeout(RETIRE_LINGER + T, fwd.retired()).await.unwrap();
    assert_eq!(k, busy);
    assert_eq!(fwd.retiring_addrs().count(), 0);
}

#[tokio::test]
async fn a_backend_series_leaves_metrics_with_the_backend() {
    let mut fwd = Fwd::new(ForwardConfig::default());
    let key = free_tcp_vip();
    let series = |reg: &Registry| {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, reg).unwrap();
        out.lines()
            .filter(|l| l.contains("backend=\"") && !l.starts_with('#'))
            .count()
    };
    // 200 backends come and go, two at a time.
    for v in 1..=100u16 {
        let bs: Vec<SocketAddr> = [2 * v, 2 * v + 1]
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], 40_000 + p)))
            .collect();
        fwd.apply(&table(u64::from(v), vec![vip(key, &active(&bs))]))
            .await;
    }
    // Two backends, two families (connect failures, ejections).
    assert_eq!(series(&fwd.reg), 4);
    fwd.apply(&table(101, vec![])).await;
    assert_eq!(series(&fwd.reg), 0);
}

fn scrape(reg: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, reg).unwrap();
    out
}

#[tokio::test]
async fn connect_latency_and_vip_results_are_counted_and_leave_with_their_backend() {
    let (b0, b1) = (Backend::tcp(0).await, Backend::tcp(1).await);
    let key = free_tcp_vip();
    let mut fwd = Fwd::new(ForwardConfig::default());
    fwd.serve(1, key, &[b0.addr, b1.addr]).await;
    for _ in 0..20 {
        let (mut s, _) = open(key).await;
        echo(&mut s, b"l").await;
    }
    let stats = fwd.stats();
    let (s0, s1) = (
        stats.backend(&key, b0.addr).unwrap(),
        stats.backend(&key, b1.addr).unwrap(),
    );
    assert_eq!(s0.connects + s1.connects, 20, "{s0:?} {s1:?}");
    for s in [s0, s1].iter().filter(|s| s.connects > 0) {
        let (p50, p99) = (s.connect_p50.unwrap(), s.connect_p99.unwrap());
        // A loopback connect: well under the 1 s connect timeout.
        assert!(0.0 < p50 && p50 <= p99 && p99 < 1.0, "{s:?}");
    }
    assert_eq!(stats.vip(&key), Some(VipStats { ok: 20, failed: 0 }));
    let out = fwd.scrape();
    let count = |b: SocketAddr| format!("l4lb_backend_connect_seconds_count{{backend=\"{b}\"}}");
    for (b, s) in [(b0.addr, s0), (b1.addr, s1)] {
        // The histogram exists from a backend's first connect on.
        let want = (s.connects > 0).then(|| format!("{} {}", count(b), s.connects));
        match want {
            Some(line) => assert!(out.contains(&line), "{out}"),
            None => assert!(!out.contains(&count(b)), "{out}"),
        }
    }
    assert!(
        out.contains(&format!(
            "l4lb_vip_connections_total{{vip=\"{key}\",result=\"ok\"}} 20"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("l4lb_vip_backends_active{{vip=\"{key}\"}} 2")),
        "{out}"
    );
    let vip_bytes = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("l4lb_vip_bytes_total{{vip=\"{key}\"}} ")))
        .and_then(|v| v.parse::<u64>().ok());
    // Per connection: the id line, and the echo both ways.
    assert!(vip_bytes.is_some_and(|b| b >= 20 * (3 + 1 + 1)), "{out}");

    // Both backends die: the next client connection fails and is counted on the VIP.
    b0.kill();
    b1.kill();
    tokio::task::yield_now().await;
    let mut s = TcpStream::connect(key.socket_addr()).await.unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(timeout(T, s.read(&mut buf)).await.unwrap().unwrap_or(0), 0);
    assert_eq!(stats.vip(&key).unwrap().failed, 1);

    // b1 leaves the VIP: its series go (bounded label sets); b0's stay.
    fwd.serve(2, key, &[b0.addr]).await;
    let out = fwd.scrape();
    assert!(!out.contains(&b1.addr.to_string()), "{out}");
    assert!(
        out.contains(&format!("l4lb_vip_backends_active{{vip=\"{key}\"}} 1")),
        "{out}"
    );
    assert!(out.contains(&count(b0.addr)), "{out}");
    // The VIP leaves: its series and its backends' go.
    fwd.apply(&table(3, vec![])).await;
    // Connections hold the shared state until they end; give the closed ones a moment.
    let out = scrape_without(&fwd, &b0.addr.to_string(), 50).await;
    assert!(!out.contains(&b0.addr.to_string()), "{out}");
    assert!(!out.contains(&format!("vip=\"{key}\"")), "{out}");
}

#[tokio::test]
async fn a_backend_of_two_vips_keeps_its_series_until_both_let_go() {
    let b = Backend::tcp(0).await;
    let (k1, k2) = (free_tcp_vip(), free_tcp_vip());
    let mut fwd = Fwd::new(ForwardConfig::default());
    let both = vec![vip(k1, &active(&[b.addr])), vip(k2, &active(&[b.addr]))];
    fwd.apply(&table(1, both)).await;
    let series = format!(
        "l4lb_backend_connect_seconds_count{{backend=\"{}\"}}",
        b.addr
    );
    let failures = format!(
        "l4lb_backend_connect_failures_total{{backend=\"{}\"}} 0",
        b.addr
    );
    // Counters exist from the start; the histogram from the first connect (through k1).
    assert!(fwd.scrape().contains(&failures));
    assert!(!fwd.scrape().contains(&series));
    let (mut s, _) = open(k1).await;
    echo(&mut s, b"h").await;
    drop(s);
    assert!(fwd.scrape().contains(&format!("{series} 1")));
    fwd.serve(2, k2, &[b.addr]).await;
    // k2's backend set still holds the address (and shares the histogram).
    assert!(
        fwd.scrape().contains(&format!("{series} 1")),
        "still a backend of {k2}"
    );
    let (mut s, _) = open(k2).await;
    echo(&mut s, b"h").await;
    drop(s);
    assert!(fwd.scrape().contains(&format!("{series} 2")));
    fwd.apply(&table(3, vec![])).await;
    // The closed connections let go of the backend a moment after the client hangs up.
    let out = scrape_without(&fwd, &b.addr.to_string(), 100).await;
    assert!(!out.contains(&series) && !out.contains(&failures), "{out}");
}

#[tokio::test]
async fn a_successor_serves_from_the_inherited_sockets_while_the_old_connections_finish() {
    let b = Backend::start(Protocol::Tcp, 0).await;
    let u = Backend::start(Protocol::Udp, 1).await;
    let (tk, uk) = (free_tcp_vip(), free_udp_vip());
    let t = table(
        1,
        vec![vip(tk, &active(&[b.addr])), vip(uk, &active(&[u.addr]))],
    );
    let cfg = ForwardConfig {
        udp_idle_timeout: Duration::from_millis(300),
        ..ForwardConfig::default()
    };
    let book = crate::agent::handoff::Sockets::default();
    let mut old = Fwd::new(cfg.clone()).with(|f| f.with_sockets(book.clone()));
    assert_eq!(old.apply(&t).await.bound.len(), 2);
    let (mut conn, _) = open(tk).await;
    echo(&mut conn, b"before\n").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(udp_ask(&client, uk, "x").await, "b1:x");

    // The successor binds nothing: both VIPs are served from the old sockets.
    let passed = book.passed_on();
    let mut new = Fwd::new(cfg).with(|f| f.with_sockets(passed.clone()));
    let r = new.apply(&t).await;
    assert_eq!(r.bound.len(), 2, "{:?}", r.failed);
    assert_eq!(passed.unclaimed(), 0);
    let handing = tokio::spawn(old.into_inner().hand_over(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(50)).await;

    // New connections and datagrams go to the successor; the open one still works.
    let (mut fresh, _) = open(tk).await;
    echo(&mut fresh, b"after\n").await;
    assert_eq!(new.m.connections.get(), 1);
    echo(&mut conn, b"still\n").await;
    assert_eq!(udp_ask(&client, uk, "y").await, "b1:y");

    // The old forwarder ends once its connection closed and its UDP session went idle,
    // without closing what the successor serves.
    drop(conn);
    timeout(Duration::from_secs(5), handing)
        .await
        .expect("the old forwarder drained")
        .unwrap();
    let (mut later, _) = open(tk).await;
    echo(&mut later, b"later\n").await;
}
