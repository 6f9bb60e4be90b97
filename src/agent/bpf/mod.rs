//! The kernel data path: VIPs translated inside `connect()`/`sendmsg()` by eBPF programs
//! attached to a cgroup2, so a VIP connection costs what a direct one costs.
//!
//! `progs/` holds the BPF C sources and their committed objects; `object` reads them (ELF
//! sections, BTF); `layout` mirrors their map layouts; `plan` is the pure planner from one
//! table to the next (map operations); `follow` decides when sockets connected to a backend
//! that left are closed (the proxy's drain semantics); [`KernelPath`] loads, attaches, pins,
//! applies and runs the socket iterators (the I/O shell); `probe` ejects TCP backends that
//! stop answering, since the agent no longer sees connect failures; [`run`] drives it all from
//! the table watch, as the forwarder is driven. The proxy listeners stay bound beside it: a
//! VIP the kernel does not translate (no active backend, a socket outside the cgroup) still
//! reaches the VIP address and the proxy serves it; [`KernelStats`] says which plane serves
//! each VIP, and why when it is the proxy.
//! Consumes `model::VipTable`; never imports `source`.

mod follow;
mod layout;
mod loader;
mod object;
mod plan;
mod probe;
mod sys;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::status::Plane;
use crate::model::{VipKey, VipTable};

pub use loader::KernelPath;
pub use plan::Ejected;

/// Where and how to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfConfig {
    /// Names the pin directory `<bpffs>/l4lb/<instance>`: unique per agent on one kernel.
    pub instance: String,
    /// The cgroup2 directory to attach to; `None`: the cgroup2 root, found in
    /// `/proc/self/mountinfo`, or mounted at `cgroup_mount` where none is mounted.
    pub cgroup: Option<PathBuf>,
    /// Where cgroup2 is mounted when none is.
    pub cgroup_mount: PathBuf,
    /// The BPF filesystem (mounted there when it is not).
    pub bpffs: PathBuf,
    /// Act only on sockets of the agent's own network namespace.
    pub netns_only: bool,
    /// How often health probes each TCP backend.
    pub probe_interval: Duration,
    /// A probe that has not connected by then failed.
    pub probe_timeout: Duration,
    /// `--drain-timeout`: TCP sockets connected to a backend that left the table are closed
    /// this long after (never when `None`); UDP ones at once.
    pub drain_timeout: Option<Duration>,
}

impl Default for BpfConfig {
    fn default() -> Self {
        BpfConfig {
            instance: "default".into(),
            cgroup: None,
            cgroup_mount: PathBuf::from("/run/l4lb/cgroup2"),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            netns_only: false,
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(1),
            drain_timeout: None,
        }
    }
}

/// Why the kernel path cannot start or apply.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14): {0}")]
    NetnsCookie(std::io::Error),
    #[error("cannot load the BPF object: {}", chain(.0.as_ref()))]
    Load(Box<aya::EbpfError>),
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    #[error("BPF program {name}: {}", chain(source))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("BPF link of {}: {}", .0, chain(.1))]
    Link(&'static str, aya::programs::links::LinkError),
    #[error("cannot pin {}: {}", .0, chain(.1))]
    Pin(&'static str, aya::pin::PinError),
    #[error("BPF map {name}: {}", chain(source))]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("programs an earlier agent left in {} are still attached", .0.display())]
    StillAttached(PathBuf),
}

/// `--data-plane`: where VIP traffic is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataPlane {
    /// The kernel path where it loads, else the proxy (the reason logged).
    Auto,
    /// The kernel path, or fail at start.
    Bpf,
    /// The splice proxy only.
    Proxy,
}

impl DataPlane {
    /// Start the data plane `self` asks for: `Ok` kernel path, or `Err(why)` for the proxy
    /// alone (the proxy listeners run in every mode). `Bpf` fails where the kernel path
    /// cannot load; `Auto` logs why and falls back.
    pub fn start(self, cfg: &BpfConfig) -> Result<Result<KernelPath, String>, BpfError> {
        match self {
            DataPlane::Proxy => Ok(Err("--data-plane proxy".into())),
            DataPlane::Bpf => KernelPath::load(cfg).map(Ok),
            DataPlane::Auto => match KernelPath::load(cfg) {
                Ok(k) => Ok(Ok(k)),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel data path unavailable: using the proxy");
                    Ok(Err(format!("kernel path unavailable: {e}")))
                }
            },
        }
    }
}

