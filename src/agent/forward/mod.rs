//! The data-plane forwarder: one TCP listener or UDP socket per VIP, moving client traffic to
//! the VIP's backends.
//!
//! [`Forwarder::apply`] makes the forwarder serve exactly a [`VipTable`], touching only what the
//! [`diff`] from the previous table says changed: per-VIP backend sets are swapped atomically
//! (the accept paths read them without locks) and backends that stay keep their connections,
//! sessions, counters and health. Pure cores ([`balancer`], [`udp::flows`]) take `now` and own
//! no sockets; [`tcp`] and `udp::io` are the I/O shells. Depends on `model` only, never on
//! `source`.

mod backend_series;
pub mod balancer;
mod latency;
mod splice;
mod state;
mod tcp;
pub(crate) use tcp::local_kind;
pub mod udp;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent::handoff::{Kind, Name, Sockets};
use crate::model::{Protocol, VipKey, VipTable, diff};
use backend_series::{BackendFamilies, BackendSeries};
use state::VipShared;

/// How long a removed VIP's address stays after its last connection ended, so that a client
/// closing its end just after ours still reaches it (its FIN is not lost to a missing address).
const RETIRE_LINGER: Duration = Duration::from_secs(1);

/// Size of the per-thread scratch buffer: TCP copies and UDP datagrams pass through it.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// Scratch space shared by every connection and session on a thread, so an idle one
    /// holds no buffer. Nothing may keep it across an `.await`.
    static SCRATCH_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; SCRATCH]);
}

/// Run `f` on this thread's scratch buffer ([`SCRATCH`] bytes).
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with_borrow_mut(|b| f(b))
}

/// Tunables of the forwarder (the agent's `--connect-timeout` and friends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// How long one TCP connect to a backend may take.
    pub connect_timeout: Duration,
    /// Further backends tried after a failed connect, for one client connection.
    pub connect_retries: u32,
    /// Close a TCP connection with no bytes in either direction for this long.
    pub tcp_idle_timeout: Option<Duration>,
    /// Close connections to a backend this long after it turned draining or left.
    pub drain_timeout: Option<Duration>,
    /// Global cap on open TCP connections; past it new ones are closed at once and counted.
    pub max_connections: usize,
    /// A UDP session with no datagram either way for this long expires.
    pub udp_idle_timeout: Duration,
    /// Global cap on UDP sessions (each holds a socket); past it datagrams from new clients
    /// are dropped and counted, existing sessions are unaffected.
    pub max_udp_sessions: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            connect_timeout: Duration::from_secs(1),
            connect_retries: 2,
            tcp_idle_timeout: None,
            drain_timeout: None,
            max_connections: 100_000,
            udp_idle_timeout: Duration::from_secs(30),
            max_udp_sessions: 65_536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabels {
    backend: AddrLabel,
}

impl BackendLabels {
    fn of(addr: SocketAddr) -> Self {
        BackendLabels {
            backend: AddrLabel(addr),
        }
    }
}

/// A backend address as a label value, written out only at scrape time. A `String` label
/// was a 24-byte header and a 32-byte allocation in four places per backend (two family
/// keys, the reference count, the series handle): ~9 MiB of an agent with 80,000 backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AddrLabel(SocketAddr);

impl EncodeLabelValue for AddrLabel {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        write!(e, "{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VipOnly {
    vip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VipLabels {
    vip: String,
    result: &'static str,
}

/// How many live backend sets (or VIPs) use each label value, so a series is removed when
/// the last user leaves and label sets stay bounded by what is served.
type SeriesRefs<K> = Arc<std::sync::Mutex<HashMap<K, usize>>>;

/// `m` locked, whether or not a holder panicked (what it guards stays consistent).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn series_acquire<K: std::hash::Hash + Eq>(refs: &SeriesRefs<K>, label: K) {
    let mut m = lock(refs);
    *m.entry(label).or_default() += 1;
}

/// True when `label` has no user left (its series are to be removed).
fn series_release<K: std::hash::Hash + Eq>(refs: &SeriesRefs<K>, label: &K) -> bool {
    let mut m = lock(refs);
    match m.get_mut(label) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            m.remove(label);
            true
        }
        None => false,
    }
}

