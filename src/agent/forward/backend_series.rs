//! What is counted per backend address (connect failures, ejections, connect latency): one
//! shared record per address, whatever number of VIPs it backs, written out only when
//! `/metrics` is scraped.
//!
//! A `Family` per metric kept, per backend, two map entries, two counter allocations and a
//! reference count in a third map (~210 bytes of each backend of a 100,000-backend agent).
//! Here an address costs one map entry and one allocation; its series exist from the moment
//! it backs a VIP and leave with the last VIP that holds it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::latency::{self, ConnectLatency};
use super::{BackendLabels, lock};

/// The series of one backend address.
#[derive(Debug, Default)]
struct AddrSeries {
    connect_failures: AtomicU64,
    ejections: AtomicU64,
    /// Made at the first successful connect: a backend never connected to exports no
    /// histogram (20 lines per backend on a large agent's `/metrics` otherwise).
    connect_seconds: OnceLock<ConnectLatency>,
}

/// Every backend address's series; cheap to clone (one `Arc`).
#[derive(Debug, Clone, Default)]
pub(crate) struct BackendFamilies(Arc<Mutex<HashMap<SocketAddr, Held>>>);

/// An address's series and how many backends (one per VIP it backs) hold them. Counted
/// here rather than read from the `Arc`, which a scrape in progress also holds, and beside
/// the series rather than in a [`super::SeriesRefs`] map: one entry per address, not two.
#[derive(Debug, Default)]
struct Held {
    holders: u32,
    series: Arc<AddrSeries>,
}

impl BackendFamilies {
    /// A handle on `addr`'s series, made if this is its first holder.
    pub(crate) fn acquire(&self, addr: SocketAddr) -> BackendSeries {
        let mut by_addr = lock(&self.0);
        let held = by_addr.entry(addr).or_default();
        held.holders += 1;
        let series = Arc::clone(&held.series);
        BackendSeries {
            series,
            families: self.clone(),
        }
    }

    /// Connect failures counted for `addr` (0 when it backs no VIP).
    #[cfg(test)]
    pub(crate) fn connect_failures(&self, addr: SocketAddr) -> u64 {
        lock(&self.0)
            .get(&addr)
            .map_or(0, |h| h.series.connect_failures.load(Ordering::Relaxed))
    }

    /// The registry's view: `l4lb_backend_connect_failures`, `l4lb_backend_ejections` and
    /// `l4lb_backend_connect_seconds`, per address.
    pub(crate) fn collector(&self) -> Box<dyn Collector> {
        Box::new(Scrape(self.clone()))
    }
}

/// A backend's handle on its address's series; the last [`BackendSeries::release`] of an
/// address removes them.
#[derive(Debug)]
pub(crate) struct BackendSeries {
    series: Arc<AddrSeries>,
    families: BackendFamilies,
}

impl BackendSeries {
    pub(crate) fn connect_failed(&self) {
        self.series.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ejected(&self) {
        self.series.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Record one successful connect (one atomic load once the histogram exists).
    pub(crate) fn observe_connect(&self, took: Duration) {
        self.series
            .connect_seconds
            .get_or_init(ConnectLatency::default)
            .observe(took);
    }

    /// Connect latency so far (empty before the first connect).
    pub(crate) fn connect_latency(&self) -> latency::Snapshot {
        self.series
            .connect_seconds
            .get()
            .map(ConnectLatency::snapshot)
            .unwrap_or_default()
    }

    /// This holder of `addr`'s series (its backend's address, not kept twice) lets go;
    /// the last holder of an address removes its series.
    pub(crate) fn release(&self, addr: SocketAddr) {
        let mut by_addr = lock(&self.families.0);
        if let Some(held) = by_addr.get_mut(&addr)
            && Arc::ptr_eq(&held.series, &self.series)
        {
            held.holders = held.holders.saturating_sub(1);
            if held.holders == 0 {
                by_addr.remove(&addr);
            }
        }
    }
}

struct Scrape(BackendFamilies);

/// Which counter of an address's series a family writes.
type CounterOf = fn(&AddrSeries) -> &AtomicU64;

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendFamilies::collector")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A copy of the handles (not of the histograms), so the lock is not held while
        // writing: connects and applies go on during a scrape.
        let mut all: Vec<(SocketAddr, Arc<AddrSeries>)> = lock(&self.0.0)
            .iter()
            .map(|(a, h)| (*a, Arc::clone(&h.series)))
            .collect();
        all.sort_unstable_by_key(|(a, _)| *a);
        let counters: [(&str, &str, CounterOf); 2] = [
            (
                "backend_connect_failures",
                "Failed or timed-out connects per backend",
                |s| &s.connect_failures,
            ),
            (
                "backend_ejections",
                "Passive-health ejections per backend",
                |s| &s.ejections,
            ),
        ];
        for (name, help, value) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (a, s) in &all {
                let labels = BackendLabels::of(*a);
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(
                        &value(s).load(Ordering::Relaxed),
                        None,
                    )?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "backend_connect_seconds",
            "Time to connect to a backend (successful connects), per backend",
            None,
            MetricType::Histogram,
        )?;
        for (a, s) in &all {
            if let Some(h) = s.connect_seconds.get() {
                let labels = BackendLabels::of(*a);
                h.encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
