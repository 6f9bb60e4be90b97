//! Shared per-VIP and per-backend state that the accept paths read without locks.
//!
//! A VIP's backend set is an immutable [`BackendSet`] behind an `ArcSwap`: `apply` builds a new
//! one (reusing the [`BackendShared`] of every backend that stays, so its counters, health and
//! open connections carry over) and swaps it in. Nothing here does I/O.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backend_series::BackendSeries;
use super::balancer::{self, Candidate, Failure, Health};
use super::{ForwardMetrics, VipSeries, lock};
use crate::model::{BackendState, Vip, VipKey};

/// One backend of one VIP, shared by the set, its connections and the stats handle.
#[derive(Debug)]
pub(crate) struct BackendShared {
    pub(crate) addr: SocketAddr,
    /// Open TCP connections (or UDP sessions), including connects in flight.
    pub(crate) active: AtomicU32,
    /// Bytes moved in both directions.
    pub(crate) bytes: AtomicU64,
    /// Passive health and the drain's kill token, under one lock (one lock less per backend:
    /// this struct is kept per backend of every VIP).
    guarded: Mutex<Guarded>,
    /// Bumped on every drain start/stop so a stale drain timer does nothing.
    drain_gen: AtomicU32,
    series: BackendSeries,
    /// Successful and failed connects to this backend of this VIP (the series above are per
    /// address, shared by every VIP the address backs).
    connects: AtomicU64,
    failures: AtomicU64,
    /// The VIP's byte counter (`l4lb_vip_bytes_total`).
    vip_bytes: Counter,
}

#[derive(Debug, Default)]
struct Guarded {
    health: Health,
    /// Cancelled when the drain timeout of this backend expires; connections then close.
    /// Made by the first connection that needs it: a child token is ~150 bytes, and most
    /// backends of a large agent (80,000 in `memory::a_controller`) never carry a connection.
    kill: Option<CancellationToken>,
}

impl BackendShared {
    pub(crate) fn new(addr: SocketAddr, metrics: &ForwardMetrics, vip_bytes: Counter) -> Self {
        BackendShared {
            addr,
            active: AtomicU32::new(0),
            bytes: AtomicU64::new(0),
            guarded: Mutex::default(),
            drain_gen: AtomicU32::new(0),
            series: metrics.backend_series(addr),
            connects: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            vip_bytes,
        }
    }

    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.guarded).health.is_ejected(now)
    }

    pub(crate) fn record_failure(&self, now: Instant, kind: Failure) {
        self.series.connect_failed();
        self.failures.fetch_add(1, Ordering::Relaxed);
        if lock(&self.guarded).health.record_failure(now, kind) {
            self.series.ejected();
            tracing::info!(backend = %self.addr, "backend ejected after connect failure");
        }
    }

    /// A connect that took `took` succeeded.
    pub(crate) fn record_success(&self, took: std::time::Duration) {
        self.series.observe_connect(took);
        self.connects.fetch_add(1, Ordering::Relaxed);
        lock(&self.guarded).health.record_success();
    }

    /// Successful connects to this backend of this VIP so far.
    pub(crate) fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Failed connects to this backend of this VIP so far.
    pub(crate) fn connect_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Connect latency so far, of every VIP this address backs (for the API's p50/p99).
    pub(crate) fn connect_latency(&self) -> super::latency::Snapshot {
        self.series.connect_latency()
    }

    /// The token a new connection to this backend closes on: a child of `parent` (the
    /// forwarder's hard kill), already cancelled if this backend's drain timeout expired.
    pub(crate) fn kill_token(&self, parent: &CancellationToken) -> CancellationToken {
        lock(&self.guarded)
            .kill
            .get_or_insert_with(|| parent.child_token())
            .clone()
    }

    /// The drain timeout expired: close every connection, and any that still starts.
    fn kill(&self) {
        lock(&self.guarded)
            .kill
            .get_or_insert_with(CancellationToken::new)
            .cancel();
    }

    pub(crate) fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.vip_bytes.inc_by(n);
    }

    /// Start draining: after `timeout` (if any) the open connections are closed, unless the
    /// backend turns active again first. Must run inside a tokio runtime.
    pub(crate) fn begin_drain(self: &Arc<Self>, timeout: Option<std::time::Duration>) {
        let generation = self.drain_gen.fetch_add(1, Ordering::AcqRel) + 1;
        let Some(timeout) = timeout else { return };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(me) = me.upgrade()
                && me.drain_gen.load(Ordering::Acquire) == generation
            {
                me.kill();
            }
        });
    }

    /// Stop draining (the backend is active again): a pending drain timer does nothing, and
    /// new connections get a fresh kill token.
    pub(crate) fn end_drain(&self) {
        self.drain_gen.fetch_add(1, Ordering::AcqRel);
        let mut g = lock(&self.guarded);
        if g.kill.as_ref().is_some_and(CancellationToken::is_cancelled) {
            g.kill = None;
        }
    }
}

impl Drop for BackendShared {
    fn drop(&mut self) {
        self.series.release(self.addr);
    }
}

