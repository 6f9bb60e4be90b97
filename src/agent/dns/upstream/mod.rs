//! Forwarding of queries outside our zones to upstream resolvers ([`UpstreamForwarder`]): the
//! query goes to two upstreams at once over UDP (one if only one is configured) under a fresh
//! random id, from a random one of each upstream's pooled sockets (`pool`); the first
//! matching answer that resolves the question (NOERROR or NXDOMAIN) wins. A SERVFAIL or
//! REFUSED from one upstream waits for the other, so one broken resolver cannot fail names the
//! other can answer; it is passed on only if nothing better comes before the deadline. A truncated UDP answer is retried over TCP to the upstream that
//! sent it when the client itself came over TCP (a UDP client gets the TC answer and retries
//! over TCP itself). Everything runs under one deadline; the caller answers SERVFAIL on error.
//! The client's EDNS options are not passed on (its payload size and DO bit are).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::FuturesUnordered;
use hickory_proto::op::Message;
use hickory_proto::rr::rdata::opt::OPT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::answer::Transport;
use pool::{Pool, matches};

mod pool;

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
pub(crate) struct UpstreamForwarder {
    upstreams: Arc<[SocketAddr]>,
    /// The UDP sockets of each upstream, in `upstreams` order.
    pools: Vec<Pool>,
    timeout: Duration,
    next: AtomicUsize,
    /// Stops the pools' reader tasks when the forwarder goes.
    stop: CancellationToken,
}

impl Drop for UpstreamForwarder {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl UpstreamForwarder {
    /// `None` when there are no upstreams.
    pub(crate) fn new(upstreams: &[SocketAddr], timeout: Duration) -> Option<UpstreamForwarder> {
        if upstreams.is_empty() {
            return None;
        }
        let stop = CancellationToken::new();
        Some(UpstreamForwarder {
            upstreams: upstreams.into(),
            pools: upstreams
                .iter()
                .map(|a| Pool::new(*a, pool::SOCKETS, pool::ROTATE, stop.clone()))
                .collect(),
            timeout,
            next: AtomicUsize::new(rand::random::<u32>() as usize),
            stop,
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
        // The client's EDNS options (a COOKIE, a client subnet) are between it and l4lb, and
        // the answer may be shared (coalesced, cached) with other clients: not passed on.
        if let Some(edns) = upstream_req.edns.as_mut() {
            *edns.options_mut() = OPT::new(Vec::new());
        }
        let bytes = upstream_req.to_vec().map_err(|_| ForwardError::Encode)?;
        let question = question(&bytes).ok_or(ForwardError::Encode)?;
        let n = self.upstreams.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let picks: Vec<usize> = (0..n.min(2)).map(|i| (first + i) % n).collect();
        let bytes = &bytes;
        let mut racers: FuturesUnordered<BoxFuture<'_, Result<Vec<u8>, ForwardError>>> = picks
            .into_iter()
            .map(|i| {
                let (addr, pool) = (self.upstreams[i], &self.pools[i]);
                async move {
                    let answer = pool
                        .exchange(bytes, question)
                        .await
                        .map_err(|e| ForwardError::Io(addr, e))?;
                    if client == Transport::Tcp && is_truncated(&answer) {
                        return tcp_exchange(addr, bytes, question)
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

/// The question section of an encoded query (header excluded): its name, type and class.
/// `None` unless it holds exactly one uncompressed question.
pub(crate) fn question(query: &[u8]) -> Option<&[u8]> {
    if query.get(4..6)? != [0, 1] {
        return None;
    }
    let mut pos = 12;
    loop {
        let len = *query.get(pos)? as usize;
        if len & 0xc0 != 0 {
            return None;
        }
        pos += 1 + len;
        if len == 0 {
            break;
        }
    }
    query.get(12..pos + 4)
}

async fn tcp_exchange(addr: SocketAddr, query: &[u8], question: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let len = u16::try_from(query.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    if !matches(&buf, query.get(..2).unwrap_or_default(), question) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "upstream TCP answer does not match the query",
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn encoded(name: &str, t: RecordType, id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m.to_vec().expect("encodes")
    }

    fn answer_to(query: &[u8], edit: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut m = Message::from_vec(query).expect("parses");
        m.metadata.message_type = MessageType::Response;
        edit(&mut m);
        m.to_vec().expect("encodes")
    }

    #[test]
    fn answers_match_by_id_qr_and_question() {
        let q = encoded("www.example.", RecordType::A, 7);
        let qs = question(&q).expect("one question");
        assert_eq!(qs.len(), "www.example.".len() + 1 + 4);
        // An answer to another query, unedited.
        let to = |name: &str, t, id| answer_to(&encoded(name, t, id), |_| {});
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("the answer", answer_to(&q, |_| {}), true),
            ("0x20 case", to("WwW.ExAmple.", RecordType::A, 7), true),
            ("another id", to("www.example.", RecordType::A, 8), false),
            (
                "another type",
                to("www.example.", RecordType::AAAA, 7),
                false,
            ),
            (
                "another name",
                to("www.example.org.", RecordType::A, 7),
                false,
            ),
            ("a query, not an answer", q.clone(), false),
            ("no question", answer_to(&q, |m| m.queries.clear()), false),
            (
                "truncated without its question",
                answer_to(&q, |m| {
                    m.queries.clear();
                    m.metadata.truncation = true;
                }),
                true,
            ),
            ("header only", answer_to(&q, |_| {})[..12].to_vec(), false),
            ("short", vec![0, 7, 0x80], false),
        ];
        for (what, answer, want) in cases {
            assert_eq!(matches(&answer, &q[..2], qs), want, "{what}");
        }
        assert!(question(&q[..14]).is_none());
        let mut two = q.clone();
        two[5] = 2;
        assert!(question(&two).is_none());
    }
}
