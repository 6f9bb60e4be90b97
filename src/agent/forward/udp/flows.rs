//! The UDP session table: client address → (backend, last seen, I/O payload). Pure: time is
//! passed in and the payload `T` (the shell's upstream socket and reply task) is handed back
//! on removal so the caller decides when to drop it.
//!
//! At the cap, a new client is refused (its datagram is dropped) rather than evicting an
//! existing session: evicting would break a live flow to admit a new one, and idle sessions
//! leave on their own at the next [`FlowTable::expire`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// One client's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session<T> {
    pub backend: SocketAddr,
    pub last_seen: Instant,
    pub data: T,
}

/// The table is full: the new client is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("UDP session table full")]
pub struct Full;

/// Sessions of one UDP VIP.
#[derive(Debug)]
pub struct FlowTable<T> {
    sessions: HashMap<SocketAddr, Session<T>>,
    idle: Duration,
    cap: usize,
}

impl<T> FlowTable<T> {
    pub fn new(idle: Duration, cap: usize) -> Self {
        FlowTable {
            sessions: HashMap::new(),
            idle,
            cap,
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn live(&self, s: &Session<T>, now: Instant) -> bool {
        now.saturating_duration_since(s.last_seen) < self.idle
    }

    /// The live session of `client`, without touching it.
    pub fn get(&self, client: SocketAddr, now: Instant) -> Option<&Session<T>> {
        self.sessions.get(&client).filter(|s| self.live(s, now))
    }

    /// The live session of `client`, marked as seen at `now`. An expired session is not
    /// returned (and is replaced by the next [`FlowTable::insert`] or removed by
    /// [`FlowTable::expire`]).
    pub fn touch(&mut self, client: SocketAddr, now: Instant) -> Option<&Session<T>> {
        let idle = self.idle;
        let s = self.sessions.get_mut(&client)?;
        if now.saturating_duration_since(s.last_seen) >= idle {
            return None;
        }
        s.last_seen = s.last_seen.max(now);
        Some(s)
    }

    /// Start a session for `client`, replacing any previous one (returned). Refused when the
    /// table is at its cap and `client` has no session.
    pub fn insert(
        &mut self,
        client: SocketAddr,
        backend: SocketAddr,
        data: T,
        now: Instant,
    ) -> Result<Option<Session<T>>, (Full, T)> {
        if self.sessions.len() >= self.cap && !self.sessions.contains_key(&client) {
            return Err((Full, data));
        }
        let s = Session {
            backend,
            last_seen: now,
            data,
        };
        Ok(self.sessions.insert(client, s))
    }

    pub fn remove(&mut self, client: SocketAddr) -> Option<Session<T>> {
        self.sessions.remove(&client)
    }

    /// Remove and return every session idle for the idle timeout at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(SocketAddr, Session<T>)> {
        let idle = self.idle;
        self.sessions
            .extract_if(|_, s| now.saturating_duration_since(s.last_seen) >= idle)
            .collect()
    }

    /// Remove and return every session to `backend` (it left the table).
    pub fn remove_backend(&mut self, backend: SocketAddr) -> Vec<(SocketAddr, Session<T>)> {
        self.sessions
            .extract_if(|_, s| s.backend == backend)
            .collect()
    }

    /// Remove and return every session.
    pub fn drain_all(&mut self) -> Vec<(SocketAddr, Session<T>)> {
        self.sessions.drain().collect()
    }

    /// Live sessions per backend at `now`.
    pub fn count_for(&self, backend: SocketAddr, now: Instant) -> usize {
        self.sessions
            .values()
            .filter(|s| s.backend == backend && self.live(s, now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const IDLE: Duration = Duration::from_secs(30);

    #[test]
    fn touch_keeps_alive_and_expiry_removes() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(IDLE, 10);
        assert!(
            t.insert(a("1.1.1.1:1"), a("9.9.9.9:9"), "s1", t0)
                .unwrap()
                .is_none()
        );
        assert!(
            t.insert(a("1.1.1.2:1"), a("9.9.9.9:9"), "s2", t0)
                .unwrap()
                .is_none()
        );
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(t.touch(a("1.1.1.1:1"), t1).map(|s| s.data), Some("s1"));
        let t2 = t0 + IDLE;
        // s2 is idle for exactly IDLE: gone. s1 was seen 10 s ago: stays.
        assert!(t.touch(a("1.1.1.2:1"), t2).is_none());
        let gone = t.expire(t2);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, a("1.1.1.2:1"));
        assert_eq!(t.len(), 1);
        assert!(t.expire(t1 + IDLE - Duration::from_millis(1)).is_empty());
        assert_eq!(t.expire(t1 + IDLE).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn cap_refuses_new_clients_but_not_existing() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(IDLE, 2);
        t.insert(a("1.1.1.1:1"), a("9.9.9.9:9"), 1, t0).unwrap();
        t.insert(a("1.1.1.2:1"), a("9.9.9.9:9"), 2, t0).unwrap();
        assert_eq!(
            t.insert(a("1.1.1.3:1"), a("9.9.9.9:9"), 3, t0),
            Err((Full, 3))
        );
        // Replacing an existing client's session is allowed and hands back the old one.
        let old = t.insert(a("1.1.1.1:1"), a("8.8.8.8:8"), 4, t0).unwrap();
        assert_eq!(old.map(|s| s.data), Some(1));
        // Once idle sessions expire there is room again.
        t.expire(t0 + IDLE);
        assert!(
            t.insert(a("1.1.1.3:1"), a("9.9.9.9:9"), 5, t0 + IDLE)
                .is_ok()
        );
    }

    #[test]
    fn remove_backend_returns_its_sessions_only() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(IDLE, 10);
        for i in 0..6u16 {
            let b = if i % 2 == 0 { "9.9.9.9:9" } else { "8.8.8.8:8" };
            t.insert(SocketAddr::new([1, 1, 1, 1].into(), i), a(b), i, t0)
                .unwrap();
        }
        assert_eq!(t.count_for(a("9.9.9.9:9"), t0), 3);
        let mut gone: Vec<u16> = t
            .remove_backend(a("9.9.9.9:9"))
            .into_iter()
            .map(|(_, s)| s.data)
            .collect();
        gone.sort();
        assert_eq!(gone, vec![0, 2, 4]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.count_for(a("9.9.9.9:9"), t0), 0);
        assert!(t.get(SocketAddr::new([1, 1, 1, 1].into(), 1), t0).is_some());
        assert!(t.remove(SocketAddr::new([1, 1, 1, 1].into(), 1)).is_some());
        assert_eq!(t.drain_all().len(), 2);
    }
}
