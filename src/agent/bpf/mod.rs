//! The kernel data path: VIPs translated inside `connect()`/`sendmsg()` by eBPF programs
//! attached to a cgroup2, so a VIP connection costs what a direct one costs.
//!
//! `progs/` holds the BPF C source and its committed object; `layout` mirrors its map
//! layouts; `plan` is the pure planner from one table to the next (map operations);
//! [`KernelPath`] loads, attaches, pins and applies (the I/O shell); `probe` ejects backends
//! that stop answering, since the agent no longer sees connect failures; [`run`] drives it all
//! from the table watch, as the forwarder is driven. The proxy listeners stay bound beside it:
//! a VIP the kernel does not translate (no active backend, a socket outside the cgroup) still
//! reaches the VIP address and the proxy serves it.
//! Consumes `model::VipTable`; never imports `source`.

mod layout;
mod loader;
mod plan;
mod probe;
mod sys;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{VipKey, VipTable};

pub use loader::KernelPath;

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
    /// Start the data plane `self` asks for: `Some` kernel path, or `None` for the proxy
    /// alone (the proxy listeners run in every mode). `Bpf` fails where the kernel path
    /// cannot load; `Auto` logs why and falls back.
    pub fn start(self, cfg: &BpfConfig) -> Result<Option<KernelPath>, BpfError> {
        match self {
            DataPlane::Proxy => Ok(None),
            DataPlane::Bpf => KernelPath::load(cfg).map(Some),
            DataPlane::Auto => match KernelPath::load(cfg) {
                Ok(k) => Ok(Some(k)),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel data path unavailable: using the proxy");
                    Ok(None)
                }
            },
        }
    }
}

/// `[("vip", …), ("backend", …)]`: the labels of the kernel path's per-backend counters.
type VipBackendLabels = [(&'static str, String); 2];

/// The kernel path's metrics: which data plane runs, and what the kernel counted.
#[derive(Debug, Clone)]
pub struct KernelMetrics {
    connections: Family<VipBackendLabels, Counter>,
    datagrams: Family<VipBackendLabels, Counter>,
    translated: Gauge,
}

impl KernelMetrics {
    /// Register under `registry`, with `data_plane{plane}` set to 1 for `plane`.
    pub fn new(registry: &mut Registry, plane: &'static str) -> Self {
        let info: Family<[(&'static str, &'static str); 1], Gauge> = Family::default();
        info.get_or_create(&[("plane", plane)]).set(1);
        registry.register(
            "data_plane",
            "The data plane this agent runs (bpf: kernel path and proxy; proxy: proxy only)",
            info,
        );
        let m = KernelMetrics {
            connections: Family::default(),
            datagrams: Family::default(),
            translated: Gauge::default(),
        };
        registry.register(
            "bpf_connections",
            "Connections (TCP, connected UDP) the kernel path sent to a backend",
            m.connections.clone(),
        );
        registry.register(
            "bpf_datagrams",
            "Unconnected UDP datagrams the kernel path sent to a backend",
            m.datagrams.clone(),
        );
        registry.register(
            "bpf_vips_translated",
            "VIPs the kernel path translates (the others go to the proxy)",
            m.translated.clone(),
        );
        m
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    counters: BTreeMap<(VipKey, SocketAddr), KernelCounters>,
    translated: BTreeSet<VipKey>,
}

/// The kernel's counters as of the last apply or refresh, shared with the API (and, given
/// [`KernelMetrics`], added to them).
#[derive(Debug, Clone, Default)]
pub struct KernelStats {
    inner: Arc<std::sync::RwLock<Snapshot>>,
    metrics: Option<KernelMetrics>,
}

impl KernelStats {
    pub fn with_metrics(metrics: KernelMetrics) -> Self {
        KernelStats {
            inner: Arc::default(),
            metrics: Some(metrics),
        }
    }

    /// Replace the snapshot with what `kp` reads from the kernel now.
    pub fn refresh(&self, kp: &KernelPath) {
        let now = Snapshot {
            counters: kp.counters(),
            translated: kp.translated().copied().collect(),
        };
        let mut snap = self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = &self.metrics {
            for ((k, a), c) in &now.counters {
                let old = snap.counters.get(&(*k, *a)).copied().unwrap_or_default();
                // A counter that went down was reused for a new backend: count it from 0.
                let delta = |new: u64, old: u64| if new >= old { new - old } else { new };
                let labels = [("vip", k.to_string()), ("backend", a.to_string())];
                m.connections
                    .get_or_create(&labels)
                    .inc_by(delta(c.connections, old.connections));
                m.datagrams
                    .get_or_create(&labels)
                    .inc_by(delta(c.datagrams, old.datagrams));
            }
            for (k, a) in snap.counters.keys() {
                if !now.counters.contains_key(&(*k, *a)) {
                    let labels = [("vip", k.to_string()), ("backend", a.to_string())];
                    m.connections.remove(&labels);
                    m.datagrams.remove(&labels);
                }
            }
            m.translated.set(now.translated.len() as i64);
        }
        *snap = now;
    }

    /// The counters of `backend` of `vip`, if the kernel path knows them.
    pub fn backend(&self, vip: &VipKey, backend: SocketAddr) -> Option<KernelCounters> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .counters
            .get(&(*vip, backend))
            .copied()
    }

    /// Whether the kernel path translates `vip` (else the proxy serves it).
    pub fn translates(&self, vip: &VipKey) -> bool {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .translated
            .contains(vip)
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
    let (targets_tx, targets_rx) = watch::channel(HashSet::new());
    let (ejected_tx, mut ejected_rx) = watch::channel(BTreeSet::new());
    let probe_stop = shutdown.child_token();
    let prober = tokio::spawn(probe::run(
        targets_rx,
        ejected_tx,
        cfg.probe_interval,
        cfg.probe_timeout,
        probe_stop.clone(),
    ));
    let mut table = tables.borrow_and_update().clone();
    'outer: loop {
        let ejected = ejected_rx.borrow_and_update().clone();
        let started = std::time::Instant::now();
        let waiting_before = kp.over_capacity();
        let applied = kp.apply(&table, &ejected);
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
            let changed = *t != now;
            if changed {
                *t = now;
            }
            changed
        });
        stats.refresh(&kp);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                r = tables.changed() => {
                    if r.is_err() { break 'outer }
                    table = tables.borrow_and_update().clone();
                    break;
                }
                r = ejected_rx.changed() => if r.is_err() { break 'outer } else { break },
                _ = refresh.tick() => {
                    stats.refresh(&kp);
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