/// The forwarder's Prometheus metrics (all `l4lb_`-prefixed). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ForwardMetrics {
    connections: Counter,
    connections_active: Gauge,
    connections_refused: Counter,
    connections_no_backend: Counter,
    connections_retried: Counter,
    bytes_c2b: Counter,
    bytes_b2c: Counter,
    /// Per-backend-address series; every backend holds a handle to its address's.
    backend: BackendFamilies,
    vip_connections: Family<VipLabels, Counter>,
    vip_bytes: Family<VipOnly, Counter>,
    vip_backends_active: Family<VipOnly, Gauge>,
    vip_refs: SeriesRefs<String>,
    local_errors: Family<KindLabels, Counter>,
    udp_sessions_active: Gauge,
    udp_sessions_refused: Counter,
    udp_c2b: Counter,
    udp_b2c: Counter,
    udp_bytes_c2b: Counter,
    udp_bytes_b2c: Counter,
}

const C2B: DirectionLabels = DirectionLabels {
    direction: "client_to_backend",
};
const B2C: DirectionLabels = DirectionLabels {
    direction: "backend_to_client",
};

impl ForwardMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let bytes = Family::<DirectionLabels, Counter>::default();
        let datagrams = Family::<DirectionLabels, Counter>::default();
        let udp_bytes = Family::<DirectionLabels, Counter>::default();
        let m = ForwardMetrics {
            connections: Counter::default(),
            connections_active: Gauge::default(),
            connections_refused: Counter::default(),
            connections_no_backend: Counter::default(),
            connections_retried: Counter::default(),
            bytes_c2b: bytes.get_or_create_owned(&C2B),
            bytes_b2c: bytes.get_or_create_owned(&B2C),
            backend: BackendFamilies::default(),
            vip_connections: Family::default(),
            vip_bytes: Family::default(),
            vip_backends_active: Family::default(),
            vip_refs: SeriesRefs::default(),
            local_errors: Family::default(),
            udp_sessions_active: Gauge::default(),
            udp_sessions_refused: Counter::default(),
            udp_c2b: datagrams.get_or_create_owned(&C2B),
            udp_b2c: datagrams.get_or_create_owned(&B2C),
            udp_bytes_c2b: udp_bytes.get_or_create_owned(&C2B),
            udp_bytes_b2c: udp_bytes.get_or_create_owned(&B2C),
        };
        registry.register(
            "connections",
            "TCP connections accepted on VIPs (including refused ones)",
            m.connections.clone(),
        );
        registry.register(
            "connections_active",
            "Open TCP connections through VIPs",
            m.connections_active.clone(),
        );
        registry.register(
            "connections_refused",
            "TCP connections closed at once for being over --max-connections",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_no_backend",
            "TCP connections closed because no backend could be reached",
            m.connections_no_backend.clone(),
        );
        registry.register(
            "connections_retried",
            "Backend connects retried on another backend after a failure",
            m.connections_retried.clone(),
        );
        registry.register("bytes", "Bytes forwarded over TCP", bytes);
        registry.register_collector(m.backend.collector());
        registry.register(
            "vip_connections",
            "TCP connections per VIP by result: ok (forwarded to a backend) or failed (no \
             backend reachable, or no local resources)",
            m.vip_connections.clone(),
        );
        registry.register(
            "vip_bytes",
            "Bytes forwarded per VIP, both directions (TCP and UDP payload)",
            m.vip_bytes.clone(),
        );
        registry.register(
            "vip_backends_active",
            "Backends of a VIP in state active in the applied table (ejected ones included)",
            m.vip_backends_active.clone(),
        );
        registry.register(
            "local_errors",
            "Connections closed for lack of local resources (descriptors, memory, ports), \
             by errno; never counted against a backend",
            m.local_errors.clone(),
        );
        registry.register(
            "udp_sessions_active",
            "Open UDP sessions",
            m.udp_sessions_active.clone(),
        );
        registry.register(
            "udp_sessions_refused",
            "UDP datagrams from new clients dropped over --max-udp-sessions or with no backend",
            m.udp_sessions_refused.clone(),
        );
        registry.register("udp_datagrams", "UDP datagrams forwarded", datagrams);
        registry.register("udp_bytes", "UDP payload bytes forwarded", udp_bytes);
        m
    }

    fn local_error(&self, kind: &'static str) {
        self.local_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// The series of one backend address; they live until its last holder releases them.
    fn backend_series(&self, addr: SocketAddr) -> BackendSeries {
        self.backend.acquire(addr)
    }

    /// The ok/failed counters of one VIP, removed when the last holder is dropped.
    fn vip_series(&self, key: &VipKey) -> VipSeries {
        let vip = key.to_string();
        series_acquire(&self.vip_refs, vip.clone());
        let l = |result| VipLabels {
            vip: vip.clone(),
            result,
        };
        let only = VipOnly { vip: vip.clone() };
        VipSeries {
            ok: self.vip_connections.get_or_create_owned(&l("ok")),
            failed: self.vip_connections.get_or_create_owned(&l("failed")),
            bytes: self.vip_bytes.get_or_create_owned(&only),
            backends_active: self.vip_backends_active.get_or_create_owned(&only),
            metrics: self.clone(),
            vip,
        }
    }
}

