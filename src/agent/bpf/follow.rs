//! When the sockets connected through a VIP must let go of a backend: the proxy's drain
//! semantics for the kernel path, as a pure core (time passed in; the socket iterators are
//! the I/O shell, run by [`super::run`]).
//!
//! A UDP socket has no end a backend could signal, so one connected to a backend the kernel
//! no longer translates to (removed, draining, ejected, or its VIP gone to the proxy) is
//! closed at once. A TCP connection to a backend that left the table (removed or draining, not
//! merely ejected) is closed when `drain` expires, as the proxy closes it; with no drain
//! timeout it is never closed. A backend that comes back before then keeps its connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::plan::Moves;
use crate::model::{Protocol, VipKey};

/// Pending TCP closes, by (VIP, backend).
#[derive(Debug, Default)]
pub(crate) struct Follow {
    drain: Option<Duration>,
    pending: BTreeMap<(VipKey, SocketAddr), Instant>,
}

impl Follow {
    pub(crate) fn new(drain: Option<Duration>) -> Follow {
        Follow {
            drain,
            pending: BTreeMap::new(),
        }
    }

    /// Fold in what a plan moved at `now`; returns the pairs whose sockets close now.
    pub(crate) fn moved(&mut self, m: Moves, now: Instant) -> Vec<(VipKey, SocketAddr)> {
        for p in &m.back {
            self.pending.remove(p);
        }
        if let Some(d) = self.drain {
            for p in m.left_table {
                if p.0.protocol == Protocol::Tcp {
                    self.pending.entry(p).or_insert(now + d);
                }
            }
        }
        let mut now_due: Vec<_> = m
            .left_kernel
            .into_iter()
            .filter(|(k, _)| k.protocol == Protocol::Udp)
            .collect();
        now_due.extend(self.due(now));
        now_due.sort();
        now_due.dedup();
        now_due
    }

    /// The TCP pairs whose drain has expired at `now` (forgotten once returned).
    pub(crate) fn due(&mut self, now: Instant) -> Vec<(VipKey, SocketAddr)> {
        let due: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &due {
            self.pending.remove(p);
        }
        due
    }

    /// When the next drain expires.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.pending.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(vip: &str, proto: Protocol, backend: &str) -> (VipKey, SocketAddr) {
        let v: SocketAddr = vip.parse().unwrap();
        let key = VipKey {
            ip: v.ip(),
            port: v.port(),
            protocol: proto,
        };
        (key, backend.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn udp_at_once_tcp_after_the_drain_and_not_if_it_came_back() {
        let u = pair("198.18.0.1:53", Protocol::Udp, "198.18.1.1:5353");
        let t = pair("198.18.0.1:80", Protocol::Tcp, "198.18.1.1:8080");
        let t2 = pair("198.18.0.1:80", Protocol::Tcp, "198.18.1.2:8080");
        let mut f = Follow::new(Some(Duration::from_secs(10)));
        let start = Instant::now();
        let m = Moves {
            left_kernel: vec![u, t, t2],
            left_table: vec![u, t, t2],
            back: vec![],
        };
        assert_eq!(f.moved(m, start), vec![u], "UDP at once; TCP waits");
        assert_eq!(f.next(), Some(start + Duration::from_secs(10)));
        // t2 comes back within the drain: its connections stay.
        let back = Moves {
            back: vec![t2],
            ..Moves::default()
        };
        assert!(f.moved(back, start + Duration::from_secs(3)).is_empty());
        assert!(f.due(start + Duration::from_secs(9)).is_empty());
        assert_eq!(f.due(start + Duration::from_secs(10)), vec![t]);
        assert_eq!(f.next(), None);
        // An ejected TCP backend (left the kernel, not the table) keeps its connections.
        let ejected = Moves {
            left_kernel: vec![t],
            ..Moves::default()
        };
        assert!(f.moved(ejected, start).is_empty());
        assert_eq!(f.next(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn no_drain_timeout_never_closes_tcp() {
        let t = pair("198.18.0.1:80", Protocol::Tcp, "198.18.1.1:8080");
        let mut f = Follow::new(None);
        let m = Moves {
            left_kernel: vec![t],
            left_table: vec![t],
            back: vec![],
        };
        assert!(f.moved(m, Instant::now()).is_empty());
        assert_eq!(f.next(), None);
    }
}
