//! Backend choice and passive health, as pure functions of a snapshot and `now`.
//!
//! No sockets and no clocks here: the TCP and UDP shells read the atomics they own into
//! [`Candidate`]s, call [`pick`], and report connect outcomes to a [`Health`].
//!
//! Policy:
//! - [`pick`] is power of two choices by fewest active flows over backends that are active,
//!   not ejected and not already tried for this client connection.
//! - If every such backend is ejected, it fails open and picks among the ejected ones.
//! - Draining backends never get new flows.
//! - [`Health`]: a refused connect ejects at once (nothing listens there, so retrying it only
//!   costs the next client a round trip); a timeout or other error ejects after
//!   [`FAILURES_TO_EJECT`] consecutive failures. Ejection lasts [`BASE_EJECTION`], doubling
//!   with every ejection that follows without a success in between, capped at
//!   [`MAX_EJECTION`]. Once an ejection has ended, the next failure ejects again at once. Any
//!   success clears everything.

use std::time::Duration;

use rand::{Rng, RngExt};
use tokio::time::Instant;

/// Consecutive timeouts/errors (not refusals) that eject a backend.
pub const FAILURES_TO_EJECT: u32 = 3;
/// First ejection period.
pub const BASE_EJECTION: Duration = Duration::from_secs(1);
/// Longest ejection period.
pub const MAX_EJECTION: Duration = Duration::from_secs(30);

/// How a connect attempt to a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The backend actively refused (RST / ICMP port unreachable).
    Refused,
    /// Timed out or failed in another way.
    Other,
}

/// Passive health of one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    consecutive_failures: u32,
    /// Number of ejections since the last success; sets the next back-off.
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Health {
    /// Whether the backend is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// Record a failed connect. Returns `true` when this failure ejected the backend.
    pub fn record_failure(&mut self, now: Instant, kind: Failure) -> bool {
        if self.is_ejected(now) {
            // Another in-flight attempt failing during an ejection changes nothing.
            return false;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let eject = kind == Failure::Refused
            || self.ejections > 0
            || self.consecutive_failures >= FAILURES_TO_EJECT;
        if eject {
            let backoff = BASE_EJECTION
                .saturating_mul(1u32 << self.ejections.min(16))
                .min(MAX_EJECTION);
            self.ejected_until = Some(now + backoff);
            self.ejections = self.ejections.saturating_add(1);
        }
        eject
    }

    /// Record a successful connect: the backend is healthy again.
    pub fn record_success(&mut self) {
        *self = Health::default();
    }
}

/// What [`pick`] needs to know about one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Draining backends never get new flows.
    pub draining: bool,
    /// Ejected by passive health at the time of the pick.
    pub ejected: bool,
    /// Already tried for this client connection (so a retry goes elsewhere).
    pub excluded: bool,
    /// Active flows (TCP connections or UDP sessions) to this backend.
    pub load: u64,
}

impl Candidate {
    pub fn active(load: u64) -> Self {
        Candidate {
            draining: false,
            ejected: false,
            excluded: false,
            load,
        }
    }
}

