//! The DNS I/O shells: UDP receive loops and TCP connections (2-byte length prefix, pipelined
//! queries answered in order, idle timeout, a cap on concurrent connections), all on sockets
//! the caller bound, until the shutdown token is cancelled. Answers come from `answer`;
//! forwarding from `forward`.
//!
//! A forwarded name is looked up in the `cache` first (a hit is answered inline, over UDP
//! without spawning a task); on a miss, identical queries in flight are coalesced: the first
//! (per question, request flags and client transport) goes upstream and the others wait for
//! its answer, taking it with their own id and question case; a good answer is stored before
//! the flight ends, so a later query finds either the flight or the cache. Cached and shared
//! answers are fitted to each client's size limit as forwarded ones are (TC over UDP).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use hickory_proto::serialize::binary::BinEncodable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::answer::{self, Outcome, Transport};
use super::cache::{Cache, Key, personalize};
use super::records::{CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD};
use super::upstream::UpstreamForwarder;
use super::{DnsCatalog, DnsConfig, DnsMetrics};

/// Resource limits of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Concurrent TCP connections; further ones are closed at once.
    pub max_tcp_connections: usize,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Forwarded UDP queries in flight; past it new ones get SERVFAIL at once.
    pub max_forwards_in_flight: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_tcp_connections: 256,
            tcp_idle_timeout: Duration::from_secs(10),
            max_forwards_in_flight: 1024,
        }
    }
}

/// The answer a flight brought back (with the leader's id and case), or `None`: SERVFAIL.
type Landed = Arc<Option<Vec<u8>>>;
/// A forwarded query in flight: its key, and whether its client came over UDP (a UDP answer
/// may be TC where a TCP client needs the whole answer).
type FlightKey = (Key, bool);

/// Everything a query needs, shared by every task.
struct Shared {
    catalog: DnsCatalog,
    forwarder: Option<UpstreamForwarder>,
    metrics: DnsMetrics,
    cache: Mutex<Cache>,
    /// Upstreams exist and the cache is on.
    cache_on: bool,
    /// Forwarded queries in flight, for followers to wait on.
    flights: Mutex<HashMap<FlightKey, watch::Receiver<Option<Landed>>>>,
}

impl Shared {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<FlightKey, watch::Receiver<Option<Landed>>>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer to a plain query straight from the cache, read and answered on the wire
    /// without decoding the query (as `fast` answers our own names), fitted to what the
    /// client takes. `None`, counting nothing, when the query is not plain or not cached: the
    /// decoding path then decides (and counts the miss if it forwards).
    fn cached_wire(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        if !self.cache_on {
            return None;
        }
        let wire = Key::of_wire(query)?;
        let (hit, entries) = {
            let mut cache = self.cache();
            (cache.get(&wire.key, now()), cache.len())
        };
        self.metrics.cache_entries(entries);
        let mut bytes = hit?;
        if !personalize(&mut bytes, wire.id, wire.question) {
            return None;
        }
        self.metrics.cache_hit();
        self.metrics.query(
            answer::record_type_label(RecordType::from(wire.qtype)),
            answer::rcode_label(rcode_of(&bytes)),
        );
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(wire.payload.map_or(CLASSIC_UDP_PAYLOAD, |p| {
                p.clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
            })),
        };
        if bytes.len() <= limit {
            return Some(bytes);
        }
        answer::encode(&Message::from_vec(&bytes).ok()?, limit)
    }

    /// The client's answer from the cache, fitted to `limit`; counts the hit or miss.
    fn cached(&self, req: &Message, key: &Key, limit: usize) -> Option<Vec<u8>> {
        let (hit, entries) = {
            let mut cache = self.cache();
            if !cache.enabled() {
                return None;
            }
            let hit = cache.get(key, now());
            (hit, cache.len())
        };
        self.metrics.cache_entries(entries);
        let Some(mut bytes) = hit else {
            self.metrics.cache_miss();
            return None;
        };
        let question = req.queries.first()?.to_bytes().ok()?;
        if !personalize(&mut bytes, req.metadata.id, &question) {
            return None;
        }
        self.metrics.cache_hit();
        self.metrics.query(
            answer::type_label(req),
            answer::rcode_label(rcode_of(&bytes)),
        );
        fit(req, bytes, limit)
    }
}

/// The cache's clock: tokio's, so tests can pause it.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Removes a flight from the table when its leader finishes or is dropped (a TCP client gone);
/// followers of a dropped leader see the channel close and try again.
struct Flight<'a> {
    shared: &'a Shared,
    key: FlightKey,
    tx: watch::Sender<Option<Landed>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self.shared.flights();
        if flights
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            flights.remove(&self.key);
        }
    }
}

