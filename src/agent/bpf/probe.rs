//! Health without seeing connections: in the kernel path the agent never sees a connect fail,
//! so it probes instead. Every `interval`, one TCP connect (handshake, then close) to each
//! distinct backend address of a TCP VIP, with the proxy's own passive-health policy
//! ([`Health`]): a refusal ejects at once, timeouts after a few in a row, back-off doubling.
//! An ejection leaves the backend out of TCP VIPs only: a UDP backend is never judged by a
//! TCP probe (the planner ignores the ejected set for UDP VIPs; the source's health rules).
//! The probes are the cost: per agent, one handshake per backend per `interval` (2/s at the
//! default 500 ms), which the backend sees as an accepted-then-closed connection.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::forward::balancer::{Failure, Health};

/// Probe results folded into ejection state, per backend address.
#[derive(Debug, Default)]
pub(crate) struct Prober {
    health: HashMap<SocketAddr, Health>,
}

/// The outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Up,
    Down(Failure),
}

impl Prober {
    /// Fold one round of results in (backends not in `results` are forgotten) and return the
    /// backends ejected at `now`.
    pub(crate) fn record(
        &mut self,
        results: &[(SocketAddr, Outcome)],
        now: Instant,
    ) -> BTreeSet<SocketAddr> {
        let seen: HashSet<SocketAddr> = results.iter().map(|(a, _)| *a).collect();
        self.health.retain(|a, _| seen.contains(a));
        for (a, o) in results {
            let h = self.health.entry(*a).or_default();
            match o {
                Outcome::Up => h.record_success(),
                Outcome::Down(kind) => {
                    if h.record_failure(now, *kind) {
                        tracing::warn!(backend = %a, "backend ejected: probe failed");
                    }
                }
            }
        }
        self.health
            .iter()
            .filter(|(_, h)| h.is_ejected(now))
            .map(|(a, _)| *a)
            .collect()
    }
}

/// Connect to `addr` once.
pub(crate) async fn probe(addr: SocketAddr, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::Up,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Outcome::Down(Failure::Refused)
        }
        Ok(Err(_)) | Err(_) => Outcome::Down(Failure::Other),
    }
}

/// Probe the addresses `targets` names every `interval` and publish the ejected set whenever
/// it changes, until `shutdown`.
pub(crate) async fn run(
    mut targets: watch::Receiver<HashSet<SocketAddr>>,
    ejected: watch::Sender<BTreeSet<SocketAddr>>,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut prober = Prober::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let addrs: Vec<SocketAddr> = targets.borrow_and_update().iter().copied().collect();
        let outcomes = futures::future::join_all(addrs.iter().map(|a| probe(*a, timeout))).await;
        let results: Vec<_> = addrs.into_iter().zip(outcomes).collect();
        let now_ejected = prober.record(&results, Instant::now());
        ejected.send_if_modified(|e| {
            let changed = *e != now_ejected;
            if changed {
                *e = now_ejected;
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refused_ejects_at_once_and_success_restores() {
        let a: SocketAddr = "198.18.1.1:80".parse().unwrap();
        let b: SocketAddr = "198.18.1.2:80".parse().unwrap();
        let mut p = Prober::default();
        let up = [(a, Outcome::Up), (b, Outcome::Up)];
        assert!(p.record(&up, Instant::now()).is_empty());
        let a_refused = [(a, Outcome::Down(Failure::Refused)), (b, Outcome::Up)];
        assert_eq!(p.record(&a_refused, Instant::now()), BTreeSet::from([a]));
        // Still refusing after the first ejection ends: ejected again, never let back between.
        for _ in 0..6 {
            tokio::time::advance(Duration::from_millis(500)).await;
            assert_eq!(p.record(&a_refused, Instant::now()), BTreeSet::from([a]));
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(
            p.record(&up, Instant::now()).is_empty(),
            "a success clears the ejection"
        );
        // Timeouts eject only after several in a row.
        let a_slow = [(a, Outcome::Down(Failure::Other)), (b, Outcome::Up)];
        assert!(p.record(&a_slow, Instant::now()).is_empty());
        assert!(p.record(&a_slow, Instant::now()).is_empty());
        assert_eq!(p.record(&a_slow, Instant::now()), BTreeSet::from([a]));
        // A backend that leaves is forgotten.
        assert!(p.record(&[(b, Outcome::Up)], Instant::now()).is_empty());
        assert_eq!(p.health.len(), 1);
    }

    #[tokio::test]
    async fn probes_real_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        let closed = {
            let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let t = Duration::from_secs(1);
        assert_eq!(probe(up, t).await, Outcome::Up);
        assert_eq!(probe(closed, t).await, Outcome::Down(Failure::Refused));
    }
}
