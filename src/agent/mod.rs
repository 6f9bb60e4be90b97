//! The data plane on every host: VIP addresses on the local interface (`netif`), the TCP/UDP
//! forwarder (`forward`) and the embedded DNS (`dns`), driven by [`Agent`], which applies each
//! new `VipTable` in the order that never advertises a VIP before it works:
//! address installed → listener bound → name answered; removal runs the other way, and a
//! removed VIP's address stays until its open connections have drained (see
//! `Forwarder::retired`).
//! `stats` shows the forwarder's and the kernel path's counters through `model`'s
//! [`LiveStats`](crate::model::status::LiveStats) view, for the API.
//! Consumes `model::VipTable` from a watch channel; never imports `source` or `api`.

pub mod bpf;
pub mod dns;
pub mod forward;
pub mod handoff;
pub mod netif;
pub mod saved;
pub mod stats;

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::labels::{IpPolicy, LabelError, ReasonLabel};
use crate::model::{VipKey, VipTable, diff, unix_ms_now};
use dns::DnsCatalog;
use forward::Forwarder;
use netif::watch as linkwatch;
use netif::{InterfaceKind, Netif};

/// The agent's own metrics (apply and propagation).
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    applied_version: Gauge,
    apply_seconds: Histogram,
    propagation_seconds: Histogram,
    vips_live: Gauge,
    refused_ip_vips: Counter,
    netif_errors: Counter,
    reconciled: Counter,
    watch_overruns: Counter,
    /// The control plane's `label_errors` family (already registered): an IP VIP refused
    /// here is a label error like any other (`reason="host_address"`).
    label_errors: Family<ReasonLabel, Counter>,
}

impl AgentMetrics {
    /// Create and register under `registry`; refusals are also counted in `label_errors`.
    pub fn new(registry: &mut Registry, label_errors: Family<ReasonLabel, Counter>) -> Self {
        let buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let m = AgentMetrics {
            applied_version: Gauge::default(),
            apply_seconds: Histogram::new(buckets),
            propagation_seconds: Histogram::new(buckets),
            vips_live: Gauge::default(),
            refused_ip_vips: Counter::default(),
            netif_errors: Counter::default(),
            reconciled: Counter::default(),
            watch_overruns: Counter::default(),
            label_errors,
        };
        registry.register(
            "applied_table_version",
            "Version of the table this agent applied last",
            m.applied_version.clone(),
        );
        registry.register(
            "table_apply_seconds",
            "Time to apply a new table (addresses, listeners, DNS)",
            m.apply_seconds.clone(),
        );
        registry.register(
            "propagation_delay_seconds",
            "From a change seen at the source to the table applied here",
            m.propagation_seconds.clone(),
        );
        registry.register(
            "vips_live",
            "VIPs bound and answered on this agent",
            m.vips_live.clone(),
        );
        registry.register(
            "ip_vips_refused",
            "VIPs refused on this host: one of its own addresses, or an address or port no \
             listener may take (unspecified, multicast, broadcast, port 0)",
            m.refused_ip_vips.clone(),
        );
        registry.register(
            "interface_errors",
            "Failed address changes on the VIP interface",
            m.netif_errors.clone(),
        );
        registry.register(
            "interface_reconciled",
            "Times the VIP interface's addresses were found changed by someone else and put back",
            m.reconciled.clone(),
        );
        registry.register(
            "interface_watch_overruns",
            "Times the netlink watch of the VIP interface lost notifications (ENOBUFS) and the \
             link was checked in full",
            m.watch_overruns.clone(),
        );
        m
    }
}

/// How often the link's addresses are checked against the table while the netlink watch
/// ([`netif::watch`]) runs: a backstop only, the watch heals within milliseconds.
const BACKSTOP_EVERY: Duration = Duration::from_secs(5);

/// How often they are checked when the watch could not start or died.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);

/// What a controller refuses whatever its flags, refused again here before an address goes on
/// the VIP link: loopback and link-local addresses (and unspecified, multicast, broadcast).
const INSTALLABLE: IpPolicy = IpPolicy {
    allow_loopback: false,
    allowed: Vec::new(),
};