/// A VIP's connection counters; dropping the last one of a VIP removes its series.
#[derive(Debug)]
pub(crate) struct VipSeries {
    pub(crate) ok: Counter,
    pub(crate) failed: Counter,
    /// Shared with every backend of the VIP (one more relaxed add per chunk moved).
    pub(crate) bytes: Counter,
    pub(crate) backends_active: Gauge,
    metrics: ForwardMetrics,
    vip: String,
}

impl Drop for VipSeries {
    fn drop(&mut self) {
        let m = &self.metrics;
        if series_release(&m.vip_refs, &self.vip) {
            for result in ["ok", "failed"] {
                m.vip_connections.remove(&VipLabels {
                    vip: self.vip.clone(),
                    result,
                });
            }
            let only = VipOnly {
                vip: self.vip.clone(),
            };
            m.vip_bytes.remove(&only);
            m.vip_backends_active.remove(&only);
        }
    }
}

/// What one [`Forwarder::apply`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// VIPs newly bound by this apply (advertise them).
    pub bound: Vec<VipKey>,
    /// VIPs that could not be bound; the next apply tries them again.
    pub failed: Vec<(VipKey, std::io::Error)>,
    /// VIPs no longer served (stop advertising them).
    pub removed: Vec<VipKey>,
}

/// Live numbers for one backend of one VIP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendStats {
    /// Open TCP connections (or UDP sessions).
    pub active_connections: u64,
    /// Bytes forwarded, both directions.
    pub bytes: u64,
    /// Ejected by passive health right now.
    pub ejected: bool,
    /// Successful connects through this VIP, in total.
    pub connects: u64,
    /// Failed or timed-out connects through this VIP, in total.
    pub connect_failures: u64,
    /// Connect latency p50 and p99 in seconds, none before the first connect (per backend
    /// address: shared by every VIP it backs, like the Prometheus series).
    pub connect_p50: Option<f64>,
    pub connect_p99: Option<f64>,
}

/// Client connections of one VIP, by result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipStats {
    pub ok: u64,
    pub failed: u64,
}

/// Read-only view of the forwarder's per-backend numbers, for the HTTP API.
#[derive(Debug, Clone, Default)]
pub struct ForwardStats {
    vips: Arc<RwLock<HashMap<VipKey, Arc<VipShared>>>>,
}

impl ForwardStats {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<VipKey, Arc<VipShared>>> {
        self.vips.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers for `backend` of `vip`, if both are currently served.
    pub fn backend(&self, vip: &VipKey, backend: SocketAddr) -> Option<BackendStats> {
        let vips = self.vips.read().unwrap_or_else(PoisonError::into_inner);
        let set = vips.get(vip)?.set.load();
        let (b, _) = set.get(backend)?;
        let lat = b.connect_latency();
        Some(BackendStats {
            active_connections: u64::from(b.active.load(Ordering::Relaxed)),
            bytes: b.bytes.load(Ordering::Relaxed),
            ejected: b.is_ejected(Instant::now()),
            connects: b.connects(),
            connect_failures: b.connect_failures(),
            connect_p50: lat.quantile(0.5),
            connect_p99: lat.quantile(0.99),
        })
    }