/// A VIP's backends at one moment, sorted by address.
#[derive(Debug, Default)]
pub(crate) struct BackendSet {
    pub(crate) entries: Vec<(Arc<BackendShared>, BackendState)>,
}

impl BackendSet {
    pub(crate) fn get(&self, addr: SocketAddr) -> Option<&(Arc<BackendShared>, BackendState)> {
        self.entries
            .binary_search_by(|(b, _)| b.addr.cmp(&addr))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Pick a backend for a new flow, avoiding those in `tried`.
    pub(crate) fn choose<R: Rng + ?Sized>(
        &self,
        tried: &[SocketAddr],
        now: Instant,
        rng: &mut R,
    ) -> Option<Arc<BackendShared>> {
        let cands: Vec<Candidate> = self
            .entries
            .iter()
            .map(|(b, state)| Candidate {
                draining: *state != BackendState::Active,
                ejected: b.is_ejected(now),
                excluded: tried.contains(&b.addr),
                load: u64::from(b.active.load(Ordering::Relaxed)),
            })
            .collect();
        balancer::pick(&cands, rng).map(|i| Arc::clone(&self.entries[i].0))
    }
}

/// What `apply` changed in one VIP's backend set.
#[derive(Debug, Default)]
pub(crate) struct SetChange {
    /// Backends no longer in the set.
    pub(crate) removed: Vec<Arc<BackendShared>>,
}

/// One VIP's live state.
#[derive(Debug)]
pub(crate) struct VipShared {
    pub(crate) key: VipKey,
    pub(crate) set: ArcSwap<BackendSet>,
    /// This VIP's open TCP connections (a token each), so that a removed VIP can tell when
    /// its last one ended.
    pub(crate) conns: TaskTracker,
    /// Client connections forwarded / not forwarded.
    pub(crate) series: VipSeries,
}

impl VipShared {
    pub(crate) fn new(key: VipKey, metrics: &ForwardMetrics) -> Self {
        VipShared {
            key,
            set: ArcSwap::from_pointee(BackendSet::default()),
            conns: TaskTracker::new(),
            series: metrics.vip_series(&key),
        }
    }

    /// Make the set match `vip`, keeping the shared state of backends that stay, and start
    /// or stop draining as states change. Costs O(backends of this VIP).
    pub(crate) fn update(
        &self,
        vip: &Vip,
        metrics: &ForwardMetrics,
        drain_timeout: Option<std::time::Duration>,
    ) -> SetChange {
        let old = self.set.load_full();
        let mut entries = Vec::with_capacity(vip.backends.len());
        for b in &vip.backends {
            let shared = match old.get(b.addr) {
                Some((shared, old_state)) => {
                    match (*old_state, b.state) {
                        (BackendState::Active, BackendState::Draining) => {
                            shared.begin_drain(drain_timeout)
                        }
                        (BackendState::Draining, BackendState::Active) => shared.end_drain(),
                        _ => {}
                    }
                    Arc::clone(shared)
                }
                None => {
                    let shared = Arc::new(BackendShared::new(
                        b.addr,
                        metrics,
                        self.series.bytes.clone(),
                    ));
                    if b.state == BackendState::Draining {
                        shared.begin_drain(drain_timeout);
                    }
                    shared
                }
            };
            entries.push((shared, b.state));
        }
        // `vip.backends` is sorted and unique by address (VipTable::new normalizes).
        entries.sort_by_key(|(b, _)| b.addr);
        entries.dedup_by_key(|(b, _)| b.addr);
        let new = BackendSet { entries };
        let active = new
            .entries
            .iter()
            .filter(|(_, s)| *s == BackendState::Active)
            .count();
        self.series.backends_active.set(active as i64);
        let mut removed = Vec::new();
        for (b, state) in &old.entries {
            if new.get(b.addr).is_none() {
                // A backend that was already draining keeps its running drain timer.
                if *state == BackendState::Active {
                    b.begin_drain(drain_timeout);
                }
                removed.push(Arc::clone(b));
            }
        }
        self.set.store(Arc::new(new));
        SetChange { removed }
    }

    /// The VIP is gone: every backend drains.
    /// Shutdown: no new flow goes to any backend, but every backend stays listed, with its
    /// counters, while its connections drain.
    pub(crate) fn drain_all(&self) {
        let old = self.set.load();
        let entries = old
            .entries
            .iter()
            .map(|(b, _)| (Arc::clone(b), BackendState::Draining))
            .collect();
        self.set.store(Arc::new(BackendSet { entries }));
    }

    pub(crate) fn retire(&self, drain_timeout: Option<std::time::Duration>) {
        let old = self.set.swap(Arc::new(BackendSet::default()));
        for (b, state) in &old.entries {
            if *state == BackendState::Active {
                b.begin_drain(drain_timeout);
            }
        }
    }
}
#[cfg(test)]
mod size {
    /// Kept per backend of every VIP, in an `Arc` (16 bytes of counts before it): at 152
    /// bytes the allocation takes a 176-byte glibc chunk; 8 bytes more take 192.
    #[test]
    fn backend_state_fits_its_chunk() {
        assert!(std::mem::size_of::<super::BackendShared>() <= 152);
    }
}