/// Why no listener may serve `k`, if so.
fn unservable(k: &VipKey) -> Option<LabelError> {
    let ip = k.ip.to_canonical();
    if ip.is_unspecified() {
        Some(LabelError::Unspecified(ip))
    } else if ip.is_multicast() {
        Some(LabelError::Multicast(ip))
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some(LabelError::Broadcast(ip))
    } else if k.port == 0 {
        Some(LabelError::BadPort("0".into()))
    } else {
        None
    }
}

/// Owns the data plane of one host.
pub struct Agent {
    netif: Netif,
    forwarder: Forwarder,
    dns: DnsCatalog,
    metrics: AgentMetrics,
    /// What is applied (published for the API): the table minus refused and unbindable VIPs.
    applied: watch::Sender<Arc<VipTable>>,
    /// VIPs that failed to bind on the last apply (retried).
    failed: HashSet<VipKey>,
    /// IP VIPs refused here so far (logged once each).
    refused: HashSet<VipKey>,
    last: Arc<VipTable>,
    /// Set when a successor took over: the stop then removes nothing (see [`handoff`]).
    handed_over: handoff::HandedOver,
}

/// An apply that changed at least this many VIPs, or this many backends, is followed by
/// [`crate::heap::release`] (small changes free too little to be worth one).
const TRIM_AFTER_VIPS: usize = 64;
const TRIM_AFTER_BACKENDS: usize = 4096;

impl Agent {
    pub fn new(netif: Netif, forwarder: Forwarder, dns: DnsCatalog, metrics: AgentMetrics) -> Self {
        let (applied, _) = watch::channel(Arc::new(VipTable::default()));
        Agent {
            netif,
            forwarder,
            dns,
            metrics,
            applied,
            failed: HashSet::new(),
            refused: HashSet::new(),
            last: Arc::new(VipTable::default()),
            handed_over: handoff::HandedOver::default(),
        }
    }

    /// Stop as a hand-over once `handed` is set: finish open connections, remove nothing.
    pub fn with_hand_over(mut self, handed: handoff::HandedOver) -> Self {
        self.handed_over = handed;
        self
    }

    /// The applied tables, for the API.
    pub fn applied(&self) -> watch::Receiver<Arc<VipTable>> {
        self.applied.subscribe()
    }

