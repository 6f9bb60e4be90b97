//! Long-lived UDP sockets to one upstream, shared by the forwarded queries in flight, as
//! dnsmasq keeps a set of random-port sockets: a query takes a random socket of the pool, and
//! that socket's reader task hands it the answer with its id and question. A socket is retired
//! after `rotate` queries and replaced by one on a fresh ephemeral port, so source ports keep
//! changing (with random ids, a forger off the path must guess both). A socket per query cost
//! 31% of the core in `BENCH_ONLY=dnsfwd scripts/bench.sh` (socket, bind, connect, epoll
//! registration, close).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Sockets per upstream.
pub(crate) const SOCKETS: usize = 16;
/// Queries a socket carries before it is replaced.
pub(crate) const ROTATE: u32 = 1024;

/// A query waiting for its answer.
struct Waiter {
    question: Box<[u8]>,
    tx: oneshot::Sender<io::Result<Vec<u8>>>,
}

struct PoolSocket {
    sock: UdpSocket,
    pending: Mutex<HashMap<u16, Waiter>>,
    uses: AtomicU32,
    /// Replaced in the pool: its reader stops once nothing is pending.
    retired: AtomicBool,
    done: CancellationToken,
}

impl PoolSocket {
    fn pending(&self) -> MutexGuard<'_, HashMap<u16, Waiter>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop the reader if the socket is retired and nothing waits on it.
    fn maybe_done(&self, pending: &HashMap<u16, Waiter>) {
        if pending.is_empty() && self.retired.load(Ordering::Acquire) {
            self.done.cancel();
        }
    }
}

/// Removes a query's entry when its exchange ends, answered or not (a timeout drops it).
struct Entry<'a> {
    socket: &'a PoolSocket,
    id: u16,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut pending = self.socket.pending();
        pending.remove(&self.id);
        self.socket.maybe_done(&pending);
    }
}

/// The sockets to one upstream.
pub(crate) struct Pool {
    addr: SocketAddr,
    slots: Mutex<Vec<Option<Arc<PoolSocket>>>>,
    rotate: u32,
    stop: CancellationToken,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

impl Pool {
    /// `sockets` sockets to `addr`, each replaced after `rotate` queries; every reader stops
    /// when `stop` is cancelled.
    pub(crate) fn new(
        addr: SocketAddr,
        sockets: usize,
        rotate: u32,
        stop: CancellationToken,
    ) -> Self {
        Pool {
            addr,
            slots: Mutex::new(vec![None; sockets.max(1)]),
            rotate: rotate.max(1),
            stop,
        }
    }

