//! Connect latency per backend: a fixed-bucket histogram of atomics, recorded on every
//! successful backend connect, exported to Prometheus as `l4lb_backend_connect_seconds` and
//! read back as p50/p99 for the status page. Lock-free (two relaxed atomic adds and a bucket
//! search over 18 bounds per connection); prometheus-client's own histogram takes a mutex
//! per observation and cannot hand its buckets back. Pure: no I/O, no clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds in seconds: 25 µs (a loopback connect) to 5 s (past any sane
/// `--connect-timeout`); an implicit +Inf bucket follows.
pub(crate) const BOUNDS: [f64; 18] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds, for the hot path (no float work per connection).
const BOUNDS_NS: [u64; 18] = {
    let mut out = [0u64; 18];
    let mut i = 0;
    while i < 18 {
        out[i] = (BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

#[derive(Debug, Default)]
struct Inner {
    /// Per-bucket (not cumulative) counts; the last is +Inf.
    counts: [AtomicU64; 19],
    sum_ns: AtomicU64,
}

/// A connect-latency histogram; clones share the counts.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectLatency(Arc<Inner>);

/// A consistent-enough copy of the counts (each read is atomic, the set is not).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) counts: [u64; 19],
    pub(crate) sum_seconds: f64,
}

impl ConnectLatency {
    pub(crate) fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|b| *b < ns);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut counts = [0u64; 19];
        for (c, a) in counts.iter_mut().zip(&self.0.counts) {
            *c = a.load(Ordering::Relaxed);
        }
        Snapshot {
            counts,
            sum_seconds: self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

impl Snapshot {
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1), interpolated linearly inside its bucket as Prometheus's
    /// `histogram_quantile` does; `None` with no observations. Past the last bound it is
    /// the last bound.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let Some(&hi) = BOUNDS.get(i) else {
                    return BOUNDS.last().copied();
                };
                let lo = if i == 0 { 0.0 } else { BOUNDS[i - 1] };
                let frac = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
                return Some(lo + (hi - lo) * frac);
            }
            below += c;
        }
        BOUNDS.last().copied()
    }
}

impl TypedMetric for ConnectLatency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConnectLatency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        let buckets: Vec<(f64, u64)> = BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(s.counts)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(s.sum_seconds, s.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn observations_land_in_their_bucket() {
        for (d, bucket) in [
            (Duration::ZERO, 0),
            (us(25), 0),
            (us(26), 1),
            (us(100), 2),
            (Duration::from_millis(1), 5),
            (Duration::from_secs(10), 17),
            (Duration::from_secs(11), 18),
            (Duration::MAX, 18),
        ] {
            let h = ConnectLatency::default();
            h.observe(d);
            let s = h.snapshot();
            assert_eq!(s.counts[bucket], 1, "{d:?}");
            assert_eq!(s.count(), 1);
        }
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let h = ConnectLatency::default();
        assert_eq!(h.snapshot().quantile(0.5), None);
        // 100 connects in (50, 100] µs, one slow one in (250, 500] ms.
        for _ in 0..100 {
            h.observe(us(80));
        }
        h.observe(Duration::from_millis(300));
        let s = h.snapshot();
        let p50 = s.quantile(0.5).unwrap();
        assert!((50e-6..=100e-6).contains(&p50), "{p50}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((50e-6..=100e-6).contains(&p99), "{p99}");
        assert!((0.25..=0.5).contains(&s.quantile(1.0).unwrap()));
        assert!((s.sum_seconds - (100.0 * 80e-6 + 0.3)).abs() < 1e-9);
    }

    #[test]
    fn encodes_as_a_prometheus_histogram() {
        let mut reg = prometheus_client::registry::Registry::with_prefix("l4lb");
        let h = ConnectLatency::default();
        reg.register("backend_connect_seconds", "connect latency", h.clone());
        h.observe(us(80));
        h.observe(Duration::from_secs(20));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("# TYPE l4lb_backend_connect_seconds histogram"),
            "{out}"
        );
        assert!(
            out.contains("l4lb_backend_connect_seconds_bucket{le=\"0.0001\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("l4lb_backend_connect_seconds_bucket{le=\"10.0\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("l4lb_backend_connect_seconds_count 2"),
            "{out}"
        );
    }

    proptest! {
        #[test]
        fn quantiles_are_monotonic_and_bounded(
            obs in proptest::collection::vec(0u64..20_000_000, 1..200),
            a in 0.0f64..1.0, b in 0.0f64..1.0,
        ) {
            let h = ConnectLatency::default();
            for o in &obs {
                h.observe(us(*o));
            }
            let s = h.snapshot();
            prop_assert_eq!(s.count(), obs.len() as u64);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let (ql, qh) = (s.quantile(lo).unwrap(), s.quantile(hi).unwrap());
            prop_assert!(ql <= qh, "q({lo})={ql} > q({hi})={qh}");
            prop_assert!((0.0..=10.0).contains(&qh));
        }
    }
}