    /// Apply `table`. Never fails: every problem is logged and counted, and what can be served
    /// is served.
    pub async fn apply(&mut self, table: Arc<VipTable>) {
        let started = Instant::now();
        let table = self.refuse_unservable(table).await;
        // DNS answers depend only on which VIPs are live and their names, not on backends:
        // a backend-only change (the common case) leaves the catalog as it is.
        let d = diff(&self.last, &table);
        let renamed = d.changed.iter().any(|c| c.name_changed);
        let failed_before = std::mem::take(&mut self.failed);

        // 1. Stop answering names of VIPs that are going away (and of failed ones).
        if !d.removed.is_empty() || renamed {
            let staying = table
                .vips
                .values()
                .filter(|v| self.last.vips.contains_key(&v.key) && !failed_before.contains(&v.key));
            self.dns.publish(staying.map(|v| &**v));
        }

        // 2. Install the addresses of every VIP (before binding).
        let want: BTreeSet<IpAddr> = table.vips.keys().map(|k| k.ip).collect();
        if self.netif.kind() != InterfaceKind::None {
            let have: BTreeSet<IpAddr> = self.last.vips.keys().map(|k| k.ip).collect();
            let new: Vec<IpAddr> = want.difference(&have).copied().collect();
            if !new.is_empty()
                && let Err(e) = self.netif.add(&new).await
            {
                tracing::warn!(error = %e, "cannot install VIP addresses");
                self.metrics.netif_errors.inc();
            }
        }

        // 3. Bind listeners for new VIPs, update backends, close removed listeners.
        let report = self.forwarder.apply(&table).await;
        self.failed = report.failed.iter().map(|(k, _)| *k).collect();

        // 4. Answer every VIP that is live.
        if !d.added.is_empty() || !d.removed.is_empty() || renamed || self.failed != failed_before {
            let live = table
                .vips
                .values()
                .filter(|v| !self.failed.contains(&v.key));
            self.dns.publish(live.map(|v| &**v));
        }

        // Task names follow the running tasks; they need no address or listener.
        if table.apps != self.last.apps {
            self.dns.publish_tasks(&table.apps);
        }

        // 5. Remove addresses no VIP uses any more (and left-overs from earlier runs), except
        // those of removed VIPs whose connections still drain.
        self.sync_addresses(want).await;

        let applied = if self.failed.is_empty() {
            Arc::clone(&table)
        } else {
            let mut t = (*table).clone();
            for k in &self.failed {
                t.vips.remove(k);
            }
            Arc::new(t)
        };
        self.metrics.vips_live.set(applied.vips.len() as i64);
        self.metrics.applied_version.set(table.version as i64);
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        let new_version = table.version != self.last.version;
        if new_version && table.changed_at_ms > 0 {
            let delay_ms = unix_ms_now().saturating_sub(table.changed_at_ms);
            self.metrics
                .propagation_seconds
                .observe(delay_ms as f64 / 1000.0);
        }
        tracing::info!(
            version = table.version,
            live = applied.vips.len(),
            bound = report.bound.len(),
            removed = report.removed.len(),
            failed = report.failed.len(),
            apply_ms = started.elapsed().as_secs_f64() * 1000.0,
            "table applied"
        );
        // A retry that bound nothing new changes nothing a watcher of the API can see.
        if new_version || **self.applied.borrow() != *applied {
            self.applied.send_replace(applied);
        }
        let big = d.added.len() + d.removed.len() + d.changed.len() >= TRIM_AFTER_VIPS
            || self.last.backend_count().abs_diff(table.backend_count()) >= TRIM_AFTER_BACKENDS;
        self.last = table;
        if big {
            // What reading and applying a large table freed (the source's body and parse,
            // the old table) stays in glibc's arenas otherwise.
            tokio::task::spawn_blocking(crate::heap::release);
        }
    }

    /// Make the interface hold exactly `want` plus the addresses of removed VIPs that still
    /// drain: their clients use that address as their own, so removing it early would cut
    /// them off in silence.
    async fn sync_addresses(&mut self, mut want: BTreeSet<IpAddr>) {
        if self.netif.kind() == InterfaceKind::None {
            return;
        }
        want.extend(self.forwarder.retiring_addrs());
        if let Err(e) = self.netif.sync(&want).await {
            tracing::warn!(error = %e, "cannot reconcile VIP addresses");
            self.metrics.netif_errors.inc();
        }
    }

    /// Every address that belongs on the link now: the table's VIPs and those of removed VIPs
    /// that still drain ([`Netif::sync`] adds the kept ones).
    fn want(&self) -> BTreeSet<IpAddr> {
        let mut want: BTreeSet<IpAddr> = self.last.vips.keys().map(|k| k.ip).collect();
        want.extend(self.forwarder.retiring_addrs());
        want
    }

