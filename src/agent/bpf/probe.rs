//! Health without seeing connections: in the kernel path the agent never sees a connect fail,
//! so it probes instead. Every `interval`, one TCP connect (handshake, then close) to each
//! distinct backend address of a TCP VIP, with the proxy's own passive-health policy
//! ([`Health`]): a refusal ejects at once, timeouts after a few in a row, back-off doubling.
//! An ejection leaves the backend out of TCP VIPs only: a UDP backend is never judged by a
//! TCP probe (the planner ignores the ejected set for UDP VIPs; the source's health rules).
//! The probes are the cost: per agent, one handshake per backend per `interval` (2/s at the
//! default 500 ms), which the backend sees as an accepted-then-closed connection.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::forward::balancer::{Failure, Health};

/// Probes in flight at once. It bounds the descriptors a round holds (shared with the proxy
/// under one limit) and its memory, whatever the number of backends: 100,000 backends are
/// probed in rounds of this many, not with 100,000 sockets at once.
pub(crate) const IN_FLIGHT: usize = 256;

/// How often a round publishes the ejected set while ejections change: soon after a change,
/// but not once per backend (each publication is a set of every ejected backend, and a plan).
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Probe results folded into ejection state, per backend address.
#[derive(Debug, Default)]
pub(crate) struct Prober {
    /// Backends whose last probes failed; a healthy backend has no entry (nothing kept for
    /// the many that answer).
    health: HashMap<SocketAddr, Health>,
}

/// The outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Up,
    Down(Failure),
    /// This host could not try (out of descriptors, memory or ports): says nothing of the
    /// backend.
    Local,
}

impl Prober {
    /// Fold one probe of `addr` in: `Some(ejected)` when it changed whether `addr` is
    /// ejected at `now`.
    pub(crate) fn record_one(
        &mut self,
        addr: SocketAddr,
        outcome: Outcome,
        now: Instant,
    ) -> Option<bool> {
        let (was, is) = match outcome {
            Outcome::Up => {
                let was = self.health.remove(&addr).is_some_and(|h| h.is_ejected(now));
                (was, false)
            }
            Outcome::Down(kind) => {
                let h = self.health.entry(addr).or_default();
                let was = h.is_ejected(now);
                h.record_failure(now, kind);
                (was, h.is_ejected(now))
            }
            Outcome::Local => return None,
        };
        (was != is).then_some(is)
    }

    /// Forget the backends not in `targets` (sorted).
    pub(crate) fn retain(&mut self, targets: &[SocketAddr]) {
        self.health.retain(|a, _| targets.binary_search(a).is_ok());
    }

    /// The backends ejected at `now`.
    pub(crate) fn ejected(&self, now: Instant) -> BTreeSet<SocketAddr> {
        self.health
            .iter()
            .filter(|(_, h)| h.is_ejected(now))
            .map(|(a, _)| *a)
            .collect()
    }

    /// Fold one whole round in (backends not in `results` are forgotten) and return the
    /// backends ejected at `now`.
    #[cfg(test)]
    pub(crate) fn record(
        &mut self,
        results: &[(SocketAddr, Outcome)],
        now: Instant,
    ) -> BTreeSet<SocketAddr> {
        let mut seen: Vec<SocketAddr> = results.iter().map(|(a, _)| *a).collect();
        seen.sort_unstable();
        self.retain(&seen);
        for (a, o) in results {
            self.record_one(*a, *o, now);
        }
        self.ejected(now)
    }
}

/// Connect to `addr` once.
pub(crate) async fn probe(addr: SocketAddr, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::Up,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Outcome::Down(Failure::Refused)
        }
        Ok(Err(e)) if crate::agent::forward::local_kind(&e).is_some() => Outcome::Local,
        Ok(Err(_)) | Err(_) => Outcome::Down(Failure::Other),
    }
}

/// Probe the addresses `targets` names (sorted, distinct) every `interval`, [`IN_FLIGHT`] at
/// a time, and publish the ejected set whenever it changes (within [`PUBLISH_EVERY`] of a
/// probe that changed it, not at the end of a round), until `shutdown`.
pub(crate) async fn run(
    mut targets: watch::Receiver<Arc<Vec<SocketAddr>>>,
    ejected: watch::Sender<super::plan::Ejected>,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut prober = Prober::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let publish = |prober: &Prober| {
        let now_ejected = prober.ejected(Instant::now());
        ejected.send_if_modified(|e| {
            let changed = **e != now_ejected;
            if changed {
                *e = Arc::new(now_ejected);
            }
            changed
        });
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let round = Arc::clone(&targets.borrow_and_update());
        prober.retain(&round);
        let mut results = futures::stream::iter(round.iter().copied())
            .map(|a| async move { (a, probe(a, timeout).await) })
            .buffer_unordered(IN_FLIGHT);
        // One line a round, not one per backend: a partition that takes 100,000 backends
        // away must not write 100,000 lines at every ejection.
        let (mut out, mut first) = (0usize, None);
        let (mut dirty, mut published) = (false, Instant::now());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = results.next() => match r {
                    Some((a, o)) => {
                        if let Some(ejected) = prober.record_one(a, o, Instant::now()) {
                            if ejected {
                                out += 1;
                                first.get_or_insert(a);
                            }
                            dirty = true;
                        }
                        if dirty && published.elapsed() >= PUBLISH_EVERY {
                            publish(&prober);
                            (dirty, published) = (false, Instant::now());
                        }
                    }
                    None => break,
                },
            }
        }
        if let Some(first) = first {
            tracing::warn!(backends = out, first = %first, "backends ejected: probe failed");
        }
        // Ejections that ended during the round.
        publish(&prober);
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
        assert!(p.health.is_empty(), "a healthy backend keeps no entry");
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

    /// A round over more targets than [`IN_FLIGHT`]: every refusing backend is ejected, the
    /// one that answers is not, and a target that leaves is forgotten.
    #[tokio::test]
    async fn run_ejects_the_refusing_of_many_and_forgets_the_gone() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        let closed: Vec<SocketAddr> = (0..IN_FLIGHT * 2 + 10)
            .map(|_| {
                let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                s.local_addr().unwrap()
            })
            .collect();
        let mut all: Vec<SocketAddr> = closed.iter().copied().chain([up]).collect();
        all.sort_unstable();
        let (targets_tx, targets_rx) = watch::channel(Arc::new(all));
        let (ejected_tx, mut ejected_rx) = watch::channel(super::super::plan::Ejected::default());
        let stop = CancellationToken::new();
        let t = Duration::from_secs(1);
        let task = tokio::spawn(run(
            targets_rx,
            ejected_tx,
            Duration::from_millis(50),
            t,
            stop.clone(),
        ));
        let want: BTreeSet<SocketAddr> = closed.iter().copied().collect();
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            ejected_rx.wait_for(|e| **e == want),
        )
        .await
        .map(|r| r.is_ok());
        assert_eq!(got, Ok(true), "ejected: {}", ejected_rx.borrow().len());
        // Only `up` is probed now: the others leave the ejected set.
        targets_tx.send_replace(Arc::new(vec![up]));
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            ejected_rx.wait_for(|e| e.is_empty()),
        )
        .await
        .map(|r| r.is_ok());
        assert_eq!(
            got,
            Ok(true),
            "still ejected: {}",
            ejected_rx.borrow().len()
        );
        stop.cancel();
        task.await.unwrap();
    }
}