/// What the kernel counted per (VIP, backend), as of one read: the values by counter id, named
/// through the table and counter ids the planner made for them (shared with it, not copied:
/// ~16 bytes a counted backend).
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub(crate) table: Arc<VipTable>,
    pub(crate) ids: Arc<plan::CounterIds>,
    pub(crate) values: Arc<Vec<KernelCounters>>,
}

impl Counts {
    /// What was counted for `backend` of `vip` (`None`: it has no counter).
    pub fn get(&self, vip: &VipKey, backend: SocketAddr) -> Option<KernelCounters> {
        let id = plan::counter_of(&self.table, &self.ids, vip, backend)?;
        self.values.get(id as usize).copied()
    }

    /// Every counted (VIP, backend), in table order (a backend without a counter,
    /// [`plan::NO_COUNTER`], is past the end of `values` and left out).
    pub fn iter(&self) -> impl Iterator<Item = (&VipKey, SocketAddr, KernelCounters)> {
        self.table
            .vips
            .iter()
            .filter_map(|(k, v)| Some((k, v, self.ids.get(k)?)))
            .flat_map(move |(k, v, ids)| {
                v.backends
                    .iter()
                    .zip(ids.iter())
                    .filter_map(move |(b, id)| Some((k, b.addr, *self.values.get(*id as usize)?)))
            })
    }

    /// Every counted pair, keyed (for tests and small tables).
    pub fn by_pair(&self) -> BTreeMap<(VipKey, SocketAddr), KernelCounters> {
        self.iter().map(|(k, a, c)| ((*k, a), c)).collect()
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    counts: Counts,
    translated: BTreeSet<VipKey>,
    /// Why the VIPs of the last applied table that have no service entry have none.
    not_translated: BTreeMap<VipKey, plan::NotTranslated>,
    /// The last apply failed (the maps were cleared): every VIP goes to the proxy.
    map_error: Option<String>,
}

/// Why the proxy serves a VIP, as the `reason` label of `l4lb_data_plane` (a fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyReason {
    /// `--data-plane proxy`.
    Configured,
    /// The kernel path could not load (`--data-plane auto`).
    Unavailable,
    NoActiveBackend,
    AllEjected,
    MapsFull,
    MapsFailed,
    /// Not in the kernel maps yet (a table newer than the kernel path's last apply).
    Pending,
}

impl ProxyReason {
    pub fn label(self) -> &'static str {
        match self {
            ProxyReason::Configured => "configured",
            ProxyReason::Unavailable => "unavailable",
            ProxyReason::NoActiveBackend => "no_active_backend",
            ProxyReason::AllEjected => "all_ejected",
            ProxyReason::MapsFull => "maps_full",
            ProxyReason::MapsFailed => "maps_failed",
            ProxyReason::Pending => "pending",
        }
    }
}

/// Which plane serves one VIP, and why when it is the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaneOf {
    Kernel,
    Proxy(ProxyReason, String),
}

impl PlaneOf {
    /// `bpf` or `proxy`, as `/v1/vips` and the metric name them.
    pub fn plane(&self) -> Plane {
        match self {
            PlaneOf::Kernel => Plane::Kernel,
            PlaneOf::Proxy(..) => Plane::Proxy,
        }
    }

    pub fn name(&self) -> &'static str {
        self.plane().as_str()
    }

    /// Why the proxy serves the VIP (`None` for the kernel path).
    pub fn reason(&self) -> Option<&str> {
        match self {
            PlaneOf::Kernel => None,
            PlaneOf::Proxy(_, why) => Some(why),
        }
    }
}

/// The kernel's counters as of the last apply or refresh, shared with the API (and, when
/// registered, added to the metrics), and which plane serves each VIP.
#[derive(Debug, Clone, Default)]
pub struct KernelStats {
    inner: Arc<std::sync::RwLock<Snapshot>>,
    /// `l4lb_bpf_vips_translated`, when registered.
    translated: Option<Gauge>,
    /// Why the proxy serves every VIP (`None`: the kernel path runs).
    off: Option<Arc<str>>,
}

/// `l4lb_data_plane{vip, plane, reason}`, encoded from the table at every scrape.
#[derive(Debug)]
struct PlaneCollector {
    stats: KernelStats,
    table: watch::Receiver<Arc<VipTable>>,
}