    /// Send `query` (its id in the first two bytes, `question` its question section) and wait
    /// for the matching answer. The caller bounds the wait.
    pub(crate) async fn exchange(&self, query: &[u8], question: &[u8]) -> io::Result<Vec<u8>> {
        let Some(id) = query.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        // The same id in flight on the socket picked (1 in 65,536 a query) would take the
        // other's answer: pick again, a few times.
        let mut attempt = 0;
        let (socket, rx) = loop {
            let socket = self.socket().await?;
            let (tx, rx) = oneshot::channel();
            let taken = {
                let mut pending = socket.pending();
                let taken = pending.contains_key(&id);
                if !taken {
                    let question = question.into();
                    pending.insert(id, Waiter { question, tx });
                }
                taken
            };
            if !taken {
                break (socket, rx);
            }
            attempt += 1;
            if attempt == 4 {
                return Err(io::ErrorKind::AddrInUse.into());
            }
        };
        let _entry = Entry {
            socket: &socket,
            id,
        };
        socket.sock.send(query).await?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("upstream socket closed")))
    }

    /// A random slot's socket, or a new one there if the slot is empty or its socket has done
    /// its share.
    async fn socket(&self) -> io::Result<Arc<PoolSocket>> {
        let idx = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            rand::random_range(0..slots.len())
        };
        let current = self.slots.lock().unwrap_or_else(|p| p.into_inner())[idx].clone();
        if let Some(s) = current
            && s.uses.fetch_add(1, Ordering::Relaxed) < self.rotate
        {
            return Ok(s);
        }
        let sock = UdpSocket::bind(unspecified_for(self.addr)).await?;
        sock.connect(self.addr).await?;
        let fresh = Arc::new(PoolSocket {
            sock,
            pending: Mutex::new(HashMap::new()),
            uses: AtomicU32::new(1),
            retired: AtomicBool::new(false),
            done: CancellationToken::new(),
        });
        tokio::spawn(read(fresh.clone(), self.stop.clone()));
        let old = self.slots.lock().unwrap_or_else(|p| p.into_inner())[idx].replace(fresh.clone());
        if let Some(old) = old {
            old.retired.store(true, Ordering::Release);
            old.maybe_done(&old.pending());
        }
        Ok(fresh)
    }

    /// Sockets open now (for tests).
    #[cfg(test)]
    fn open(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.iter().flatten().count()
    }
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Hand each answer to the query it matches; datagrams that match nothing are dropped. A
/// receive error (an ICMP port unreachable from the upstream, say) fails every query waiting
/// on this socket: they all went to that upstream.
async fn read(socket: Arc<PoolSocket>, stop: CancellationToken) {
    let mut buf = Vec::with_capacity(65_535);
    loop {
        buf.clear();
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            _ = socket.done.cancelled() => return,
            r = socket.sock.recv_buf(&mut buf) => r,
        };
        let mut pending = socket.pending();
        match received {
            Ok(_) => {
                let Some(id) = buf.get(..2).map(|b| [b[0], b[1]]) else {
                    continue;
                };
                let key = u16::from_be_bytes(id);
                if let Some(w) = pending.get(&key)
                    && matches(&buf, &id, &w.question)
                    && let Some(w) = pending.remove(&key)
                {
                    let _ = w.tx.send(Ok(buf.to_vec()));
                } else {
                    tracing::debug!("ignoring unmatched upstream datagram");
                }
            }
            Err(e) => {
                for (_, w) in pending.drain() {
                    let _ = w.tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
        socket.maybe_done(&pending);
    }
}

/// Whether `answer` is a response to the query with `id` (its first two bytes) and
/// `question` (see [`question`]): same id, QR set, the same question (names compared
/// case-insensitively). Read from the bytes, without decoding the message: this runs for
/// every forwarded answer.
pub(crate) fn matches(answer: &[u8], id: &[u8], question: &[u8]) -> bool {
    let Some(head) = answer.get(..12) else {
        return false;
    };
    if head[..2] != *id || head[2] & 0x80 == 0 {
        return false;
    }
    let same_question = head[4..6] == [0, 1]
        && answer
            .get(12..12 + question.len())
            .is_some_and(|q| q.eq_ignore_ascii_case(question));
    // A truncated answer may come without its question; TC makes the client retry over TCP.
    same_question || (head[2] & 0x02 != 0 && answer.len() < 12 + question.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::dns::upstream::question;
    use hickory_proto::op::{Message, MessageType, Query};
    use hickory_proto::rr::{Name, RecordType};
    use std::time::Duration;

    fn query(name: &str, id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encodes")
    }

    /// An upstream that answers every query after collecting `batch` of them, in reverse
    /// order, with a bogus datagram first; returns the source ports it saw.
    async fn upstream(sock: UdpSocket, batch: usize, rounds: usize) -> Vec<u16> {
        let mut ports = Vec::new();
        let mut buf = vec![0u8; 2048];
        for _ in 0..rounds {
            let mut got = Vec::new();
            while got.len() < batch {
                let (n, peer) = sock.recv_from(&mut buf).await.expect("recv");
                ports.push(peer.port());
                got.push((buf[..n].to_vec(), peer));
            }
            for (q, peer) in got.into_iter().rev() {
                let mut bogus = q.clone();
                bogus[2] |= 0x80;
                bogus[0] ^= 0xff; // another id
                sock.send_to(&bogus, peer).await.expect("send");
                let mut m = Message::from_vec(&q).expect("query");
                m.metadata.message_type = MessageType::Response;
                sock.send_to(&m.to_vec().expect("encodes"), peer)
                    .await
                    .expect("send");
            }
        }
        ports
    }

    #[tokio::test]
    async fn answers_reach_their_queries_and_sockets_rotate() {
        let up = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = up.local_addr().expect("addr");
        let (batch, rounds) = (8, 4);
        let server = tokio::spawn(upstream(up, batch, rounds));
        let stop = CancellationToken::new();
        let pool = Arc::new(Pool::new(addr, 2, 3, stop.clone()));
        for round in 0..rounds {
            let mut tasks = Vec::new();
            for i in 0..batch {
                let pool = pool.clone();
                let id = (round * batch + i) as u16;
                tasks.push(tokio::spawn(async move {
                    let q = query(&format!("n{id}.example."), id);
                    let qs = question(&q).expect("question").to_vec();
                    let a = tokio::time::timeout(Duration::from_secs(5), pool.exchange(&q, &qs))
                        .await
                        .expect("answered in time")
                        .expect("answered");
                    let m = Message::from_vec(&a).expect("answer");
                    assert_eq!(m.metadata.id, id);
                    assert_eq!(m.queries[0].name().to_string(), format!("n{id}.example."));
                }));
            }
            for t in tasks {
                t.await.expect("exchange");
            }
        }
        let ports = server.await.expect("upstream");
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        // 32 queries, at most 3 a socket: many ports, but never one per query... or more.
        assert!(distinct.len() >= 32 / 3, "{distinct:?}");
        assert!(pool.open() <= 2);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_closed_upstream_fails_fast_and_a_timeout_leaves_nothing_pending() {
        let up = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = up.local_addr().expect("addr");
        drop(up);
        let stop = CancellationToken::new();
        let pool = Pool::new(addr, 1, 100, stop.clone());
        let q = query("x.example.", 1);
        let qs = question(&q).expect("question").to_vec();
        let r = tokio::time::timeout(Duration::from_secs(5), pool.exchange(&q, &qs)).await;
        assert!(matches!(r, Ok(Err(_))), "{r:?}");

        // A silent upstream: the caller's timeout drops the exchange, and its entry goes.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let pool = Pool::new(silent.local_addr().expect("addr"), 1, 100, stop.clone());
        let r = tokio::time::timeout(Duration::from_millis(100), pool.exchange(&q, &qs)).await;
        assert!(r.is_err());
        let slots = pool.slots.lock().expect("lock");
        let s = slots[0].as_ref().expect("a socket");
        assert!(s.pending().is_empty());
        stop.cancel();
    }
}