    /// Put back what the table says if the link (deleted, set down) or its addresses changed
    /// behind our back. `why` names what prompted it (a watch verdict, or the periodic check).
    async fn reconcile(&mut self, why: &'static str) {
        // Addresses alone changed (the common case, a flush): the link is as it was, so the
        // lookup is skipped and the VIPs are back one round trip sooner.
        let check_link = why != linkwatch::Why::Addresses.as_str();
        let heal = async {
            if check_link {
                self.netif.heal().await
            } else {
                Ok(false)
            }
        };
        let healed = match heal.await {
            Ok(healed) => healed,
            Err(e) => {
                tracing::warn!(error = %e, why, "cannot restore the VIP interface");
                self.metrics.netif_errors.inc();
                return;
            }
        };
        let want = self.want();
        match self.netif.sync(&want).await {
            Ok((added, removed)) if healed || !added.is_empty() || !removed.is_empty() => {
                tracing::warn!(
                    why,
                    link_restored = healed,
                    added = added.len(),
                    removed = removed.len(),
                    "VIP interface changed behind l4lb's back; reconciled"
                );
                self.metrics.reconciled.inc();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, why, "cannot reconcile VIP addresses");
                self.metrics.netif_errors.inc();
            }
        }
    }

    /// Whether a burst of link notifications asks for a reconcile, and why.
    fn judge(&self, notes: &[linkwatch::Note]) -> Option<linkwatch::Why> {
        let link = self.netif.watched()?;
        // Built only if an address of our link is in the burst (not for other links' news).
        let want = std::cell::OnceCell::new();
        let kept = self.netif.kept();
        linkwatch::burst_verdict(notes, link, |ip| {
            kept.contains(&ip) || want.get_or_init(|| self.want()).contains(&ip)
        })
    }

    /// Drop VIPs this host must not serve: VIPs (named or not) on an address of one of its
    /// interfaces or a broadcast address of its subnets (DESIGN §3), on loopback or
    /// link-local addresses when they would be installed on the VIP link, and, whatever a controller sends, any VIP on an address or port no
    /// listener may take (unspecified, multicast, broadcast, port 0): a buggy or hostile
    /// controller cannot make the agent bind a wildcard.
    async fn refuse_unservable(&mut self, table: Arc<VipTable>) -> Arc<VipTable> {
        let mut bad: Vec<(VipKey, LabelError)> = table
            .vips
            .keys()
            .filter_map(|k| unservable(k).map(|e| (*k, e)))
            .collect();
        if self.netif.kind() != InterfaceKind::None {
            // (With no interface nothing is installed: VIPs are expected to be local already,
            // loopback ones included.) Named VIPs too: a controller, or a `--vip-cidr` that
            // overlaps a node subnet, can hand out a host address as well as an IP label can.
            bad.extend(
                table
                    .vips
                    .keys()
                    .filter_map(|k| INSTALLABLE.check(k.ip).err().map(|e| (*k, e))),
            );
            match self.netif.host_addresses().await {
                Ok(host) => bad.extend(table.vips.keys().filter_map(|k| {
                    let ip = k.ip.to_canonical();
                    if host.own.contains(&ip) {
                        Some((*k, LabelError::HostAddress(ip)))
                    } else if host.broadcast.contains(&ip) {
                        Some((*k, LabelError::Broadcast(ip)))
                    } else {
                        None
                    }
                })),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list host addresses");
                    self.metrics.netif_errors.inc();
                }
            }
        }
        // Forget refusals of VIPs no longer sent (one that comes back is logged again), so
        // the set stays as small as the table.
        self.refused.retain(|k| bad.iter().any(|(b, _)| b == k));
        if bad.is_empty() {
            return table;
        }
        let mut t = (*table).clone();
        for (k, e) in bad {
            if t.vips.remove(&k).is_some() && self.refused.insert(k) {
                tracing::warn!(vip = %k, reason = e.reason(), "VIP refused: {e}");
                self.metrics.refused_ip_vips.inc();
                self.metrics
                    .label_errors
                    .get_or_create(&e.metric_label())
                    .inc();
            }
        }
        Arc::new(t)
    }

    /// Follow `tables` until `shutdown`, then drain: stop answering, stop accepting, let open
    /// connections finish for `grace`, remove the VIP addresses.
    /// `restored`, a table an earlier agent saved, is served until the source has one.
    pub async fn run(
        mut self,
        mut tables: watch::Receiver<Arc<VipTable>>,
        restored: Option<VipTable>,
        grace: Duration,
        shutdown: CancellationToken,
    ) {
        // Left-overs of a previous run are reconciled by the first apply (its final sync), so
        // VIPs that stay across a restart never leave the interface.
        let retry_every = Duration::from_secs(2);
        // Someone else's `ip addr flush`, `ip link set down` or `ip link del` is seen over
        // netlink and undone at once; the periodic check (a link lookup and an address dump)
        // is the backstop, and the only way when the watch cannot run.
        let mut watch = self.open_watch();
        let mut reconcile = backstop(watch.is_some());
        match restored {
            Some(t) if t.version != 0 && tables.borrow().version == 0 => {
                tracing::info!(
                    version = t.version,
                    vips = t.vips.len(),
                    "serving the saved table until the source has one"
                );
                self.apply(Arc::new(t)).await;
            }
            _ => loop {
                let first = tables.borrow_and_update().clone();
                if first.version != 0 {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return self.stop(grace).await,
                    r = tables.changed() => if r.is_err() { return self.stop(grace).await },
                }
            },
        }
        let t = tables.borrow_and_update().clone();
        if t.version != 0 {
            self.apply(t).await;
        }
        loop {
            let retry = !self.failed.is_empty();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = tables.changed() => {
                    if r.is_err() { break }
                    let t = tables.borrow_and_update().clone();
                    if t.version != 0 {
                        self.apply(t).await;
                    }
                }
                _ = tokio::time::sleep(retry_every), if retry => {
                    let t = Arc::clone(&self.last);
                    self.apply(t).await;
                }
                _ = reconcile.tick(), if self.netif.kind() != InterfaceKind::None => {
                    self.reconcile("periodic").await;
                }
                burst = next_burst(&mut watch) => match burst {
                    Some(notes) => {
                        if let Some(why) = self.judge(&notes) {
                            if why == linkwatch::Why::Overrun {
                                tracing::warn!("netlink watch lost notifications; checking the VIP interface in full");
                                self.metrics.watch_overruns.inc();
                            }
                            tracing::debug!(why = why.as_str(), notes = notes.len(), "VIP interface changed");
                            self.reconcile(why.as_str()).await;
                        }
                    }
                    None => {
                        tracing::warn!(every_ms = RECONCILE_EVERY.as_millis() as u64, "netlink watch of the VIP interface closed; checking it periodically instead");
                        watch = None;
                        reconcile = backstop(false);
                        self.reconcile("watch closed").await;
                    }
                },
                vip = self.forwarder.retired() => {
                    tracing::info!(%vip, "removed VIP drained; its address may go");
                    let want = self.last.vips.keys().map(|k| k.ip).collect();
                    self.sync_addresses(want).await;
                }
            }
        }
        self.stop(grace).await;
    }

    /// The netlink watch of the VIP link, unless there is no link or it cannot start.
    fn open_watch(&self) -> Option<linkwatch::LinkWatch> {
        if self.netif.kind() == InterfaceKind::None {
            return None;
        }
        match linkwatch::LinkWatch::open() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, every_ms = RECONCILE_EVERY.as_millis() as u64, "cannot watch the VIP interface; checking it periodically instead");
                self.metrics.netif_errors.inc();
                None
            }
        }
    }

    async fn stop(self, grace: Duration) {
        if self.handed_over.is_set() {
            // The successor answers the names, serves the VIPs and keeps the addresses.
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "handed over: finishing open connections, removing nothing"
            );
            self.forwarder.hand_over(grace).await;
            self.netif.hand_over();
            return;
        }
        self.dns.publish(std::iter::empty());
        self.dns.publish_tasks(&std::collections::BTreeMap::new());
        tracing::info!(grace_ms = grace.as_millis() as u64, "draining connections");
        self.forwarder.shutdown(grace).await;
        if self.netif.kind() != InterfaceKind::None {
            if let Err(e) = self.netif.clear().await {
                tracing::warn!(error = %e, "cannot remove VIP addresses");
            } else {
                tracing::info!("VIP addresses removed");
            }
        }
    }
}

/// The periodic check of the VIP link: a slow backstop beside the netlink watch, the only
/// check without it.
fn backstop(watching: bool) -> tokio::time::Interval {
    let every = if watching {
        BACKSTOP_EVERY
    } else {
        RECONCILE_EVERY
    };
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// The next burst of `watch`; pending forever without one. Cancel-safe.
async fn next_burst(watch: &mut Option<linkwatch::LinkWatch>) -> Option<Vec<linkwatch::Note>> {
    match watch {
        Some(w) => w.burst().await,
        None => std::future::pending().await,
    }
}
