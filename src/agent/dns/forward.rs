//! Forwarding of queries outside our zones to upstream resolvers: the query goes to two
//! upstreams at once over UDP (one if only one is configured) under a fresh random id from a
//! fresh ephemeral port; the first matching answer that resolves the question (NOERROR or
//! NXDOMAIN) wins. A SERVFAIL or REFUSED from one upstream waits for the other, so one broken
//! resolver cannot fail names the other can answer; it is passed on only if nothing better
//! comes before the deadline. A truncated UDP answer is retried over TCP to the upstream that
//! sent it when the client itself came over TCP (a UDP client gets the TC answer and retries
//! over TCP itself). Everything runs under one deadline; the caller answers SERVFAIL on error.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::FuturesUnordered;
use hickory_proto::op::{Header, Message, MessageType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::answer::Transport;

/// Why forwarding produced no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("could not encode the forwarded query")]
    Encode,
}

/// The upstream set and the deadline, shared by every forwarded query.
#[derive(Debug)]
pub(crate) struct Forwarder {
    upstreams: Arc<[SocketAddr]>,
    timeout: Duration,
    next: AtomicUsize,
}

impl Forwarder {
    /// `None` when there are no upstreams.
    pub(crate) fn new(upstreams: &[SocketAddr], timeout: Duration) -> Option<Forwarder> {
        if upstreams.is_empty() {
            return None;
        }
        Some(Forwarder {
            upstreams: upstreams.into(),
            timeout,
            next: AtomicUsize::new(rand::random::<u32>() as usize),
        })
    }

    /// Forward `req` and return the upstream's answer bytes with the client's id restored.
    pub(crate) async fn forward(
        &self,
        req: &Message,
        client: Transport,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut upstream_req = req.clone();
        let id: u16 = rand::random();
        upstream_req.metadata.id = id;
        let bytes = upstream_req.to_vec().map_err(|_| ForwardError::Encode)?;
        let n = self.upstreams.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let picks: Vec<SocketAddr> = (0..n.min(2))
            .map(|i| self.upstreams[(first + i) % n])
            .collect();
        let bytes = &bytes;
        let upstream_req = &upstream_req;
        let mut racers: FuturesUnordered<BoxFuture<'_, Result<Vec<u8>, ForwardError>>> = picks
            .into_iter()
            .map(|addr| {
                async move {
                    let answer = udp_exchange(addr, bytes, upstream_req)
                        .await
                        .map_err(|e| ForwardError::Io(addr, e))?;
                    if client == Transport::Tcp && is_truncated(&answer) {
                        return tcp_exchange(addr, bytes, upstream_req)
                            .await
                            .map_err(|e| ForwardError::Io(addr, e));
                    }
                    Ok(answer)
                }
                .boxed()
            })
            .collect();
        let deadline = tokio::time::Instant::now() + self.timeout;
        // An answer that does not resolve the question, kept in case nothing better comes.
        let mut fallback = None;
        let mut failed = None;
        let mut answer = loop {
            match tokio::time::timeout_at(deadline, racers.next()).await {
                Ok(Some(Ok(answer))) if resolves(&answer) => break answer,
                Ok(Some(Ok(answer))) => {
                    fallback.get_or_insert(answer);
                }
                Ok(Some(Err(e))) => failed = Some(e),
                done => {
                    break match (fallback, failed) {
                        (Some(answer), _) => answer,
                        (None, Some(e)) if done.is_ok() => return Err(e),
                        _ => return Err(ForwardError::Timeout(self.timeout)),
                    };
                }
            }
        };
        answer[..2].copy_from_slice(&req.metadata.id.to_be_bytes());
        Ok(answer)
    }
}

/// Whether `answer` settles the question: NOERROR or NXDOMAIN (a SERVFAIL, REFUSED, NOTIMP or
/// FORMERR says something about that upstream, not about the name).
fn resolves(answer: &[u8]) -> bool {
    answer
        .get(3)
        .is_some_and(|flags| matches!(flags & 0x0f, 0 | 3))
}

fn is_truncated(answer: &[u8]) -> bool {
    answer.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

/// Whether `answer` is a response to `req`: same id, QR set, same question.
fn matches(answer: &[u8], req: &Message) -> bool {
    let Some(head) = answer.get(..12) else {
        return false;
    };
    let Ok(header) = Header::read(&mut BinDecoder::new(head)) else {
        return false;
    };
    if header.metadata.id != req.metadata.id
        || header.metadata.message_type != MessageType::Response
    {
        return false;
    }
    let Ok(msg) = Message::from_vec(answer) else {
        // A truncated answer may fail to parse past the question; accept it if the header
        // matches and TC is set (the client retries over TCP).
        return header.metadata.truncation;
    };
    msg.queries.len() == req.queries.len()
        && msg.queries.iter().zip(&req.queries).all(|(a, b)| {
            a.query_type() == b.query_type()
                && a.query_class() == b.query_class()
                && a.name().eq_ignore_root(b.name())
        })
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

async fn udp_exchange(addr: SocketAddr, query: &[u8], req: &Message) -> std::io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(unspecified_for(addr)).await?;
    sock.connect(addr).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if matches(&buf[..n], req) {
            buf.truncate(n);
            return Ok(buf);
        }
        tracing::debug!(%addr, "ignoring mismatched upstream datagram");
    }
}

async fn tcp_exchange(addr: SocketAddr, query: &[u8], req: &Message) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let len = u16::try_from(query.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    if !matches(&buf, req) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "upstream TCP answer does not match the query",
        ));
    }
    Ok(buf)
}