    /// Client connections of `vip` by result, if it is served.
    pub fn vip(&self, vip: &VipKey) -> Option<VipStats> {
        let vips = self.vips.read().unwrap_or_else(PoisonError::into_inner);
        let v = vips.get(vip)?;
        Some(VipStats {
            ok: v.series.ok.get(),
            failed: v.series.failed.get(),
        })
    }
}

/// Shared by every task of the forwarder.
#[derive(Debug)]
struct Ctx {
    cfg: ForwardConfig,
    metrics: ForwardMetrics,
    /// One permit per open TCP connection (`max_connections`).
    permits: Arc<Semaphore>,
    /// One permit per UDP session (`max_udp_sessions`).
    udp_permits: Arc<Semaphore>,
    pipes: splice::PipePool,
    /// Use splice(2) (off only in tests, to exercise the copy fallback).
    splice: bool,
    /// Cancelled when the shutdown grace ends: every connection closes.
    hard_kill: CancellationToken,
    /// Accept loops and connections, for the bounded drain at shutdown.
    tracker: TaskTracker,
    /// Set when a successor took this agent's sockets over: a UDP VIP then stops reading
    /// but keeps its sessions (their replies) until they expire or the grace ends.
    handing_over: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct LiveVip {
    shared: Arc<VipShared>,
    /// Cancels this VIP's accept loop (or UDP loop).
    stop: CancellationToken,
    /// That loop; it closes the listener (or socket) when it returns.
    task: tokio::task::JoinHandle<()>,
    udp: Option<Arc<udp::io::UdpVip>>,
}

/// Serves the VIPs of the last applied table. Owned by the agent orchestrator.
#[derive(Debug)]
pub struct Forwarder {
    ctx: Arc<Ctx>,
    accept_stop: CancellationToken,
    /// What is served: the last applied table minus VIPs that failed to bind (which the next
    /// diff then sees as added again).
    current: VipTable,
    live: HashMap<VipKey, LiveVip>,
    stats: ForwardStats,
    /// Removed TCP VIPs with connections still open, counted (a VIP removed, re-added and
    /// removed again retires twice): their addresses must stay on the interface.
    retiring: HashMap<VipKey, usize>,
    retired_tx: mpsc::UnboundedSender<VipKey>,
    retired_rx: mpsc::UnboundedReceiver<VipKey>,
    /// Sockets inherited from a predecessor (taken before binding) and offered to a successor.
    sockets: Sockets,
}

/// A VIP's name in the hand-over manifest.
fn handoff_name(key: &VipKey) -> Name {
    let kind = match key.protocol {
        Protocol::Tcp => Kind::Tcp,
        Protocol::Udp => Kind::Udp,
    };
    Name::socket(kind, key.socket_addr())
}

impl Forwarder {
    /// A forwarder serving nothing yet. Cancelling `shutdown` stops every accept loop (the
    /// drain itself is [`Forwarder::shutdown`]'s job).
    pub fn new(cfg: ForwardConfig, metrics: ForwardMetrics, shutdown: CancellationToken) -> Self {
        let permits = Arc::new(Semaphore::new(
            cfg.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        let udp_permits = Arc::new(Semaphore::new(
            cfg.max_udp_sessions.min(Semaphore::MAX_PERMITS),
        ));
        let (retired_tx, retired_rx) = mpsc::unbounded_channel();
        Forwarder {
            ctx: Arc::new(Ctx {
                cfg,
                metrics,
                permits,
                udp_permits,
                pipes: splice::PipePool::new(256),
                splice: true,
                hard_kill: CancellationToken::new(),
                tracker: TaskTracker::new(),
                handing_over: std::sync::atomic::AtomicBool::new(false),
            }),
            accept_stop: shutdown.child_token(),
            current: VipTable::default(),
            live: HashMap::new(),
            stats: ForwardStats::default(),
            retiring: HashMap::new(),
            retired_tx,
            retired_rx,
            sockets: Sockets::default(),
        }
    }

    /// Serve VIPs from `sockets`' inherited listeners where it has them (a predecessor's,
    /// with `--take-over`), and offer every VIP socket bound from now on there.
    pub fn with_sockets(mut self, sockets: Sockets) -> Self {
        self.sockets = sockets;
        self
    }

    /// Make the forwarder serve exactly `table`: bind every VIP not yet bound, update the
    /// backend sets of VIPs that stay without touching their listener or the flows to
    /// staying backends, and close the listeners of VIPs that are gone (their open
    /// connections keep running). Costs O(changed VIPs + their backends) plus one linear
    /// diff, which skips VIPs shared by pointer with the previous table (build tables with
    /// [`VipTable::share_with`] to get that fast path).
    ///
    /// A removed TCP VIP with connections still open retires: its listener closes (new
    /// connections are refused), its connections run until they end or the drain timeout
    /// resets them, and its address is listed by [`Forwarder::retiring_addrs`] until
    /// [`Forwarder::retired`] reports it.
    pub async fn apply(&mut self, table: &VipTable) -> ApplyReport {
        let mut report = ApplyReport::default();
        if self.accept_stop.is_cancelled() {
            // Shutting down: bind nothing new (it would not accept anyway).
            return report;
        }
        let d = diff(&self.current, table);
        self.current.version = table.version;
        self.current.changed_at_ms = table.changed_at_ms;
        if d.is_empty() {
            return report;
        }
        let ctx = &self.ctx;
        let drain = ctx.cfg.drain_timeout;

        let mut stopped = Vec::new();
        for key in &d.removed {
            self.current.vips.remove(key);
            if let Some(live) = self.live.remove(key) {
                self.sockets.withdraw(&handoff_name(key));
                live.stop.cancel();
                stopped.push((*key, live.task, Arc::clone(&live.shared)));
                live.shared.retire(drain);
                if let Some(u) = &live.udp {
                    u.drop_all();
                }
                self.stats.write().remove(key);
                report.removed.push(*key);
            }
        }
        for change in &d.changed {
            let (Some(live), Some(vip)) = (self.live.get(&change.key), table.vips.get(&change.key))
            else {
                continue;
            };
            self.current.vips.insert(change.key, Arc::clone(vip));
            let c = live.shared.update(vip, &ctx.metrics, drain);
            if let Some(u) = &live.udp {
                u.drop_backends(&c.removed);
            }
        }
        for key in &d.added {
            let Some(vip) = table.vips.get(key) else {
                continue;
            };
            let shared = Arc::new(VipShared::new(*key, &ctx.metrics));
            shared.update(vip, &ctx.metrics, drain);
            let stop = self.accept_stop.child_token();
            // Every event of this VIP's loop, and of the connections it spawns, carries it.
            let span = tracing::info_span!("vip", vip = %key);
            let addr = key.socket_addr();
            let bound = match key.protocol {
                Protocol::Tcp => match self.sockets.take_tcp(Kind::Tcp, addr) {
                    Some(l) => tokio::net::TcpListener::from_std(l),
                    None => tcp::bind(addr),
                }
                .map(|listener| {
                    let listener = Arc::new(listener);
                    self.sockets
                        .offer_shared(handoff_name(key), Arc::clone(&listener) as _);
                    let task = ctx.tracker.spawn(
                        tcp::accept_loop(
                            Arc::clone(ctx),
                            Arc::clone(&shared),
                            listener,
                            stop.clone(),
                        )
                        .instrument(span),
                    );
                    (task, None)
                }),
                Protocol::Udp => {
                    let inherited = self.sockets.take_udp(Kind::Udp, addr);
                    udp::io::UdpVip::bind(Arc::clone(ctx), Arc::clone(&shared), inherited).map(
                        |u| {
                            self.sockets
                                .offer_shared(handoff_name(key), u.socket() as _);
                            let u = Arc::new(u);
                            let task = ctx
                                .tracker
                                .spawn(Arc::clone(&u).run(stop.clone()).instrument(span));
                            (task, Some(u))
                        },
                    )
                }
            };
            match bound {
                Ok((task, udp)) => {
                    self.stats.write().insert(*key, Arc::clone(&shared));
                    let live = LiveVip {
                        shared,
                        stop,
                        task,
                        udp,
                    };
                    self.live.insert(*key, live);
                    self.current.vips.insert(*key, Arc::clone(vip));
                    report.bound.push(*key);
                }
                Err(e) => {
                    tracing::warn!(vip = %key, error = %e, "cannot bind VIP");
                    report.failed.push((*key, e));
                }
            }
        }
        // Removed VIPs stop accepting before apply returns, so their listeners are closed
        // (and their addresses free to bind again) when the caller sees the report.
        for (key, task, shared) in stopped {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "VIP loop ended abnormally");
            }
            // The accept loop is over: no connection joins `conns` any more.
            shared.conns.close();
            if shared.conns.is_empty() {
                continue;
            }
            tracing::info!(vip = %key, open = shared.conns.len(), "VIP removed; draining its connections");
            *self.retiring.entry(key).or_default() += 1;
            let tx = self.retired_tx.clone();
            tokio::spawn(async move {
                shared.conns.wait().await;
                tokio::time::sleep(RETIRE_LINGER).await;
                // The receiver lives as long as the forwarder; a send after it is gone has
                // nobody left to tell.
                let _ = tx.send(key);
            });
        }
        report
    }