impl prometheus_client::collector::Collector for PlaneCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let family: Family<[(&'static str, String); 3], Gauge> = Family::default();
        let table = self.table.borrow().clone();
        for k in table.vips.keys() {
            let p = self.stats.plane(k);
            let reason = match &p {
                PlaneOf::Kernel => "",
                PlaneOf::Proxy(r, _) => r.label(),
            };
            let labels = [
                ("vip", k.to_string()),
                ("plane", p.name().to_string()),
                ("reason", reason.to_string()),
            ];
            family.get_or_create(&labels).set(1);
        }
        let m = encoder.encode_descriptor(
            "data_plane",
            "Which plane serves each VIP (bpf: the kernel path; proxy: the splice proxy, with \
             the reason: configured, unavailable, no_active_backend, all_ejected, maps_full, \
             maps_failed, pending)",
            None,
            family.metric_type(),
        )?;
        family.encode(m)
    }
}

impl KernelStats {
    /// Register the kernel path's metrics and `l4lb_data_plane` (one series per VIP of
    /// `table`) under `registry`. `off`: why the proxy serves every VIP (`None`: the kernel
    /// path runs).
    pub fn new(
        registry: &mut Registry,
        off: Option<String>,
        table: watch::Receiver<Arc<VipTable>>,
    ) -> Self {
        let translated = Gauge::default();
        registry.register(
            "bpf_vips_translated",
            "VIPs the kernel path translates (the others go to the proxy)",
            translated.clone(),
        );
        let stats = KernelStats {
            inner: Arc::default(),
            translated: Some(translated),
            off: off.map(Arc::from),
        };
        registry.register_collector(Box::new(PlaneCollector {
            stats: stats.clone(),
            table,
        }));
        registry.register_collector(Box::new(CountsCollector(stats.clone())));
        stats
    }

    /// Whether the kernel path runs in this agent.
    pub fn runs(&self) -> bool {
        self.off.is_none()
    }

    /// Which plane serves `vip`, and why when it is the proxy.
    pub fn plane(&self, vip: &VipKey) -> PlaneOf {
        if let Some(why) = &self.off {
            let r = match why.starts_with("--") {
                true => ProxyReason::Configured,
                false => ProxyReason::Unavailable,
            };
            return PlaneOf::Proxy(r, why.to_string());
        }
        let snap = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if snap.translated.contains(vip) {
            return PlaneOf::Kernel;
        }
        if let Some(e) = &snap.map_error {
            return PlaneOf::Proxy(
                ProxyReason::MapsFailed,
                format!("kernel maps not updated: {e}"),
            );
        }
        let (r, why) = match snap.not_translated.get(vip) {
            Some(plan::NotTranslated::NoActiveBackend) => (
                ProxyReason::NoActiveBackend,
                "no active backend by the source's health",
            ),
            Some(plan::NotTranslated::AllEjected) => (
                ProxyReason::AllEjected,
                "all backends ejected: their TCP probes failed",
            ),
            Some(plan::NotTranslated::MapsFull) => (
                ProxyReason::MapsFull,
                "too many VIPs or backends for the kernel maps",
            ),
            None => (ProxyReason::Pending, "not in the kernel maps yet"),
        };
        PlaneOf::Proxy(r, why.to_string())
    }

    /// Replace the snapshot with what `kp` reads from the kernel now; `map_error`: the last
    /// apply failed so.
    fn refresh(&self, kp: &KernelPath, map_error: Option<String>) {
        let now = Snapshot {
            counts: kp.counters(),
            translated: kp.translated().copied().collect(),
            not_translated: kp.not_translated(),
            map_error,
        };
        if let Some(g) = &self.translated {
            g.set(now.translated.len() as i64);
        }
        *self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
    }

    /// The counters of `backend` of `vip`, if the kernel path knows them.
    pub fn backend(&self, vip: &VipKey, backend: SocketAddr) -> Option<KernelCounters> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .counts
            .get(vip, backend)
    }
}

/// `l4lb_bpf_connections` and `l4lb_bpf_datagrams{vip, backend}`: the kernel's counters as of
/// the last read, written at every scrape (no series kept between scrapes). A backend's
/// counter is zeroed when it is given to the backend, so a series starts from 0.
#[derive(Debug)]
struct CountsCollector(KernelStats);

/// Which count of a backend's a family writes.
type CountOf = fn(&KernelCounters) -> u64;

impl prometheus_client::collector::Collector for CountsCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::NoLabelSet;
        use prometheus_client::metrics::MetricType;
        // The snapshot's shared parts, so the lock is not held while writing.
        let counts = self
            .0
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .counts
            .clone();
        let families: [(&str, &str, CountOf); 2] = [
            (
                "bpf_connections",
                "Connections (TCP, connected UDP) the kernel path sent to a backend",
                |c| c.connections,
            ),
            (
                "bpf_datagrams",
                "Unconnected UDP datagrams the kernel path sent to a backend",
                |c| c.datagrams,
            ),
        ];
        for (name, help, value) in families {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (k, a, c) in counts.iter() {
                let labels = [("vip", k.to_string()), ("backend", a.to_string())];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&value(&c), None)?;
            }
        }
        Ok(())
    }
}