/// Serve UDP and TCP DNS on already-bound sockets within `limits` until `shutdown` is
/// cancelled. Returns once every socket loop and connection has stopped; fails at once
/// (InvalidInput) if given no socket at all.
pub async fn serve(
    cfg: DnsConfig,
    catalog: DnsCatalog,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    metrics: DnsMetrics,
    shutdown: CancellationToken,
    limits: ServerLimits,
) -> std::io::Result<()> {
    if udp.is_empty() && tcp.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "DNS: no UDP or TCP socket to serve on",
        ));
    }
    catalog.set_nameservers(&nameservers(
        udp.iter()
            .filter_map(|s| s.local_addr().ok())
            .chain(tcp.iter().filter_map(|l| l.local_addr().ok())),
    ));
    let shared = Arc::new(Shared {
        catalog,
        forwarder: UpstreamForwarder::new(&cfg.upstreams, cfg.upstream_timeout),
        metrics,
        cache: Mutex::new(Cache::new(cfg.cache)),
        cache_on: !cfg.upstreams.is_empty() && cfg.cache.entries > 0,
        flights: Mutex::new(HashMap::new()),
    });
    let tracker = TaskTracker::new();
    let forwards = Arc::new(Semaphore::new(limits.max_forwards_in_flight));
    // Several receive loops share each socket so a multi-threaded runtime answers on every
    // core (tokio sockets take `&self`; each datagram goes to exactly one loop).
    let loops = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 4);
    for sock in udp {
        tracing::info!(addr = ?sock.local_addr().ok(), loops, "DNS serving UDP");
        let sock = Arc::new(sock);
        for _ in 0..loops {
            tracker.spawn(udp_loop(
                sock.clone(),
                shared.clone(),
                forwards.clone(),
                tracker.clone(),
                shutdown.clone(),
            ));
        }
    }
    let conns = Arc::new(Semaphore::new(limits.max_tcp_connections));
    for listener in tcp {
        tracing::info!(addr = ?listener.local_addr().ok(), "DNS serving TCP");
        tracker.spawn(tcp_accept_loop(
            listener,
            shared.clone(),
            conns.clone(),
            limits.tcp_idle_timeout,
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    shutdown.cancelled().await;
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// The addresses `ns.<zone>` answers: the listen addresses, a wildcard one standing for the
/// loopback address of its family (the one address it surely answers on from this host).
fn nameservers(listen: impl Iterator<Item = SocketAddr>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = listen
        .map(|a| match a.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip.to_canonical(),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The result of processing one packet without I/O: bytes to send now, a query to forward,
/// or nothing.
enum Step {
    Send(Vec<u8>),
    Forward(Message, usize),
    Nothing,
}

/// Answer what can be answered locally, encode within the transport's size limit, count it.
fn process(shared: &Shared, bytes: &[u8], transport: Transport) -> Step {
    let snap = shared.catalog.load();
    let (outcome, limit) = answer::handle(&snap, bytes, shared.forwarder.is_some(), transport);
    match outcome {
        Outcome::Drop => Step::Nothing,
        Outcome::Forward(req) => Step::Forward(req, limit),
        Outcome::Reply(resp) => {
            shared.metrics.query(
                answer::type_label(&resp),
                answer::rcode_label(resp.metadata.response_code),
            );
            answer::encode(&resp, limit).map_or(Step::Nothing, Step::Send)
        }
    }
}

/// Forward `req` (or join an identical query in flight) and produce the bytes for the client
/// (SERVFAIL on failure), within `limit`.
async fn forward(
    shared: &Shared,
    req: &Message,
    key: Option<Key>,
    limit: usize,
    transport: Transport,
) -> Option<Vec<u8>> {
    let forwarder = shared.forwarder.as_ref()?;
    let qtype = answer::type_label(req);
    let landed = match key {
        Some(key) => coalesced(shared, forwarder, req, key, transport).await,
        None => upstream(shared, forwarder, req, transport).await,
    };
    match landed {
        Some(bytes) => {
            shared
                .metrics
                .query(qtype, answer::rcode_label(rcode_of(&bytes)));
            fit(req, bytes, limit)
        }
        None => {
            shared.metrics.query(qtype, "SERVFAIL");
            servfail(req, limit)
        }
    }
}

/// One query upstream: the answer with `req`'s id, or `None` (counted as a failure).
async fn upstream(
    shared: &Shared,
    forwarder: &UpstreamForwarder,
    req: &Message,
    transport: Transport,
) -> Option<Vec<u8>> {
    shared.metrics.forwarded();
    match forwarder.forward(req, transport).await {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::debug!(error = %e, "DNS forwarding failed");
            shared.metrics.upstream_failure();
            None
        }
    }
}

/// Lead a flight for `key` (forward, cache a good answer, hand it to the followers) or follow
/// the one in flight; the answer comes back with `req`'s id and question case.
async fn coalesced(
    shared: &Shared,
    forwarder: &UpstreamForwarder,
    req: &Message,
    key: Key,
    transport: Transport,
) -> Option<Vec<u8>> {
    let fkey: FlightKey = (key, transport == Transport::Udp);
    loop {
        // Follow the flight in the table, or put one there and lead it.
        let role = {
            let mut flights = shared.flights();
            match flights.get(&fkey) {
                Some(rx) => Ok(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(fkey.clone(), rx);
                    Err(tx)
                }
            }
        };
        let mut rx = match role {
            Ok(rx) => rx,
            Err(tx) => {
                let flight = Flight {
                    shared,
                    key: fkey,
                    tx,
                };
                return lead(shared, forwarder, req, flight, transport).await;
            }
        };
        shared.metrics.coalesced();
        let landed = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            // The leader was dropped before landing: lead or follow anew.
            Err(_) => continue,
        };
        let mut bytes = landed.and_then(|l| Option::clone(&l))?;
        let question = req.queries.first()?.to_bytes().ok()?;
        if !personalize(&mut bytes, req.metadata.id, &question) {
            // A TC answer without its question: the id alone.
            let id = req.metadata.id.to_be_bytes();
            bytes.get_mut(..2)?.copy_from_slice(&id);
        }
        return Some(bytes);
    }
}

async fn lead(
    shared: &Shared,
    forwarder: &UpstreamForwarder,
    req: &Message,
    flight: Flight<'_>,
    transport: Transport,
) -> Option<Vec<u8>> {
    let answer = upstream(shared, forwarder, req, transport).await;
    if let Some(bytes) = &answer {
        let (stored, entries) = {
            let mut cache = shared.cache();
            let stored = cache.insert(flight.key.0.clone(), bytes, now());
            (stored, cache.len())
        };
        if let Err(why) = stored {
            tracing::trace!(%why, "DNS answer not cached");
        }
        shared.metrics.cache_entries(entries);
    }
    flight.tx.send_replace(Some(Arc::new(answer.clone())));
    drop(flight);
    answer
}

/// The response code in an answer's header (an extended one lives in the OPT record; its low
/// bits do for the label): no decoding of the whole answer.
fn rcode_of(bytes: &[u8]) -> ResponseCode {
    ResponseCode::from(0, bytes.get(3).map_or(0, |b| b & 0x0f))
}

/// `bytes` as they are if they fit `limit`, else re-encoded within it (TC over UDP).
fn fit(req: &Message, bytes: Vec<u8>, limit: usize) -> Option<Vec<u8>> {
    if bytes.len() <= limit {
        return Some(bytes);
    }
    match Message::from_vec(&bytes) {
        Ok(m) => answer::encode(&m, limit),
        Err(_) => servfail(req, limit),
    }
}

fn servfail(req: &Message, limit: usize) -> Option<Vec<u8>> {
    let mut resp = Message::error_msg(
        req.metadata.id,
        req.metadata.op_code,
        ResponseCode::ServFail,
    );
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = req.queries.clone();
    answer::encode(&resp, limit)
}

async fn udp_loop(
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
    forwards: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 65_535];
    let mut out = Vec::with_capacity(super::records::MAX_UDP_PAYLOAD as usize);
    let ra = shared.forwarder.is_some();
    // One cancellation future for the loop's life (not a fresh waiter per datagram).
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        // Datagrams already queued are read without a trip through the reactor.
        let received = match sock.try_recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tokio::select! {
                _ = &mut cancelled => return,
                r = sock.recv_from(&mut buf) => r,
            },
            r => r,
        };
        let (n, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier sends surface here on some systems; not fatal.
                tracing::debug!(error = %e, "DNS UDP receive error");
                continue;
            }
        };
        let query = &buf[..n];
        // Fast path: a pre-encoded answer, no parsing and no allocation.
        let fast = shared.catalog.load().fast.answer(query, ra, &mut out);
        if let Some(done) = fast {
            shared.metrics.answered_fast(done.type_idx);
            send_udp(&sock, &out[..done.len], peer).await;
            continue;
        }
        // A forwarded name answered before: from the cache, no parsing either.
        if let Some(out) = shared.cached_wire(query, Transport::Udp) {
            send_udp(&sock, &out, peer).await;
            continue;
        }
        match process(&shared, query, Transport::Udp) {
            Step::Nothing => {}
            Step::Send(out) => send_udp(&sock, &out, peer).await,
            Step::Forward(req, limit) => {
                let key = Key::of(&req);
                if let Some(key) = &key
                    && let Some(out) = shared.cached(&req, key, limit)
                {
                    send_udp(&sock, &out, peer).await;
                    continue;
                }
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    shared.metrics.upstream_failure();
                    if let Some(out) = servfail(&req, limit) {
                        send_udp(&sock, &out, peer).await;
                    }
                    continue;
                };
                let (sock, shared) = (sock.clone(), shared.clone());
                tracker.spawn(async move {
                    if let Some(out) = forward(&shared, &req, key, limit, Transport::Udp).await {
                        send_udp(&sock, &out, peer).await;
                    }
                    drop(permit);
                });
            }
        }
    }
}