    /// Addresses of removed VIPs whose connections are still open (see [`Forwarder::apply`]).
    pub fn retiring_addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.retiring.keys().map(|k| k.ip)
    }

    /// Wait until a removed VIP's last connection has ended (and [`RETIRE_LINGER`] passed);
    /// it is then no longer in [`Forwarder::retiring_addrs`]. Pending while none is retiring.
    /// Cancel-safe.
    pub async fn retired(&mut self) -> VipKey {
        loop {
            // The sender is ours too: the channel never closes.
            let Some(key) = self.retired_rx.recv().await else {
                return std::future::pending().await;
            };
            if let Entry::Occupied(mut e) = self.retiring.entry(key) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
                return key;
            }
        }
    }

    /// Copy instead of splicing, to test the fallback path. Call before the first apply.
    #[cfg(test)]
    fn without_splice(mut self) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.splice = false;
        }
        self
    }

    /// Splice in, but have every splice out refused, to test the mid-stream fallback. Call
    /// before the first apply.
    #[cfg(test)]
    fn refusing_splice_out(mut self) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.pipes.refuse_out = true;
        }
        self
    }

    /// A read-only stats handle for the HTTP API.
    pub fn stats(&self) -> ForwardStats {
        self.stats.clone()
    }

    /// [`Forwarder::shutdown`] after a successor took the sockets over: stop accepting and
    /// reading (the successor does), and let open TCP connections and the replies of UDP
    /// sessions finish for up to `grace`.
    pub async fn hand_over(self, grace: Duration) {
        self.ctx.handing_over.store(true, Ordering::SeqCst);
        self.shutdown(grace).await;
    }

    /// Stop accepting everywhere, let open TCP connections finish for up to `grace`, then
    /// close whatever is left.
    pub async fn shutdown(self, grace: Duration) {
        // The listeners close with their loops (none is kept open for a successor).
        for key in self.live.keys() {
            self.sockets.withdraw(&handoff_name(key));
        }
        self.accept_stop.cancel();
        for live in self.live.values() {
            live.shared.drain_all();
        }
        self.ctx.tracker.close();
        if tokio::time::timeout(grace, self.ctx.tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.ctx.tracker.len(),
                "shutdown grace over; closing open connections"
            );
            self.ctx.hard_kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.ctx.tracker.wait()).await;
        }
    }
}

impl Drop for Forwarder {
    /// A forwarder nobody can update any more stops accepting; open connections continue
    /// (use [`Forwarder::shutdown`] for a bounded drain).
    fn drop(&mut self) {
        self.accept_stop.cancel();
    }
}