/// `e` and its causes, `: `-separated (aya's errors keep the OS error in their source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What the kernel counted for one backend of one VIP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// TCP connections and connected UDP sockets sent to it.
    pub connections: u64,
    /// Unconnected UDP datagrams sent to it.
    pub datagrams: u64,
}

/// How often [`run`] reads the kernel's counters into [`KernelStats`].
const STATS_EVERY: Duration = Duration::from_secs(1);

/// Follow `tables` (and health's ejections) until `shutdown`, then detach and unpin (unless
/// `handed` is set by then: a successor took the pins over). `stats` gets the kernel's
/// counters after every apply and every [`STATS_EVERY`].
pub async fn run(
    mut kp: KernelPath,
    cfg: &BpfConfig,
    mut tables: watch::Receiver<Arc<VipTable>>,
    stats: KernelStats,
    shutdown: CancellationToken,
    handed: crate::agent::handoff::HandedOver,
) -> Result<(), BpfError> {
    let mut refresh = tokio::time::interval(STATS_EVERY);
    let (targets_tx, targets_rx) = watch::channel(Arc::<Vec<SocketAddr>>::default());
    let (ejected_tx, mut ejected_rx) = watch::channel(plan::Ejected::default());
    let probe_stop = shutdown.child_token();
    let prober = tokio::spawn(probe::run(
        targets_rx,
        ejected_tx,
        cfg.probe_interval,
        cfg.probe_timeout,
        probe_stop.clone(),
    ));
    let mut table = tables.borrow_and_update().clone();
    let mut follow = follow::Follow::new(cfg.drain_timeout);
    'outer: loop {
        let ejected = ejected_rx.borrow_and_update().clone();
        let started = std::time::Instant::now();
        let waiting_before = kp.over_capacity();
        let applied = kp.apply(&table, &ejected);
        let map_error = applied.as_ref().err().map(ToString::to_string);
        let failed = applied.is_err();
        if kp.over_capacity() != waiting_before && kp.over_capacity() > 0 {
            tracing::warn!(
                vips = kp.over_capacity(),
                "kernel maps full: these VIPs stay with the proxy"
            );
        }
        match applied {
            Ok(ops) => tracing::debug!(
                version = table.version,
                ops,
                ejected = ejected.len(),
                apply_us = started.elapsed().as_micros() as u64,
                "kernel maps updated"
            ),
            Err(e) => tracing::warn!(error = %e, "kernel maps not updated; VIPs go to the proxy"),
        }
        targets_tx.send_if_modified(|t| {
            let now = kp.tcp_backends();
            let changed = **t != *now;
            if changed {
                *t = Arc::new(now);
            }
            changed
        });
        let close = follow.moved(kp.take_moves(), tokio::time::Instant::now());
        close_sockets(&mut kp, &close);
        stats.refresh(&kp, map_error.clone());
        loop {
            let drained = follow.next();
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                _ = tokio::time::sleep_until(drained.unwrap_or_else(tokio::time::Instant::now)),
                    if drained.is_some() =>
                {
                    let due = follow.due(tokio::time::Instant::now());
                    close_sockets(&mut kp, &due);
                }
                r = tables.changed() => {
                    if r.is_err() { break 'outer }
                    table = tables.borrow_and_update().clone();
                    break;
                }
                r = ejected_rx.changed() => if r.is_err() { break 'outer } else { break },
                _ = refresh.tick() => {
                    stats.refresh(&kp, map_error.clone());
                    if failed {
                        break; // the maps were cleared: rewrite them whole
                    }
                }
            }
        }
    }
    probe_stop.cancel();
    let _ = prober.await;
    if handed.is_set() {
        kp.release();
        return Ok(());
    }
    kp.close()
}

/// Close the sockets connected through `pairs` (logged; a failure is logged and skipped).
fn close_sockets(kp: &mut KernelPath, pairs: &[(VipKey, SocketAddr)]) {
    if pairs.is_empty() || kp.closes_sockets().is_err() {
        return;
    }
    match kp.destroy_sockets(pairs) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            sockets = n,
            backends = pairs.len(),
            "closed sockets connected to backends that left"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot close sockets connected to backends that left")
        }
    }
}