/// Choose a backend index among `cands`, or `None` if no backend may take a new flow.
pub fn pick<R: Rng + ?Sized>(cands: &[Candidate], rng: &mut R) -> Option<usize> {
    let eligible = |c: &Candidate| !c.draining && !c.excluded;
    let healthy = cands.iter().filter(|c| eligible(c) && !c.ejected).count();
    let (count, want_ejected) = if healthy > 0 {
        (healthy, false)
    } else {
        // Fail open: every eligible backend is ejected; try them anyway.
        (cands.iter().filter(|c| eligible(c)).count(), true)
    };
    let nth = |n: usize| {
        cands
            .iter()
            .enumerate()
            .filter(|(_, c)| eligible(c) && (want_ejected || !c.ejected))
            .nth(n)
            .map(|(i, _)| i)
    };
    match count {
        0 => None,
        1 => nth(0),
        _ => {
            let a = rng.random_range(0..count);
            let mut b = rng.random_range(0..count - 1);
            if b >= a {
                b += 1;
            }
            let (ia, ib) = (nth(a)?, nth(b)?);
            if cands[ib].load < cands[ia].load {
                Some(ib)
            } else {
                Some(ia)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    fn c(draining: bool, ejected: bool, excluded: bool, load: u64) -> Candidate {
        Candidate {
            draining,
            ejected,
            excluded,
            load,
        }
    }

    #[test]
    fn pick_cases() {
        struct Case {
            name: &'static str,
            cands: Vec<Candidate>,
            /// Indices the pick may return (empty: must be None).
            allowed: Vec<usize>,
        }
        let cases = vec![
            Case {
                name: "empty",
                cands: vec![],
                allowed: vec![],
            },
            Case {
                name: "single active",
                cands: vec![c(false, false, false, 0)],
                allowed: vec![0],
            },
            Case {
                name: "only draining",
                cands: vec![c(true, false, false, 0), c(true, false, false, 0)],
                allowed: vec![],
            },
            Case {
                name: "draining skipped",
                cands: vec![c(true, false, false, 0), c(false, false, false, 9)],
                allowed: vec![1],
            },
            Case {
                name: "ejected avoided",
                cands: vec![c(false, true, false, 0), c(false, false, false, 100)],
                allowed: vec![1],
            },
            Case {
                name: "fail open when all ejected",
                cands: vec![c(false, true, false, 0), c(true, true, false, 0)],
                allowed: vec![0],
            },
            Case {
                name: "excluded skipped",
                cands: vec![c(false, false, true, 0), c(false, true, false, 5)],
                allowed: vec![1],
            },
            Case {
                name: "all excluded",
                cands: vec![c(false, false, true, 0), c(false, true, true, 0)],
                allowed: vec![],
            },
            Case {
                name: "two: less loaded wins",
                cands: vec![c(false, false, false, 5), c(false, false, false, 1)],
                allowed: vec![1],
            },
        ];
        let mut r = rng();
        for case in cases {
            for _ in 0..50 {
                let got = pick(&case.cands, &mut r);
                match got {
                    None => assert!(case.allowed.is_empty(), "{}: got None", case.name),
                    Some(i) => assert!(case.allowed.contains(&i), "{}: got {i}", case.name),
                }
            }
        }
    }

    #[test]
    fn never_picks_the_most_loaded_of_many() {
        let mut cands: Vec<_> = (0..5).map(|_| Candidate::active(1)).collect();
        cands[3].load = 1000;
        let mut r = rng();
        for _ in 0..1000 {
            assert_ne!(pick(&cands, &mut r), Some(3));
        }
    }

    #[test]
    fn health_refused_ejects_at_once_with_backoff() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(h.record_failure(t0, Failure::Refused));
        assert!(h.is_ejected(t0));
        assert!(h.is_ejected(t0 + Duration::from_millis(999)));
        assert!(!h.is_ejected(t0 + BASE_EJECTION));
        // A failure during the ejection changes nothing.
        assert!(!h.record_failure(t0 + Duration::from_millis(10), Failure::Other));
        // After the ejection, one failure ejects again for twice as long.
        let t1 = t0 + BASE_EJECTION;
        assert!(h.record_failure(t1, Failure::Other));
        assert!(h.is_ejected(t1 + Duration::from_millis(1999)));
        assert!(!h.is_ejected(t1 + Duration::from_secs(2)));
        h.record_success();
        assert_eq!(h, Health::default());
    }

    #[test]
    fn health_timeouts_eject_after_threshold_and_cap() {
        let mut now = Instant::now();
        let mut h = Health::default();
        for i in 1..FAILURES_TO_EJECT {
            assert!(!h.record_failure(now, Failure::Other), "failure {i}");
            assert!(!h.is_ejected(now));
        }
        assert!(h.record_failure(now, Failure::Other));
        // Keep failing right after every ejection: back-off doubles up to the cap.
        let mut last = BASE_EJECTION;
        for _ in 0..10 {
            now += last;
            assert!(!h.is_ejected(now));
            assert!(h.record_failure(now, Failure::Other));
            let next = (last * 2).min(MAX_EJECTION);
            assert!(h.is_ejected(now + next - Duration::from_millis(1)));
            assert!(!h.is_ejected(now + next));
            last = next;
        }
        assert_eq!(last, MAX_EJECTION);
    }

    #[test]
    fn success_resets_failure_count() {
        let now = Instant::now();
        let mut h = Health::default();
        for _ in 0..FAILURES_TO_EJECT - 1 {
            h.record_failure(now, Failure::Other);
        }
        h.record_success();
        assert!(!h.record_failure(now, Failure::Other));
    }

    fn arb_cand() -> impl Strategy<Value = Candidate> {
        (any::<bool>(), any::<bool>(), any::<bool>(), 0u64..10)
            .prop_map(|(d, e, x, l)| c(d, e, x, l))
    }

    proptest! {
        /// Never a draining or excluded backend; never an ejected one while a healthy one
        /// exists; `None` only when nothing is eligible.
        #[test]
        fn pick_respects_states(cands in prop::collection::vec(arb_cand(), 0..8), seed: u64) {
            let mut r = SmallRng::seed_from_u64(seed);
            let any_eligible = cands.iter().any(|c| !c.draining && !c.excluded);
            let any_healthy = cands.iter().any(|c| !c.draining && !c.excluded && !c.ejected);
            match pick(&cands, &mut r) {
                None => prop_assert!(!any_eligible),
                Some(i) => {
                    prop_assert!(!cands[i].draining && !cands[i].excluded);
                    if any_healthy { prop_assert!(!cands[i].ejected); }
                }
            }
        }

        /// Equal backends with equal load are picked about equally often.
        #[test]
        fn pick_spreads_evenly(n in 2usize..8, seed: u64) {
            let mut r = SmallRng::seed_from_u64(seed);
            let cands = vec![Candidate::active(0); n];
            let mut hits = vec![0u32; n];
            let rounds = 2000 * n as u32;
            for _ in 0..rounds {
                if let Some(i) = pick(&cands, &mut r) { hits[i] += 1; }
            }
            for h in hits {
                prop_assert!(h > 1500 && h < 2500, "{h}");
            }
        }

        /// With load tracked as picks accumulate, loads stay close: after 500 picks the gap
        /// between the most and least loaded is at most 12 (a simulation of 1.2M runs of this
        /// picker saw at most 10; gaps above 6 come about 1 run in 3,000, which made a bound
        /// of 6 flaky). Picking one backend at random would leave gaps of about 20.
        #[test]
        fn pick_balances_load(n in 2usize..8, seed: u64) {
            let mut r = SmallRng::seed_from_u64(seed);
            let mut cands = vec![Candidate::active(0); n];
            for _ in 0..500 {
                if let Some(i) = pick(&cands, &mut r) { cands[i].load += 1; }
            }
            let max = cands.iter().map(|c| c.load).max().unwrap_or(0);
            let min = cands.iter().map(|c| c.load).min().unwrap_or(0);
            prop_assert!(max - min <= 12, "{max} {min}");
        }
    }
}