async fn send_udp(sock: &UdpSocket, out: &[u8], peer: SocketAddr) {
    if let Err(e) = sock.send_to(out, peer).await {
        tracing::debug!(error = %e, %peer, "DNS UDP send error");
    }
}

async fn tcp_accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    conns: Arc<Semaphore>,
    idle: Duration,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "DNS TCP accept error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "DNS TCP connection limit reached; closing");
            drop(stream);
            continue;
        };
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = tcp_conn(stream, &shared, idle, &shutdown).await {
                tracing::debug!(error = %e, %peer, "DNS TCP connection ended");
            }
            drop(permit);
        });
    }
}

/// Forwarded queries in flight on one TCP connection; past it the connection stops reading
/// until one completes.
const MAX_TCP_PIPELINE: usize = 16;

/// How long an open TCP connection is still served after shutdown: a client whose
/// connection was accepted just before (by this agent, or by the one handing its sockets to a
/// successor) gets the answer to the query it is sending rather than an EOF.
const TCP_DRAIN: Duration = Duration::from_millis(500);

/// Serve one TCP connection until EOF, idle timeout, an error or shutdown (then at most
/// [`TCP_DRAIN`] more, answering what arrives, never resetting the deadline): read
/// length-prefixed queries, answer local ones at once in arrival order, and write forwarded
/// ones as their upstream answers arrive (RFC 7766 §6.2.1.1 allows out-of-order answers), so
/// a slow upstream does not hold up answers from the catalog.
async fn tcp_conn(
    mut stream: TcpStream,
    shared: &Shared,
    idle: Duration,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let mut inbuf = bytes::BytesMut::with_capacity(1024);
    let mut pending = FuturesUnordered::new();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let mut draining = false;
    loop {
        // Answer every complete query already buffered.
        while let Some(frame) = next_frame(&mut inbuf) {
            if !draining {
                idle_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + idle);
            }
            if let Some(out) = shared.cached_wire(&frame, Transport::Tcp) {
                write_framed(&mut stream, &out).await?;
                continue;
            }
            match process(shared, &frame, Transport::Tcp) {
                Step::Nothing => {}
                Step::Send(out) => write_framed(&mut stream, &out).await?,
                Step::Forward(req, limit) => {
                    let key = Key::of(&req);
                    match key.as_ref().and_then(|k| shared.cached(&req, k, limit)) {
                        Some(out) => write_framed(&mut stream, &out).await?,
                        None => pending.push(async move {
                            forward(shared, &req, key, limit, Transport::Tcp).await
                        }),
                    }
                }
            }
            if pending.len() >= MAX_TCP_PIPELINE {
                break;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                let deadline = tokio::time::Instant::now() + idle.min(TCP_DRAIN);
                idle_timer.as_mut().reset(deadline);
            }
            Some(out) = pending.next(), if !pending.is_empty() => {
                if let Some(out) = out {
                    write_framed(&mut stream, &out).await?;
                }
            }
            // `read_buf` is cancel-safe: bytes are either in `inbuf` or still in the socket.
            r = stream.read_buf(&mut inbuf), if pending.len() < MAX_TCP_PIPELINE => {
                if r? == 0 {
                    // EOF: finish what is in flight, then close.
                    while let Some(out) = pending.next().await {
                        if let Some(out) = out {
                            write_framed(&mut stream, &out).await?;
                        }
                    }
                    return Ok(());
                }
            }
            _ = &mut idle_timer, if pending.is_empty() => return Ok(()),
        }
    }
}

/// Split one length-prefixed message off the front of `buf`, if complete.
fn next_frame(buf: &mut bytes::BytesMut) -> Option<bytes::BytesMut> {
    let len = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]) as usize;
    if buf.len() < 2 + len {
        buf.reserve(2 + len - buf.len());
        return None;
    }
    let mut frame = buf.split_to(2 + len);
    let _ = frame.split_to(2);
    Some(frame)
}

async fn write_framed(stream: &mut TcpStream, out: &[u8]) -> std::io::Result<()> {
    let Ok(len) = u16::try_from(out.len()) else {
        return Ok(());
    };
    let mut framed = Vec::with_capacity(out.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(out);
    stream.write_all(&framed).await
}
