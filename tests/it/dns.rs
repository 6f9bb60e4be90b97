//! Integration tests of the embedded DNS: a real server on 127.0.0.1 port 0 queried over UDP
//! and TCP with packets built by hickory-proto (and with `dig` when installed), forwarding to
//! in-test upstreams, truncation, and publishing while queries run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use l4lb::agent::dns::{CacheConfig, DnsCatalog, DnsConfig, DnsMetrics, ServerLimits, serve};
use l4lb::model::{Protocol, Vip, VipName};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WEB: &str = "web.marathon.l4lb.thisdcos.directory.";

fn named(label: &str, ip: &str, port: u16, protocol: Protocol) -> Vip {
    let name = VipName::new(label, "marathon");
    Vip::normalized(
        (ip.parse().expect("ip"), port, protocol),
        Some(name),
        vec![],
    )
}

struct Server {
    udp: SocketAddr,
    tcp: SocketAddr,
    catalog: DnsCatalog,
    metrics: DnsMetrics,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(cfg: DnsConfig) -> Server {
        Server::start_with(cfg, ServerLimits::default()).await
    }

    /// A server forwarding to `upstreams` with `timeout`, its cache off: the forwarding path
    /// itself, every query going upstream (the cache has its own tests).
    async fn forwarding(upstreams: &[SocketAddr], timeout: Duration) -> Server {
        Server::start(DnsConfig {
            upstreams: upstreams.to_vec(),
            upstream_timeout: timeout,
            cache: CacheConfig::off(),
            ..DnsConfig::default()
        })
        .await
    }

    async fn start_with(cfg: DnsConfig, limits: ServerLimits) -> Server {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let (udp_addr, tcp_addr) = (
            udp.local_addr().expect("addr"),
            tcp.local_addr().expect("addr"),
        );
        let catalog = DnsCatalog::new(&cfg);
        catalog.publish(&[
            named("web", "11.0.0.1", 80, Protocol::Tcp),
            named("web", "11.0.0.1", 443, Protocol::Tcp),
            named("web", "fd01:c::1", 80, Protocol::Tcp),
        ]);
        let metrics = DnsMetrics::new(&mut Registry::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            cfg,
            catalog.clone(),
            vec![udp],
            vec![tcp],
            metrics.clone(),
            shutdown.clone(),
            limits,
        ));
        Server {
            udp: udp_addr,
            tcp: tcp_addr,
            catalog,
            metrics,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("serve returns after shutdown")
            .expect("no panic")
            .expect("serve ok");
    }
}

fn query(id: u16, name: &str, t: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
    m
}

/// Send `bytes` and wait up to `wait` for one datagram back.
async fn udp_raw_wait(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Send `bytes` and wait for an answer (generously: the machine may be busy).
async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    udp_raw_wait(server, bytes, Duration::from_secs(5)).await
}

/// The answer to `q` over UDP, checked to fit in `limit` bytes.
async fn udp_query_within(server: SocketAddr, q: &Message, limit: usize) -> Message {
    let raw = udp_raw(server, &q.to_vec().expect("encode"))
        .await
        .expect("an answer");
    assert!(raw.len() <= limit, "{} bytes", raw.len());
    Message::from_vec(&raw).expect("parse")
}

/// Whether the server stays silent (drops the packet).
async fn udp_dropped(server: SocketAddr, bytes: &[u8]) -> bool {
    udp_raw_wait(server, bytes, Duration::from_millis(300))
        .await
        .is_none()
}

async fn udp_query(server: SocketAddr, q: &Message) -> Message {
    let bytes = udp_raw(server, &q.to_vec().expect("encode"))
        .await
        .expect("a UDP answer");
    let resp = Message::from_vec(&bytes).expect("parse");
    assert_eq!(resp.metadata.id, q.metadata.id);
    assert_eq!(resp.metadata.message_type, MessageType::Response);
    resp
}

/// Messages as DNS over TCP sends them: each after its length (one write for them all).
fn framed<'a>(messages: impl IntoIterator<Item = &'a Message>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let bytes = m.to_vec().expect("encode");
        out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

async fn tcp_send(stream: &mut TcpStream, q: &Message) {
    stream.write_all(&framed([q])).await.expect("write");
}

async fn tcp_recv(stream: &mut TcpStream) -> Message {
    let len = stream.read_u16().await.expect("length") as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await.expect("body");
    Message::from_vec(&buf).expect("parse")
}

async fn tcp_query(server: SocketAddr, q: &Message) -> Message {
    let mut s = TcpStream::connect(server).await.expect("connect");
    tcp_send(&mut s, q).await;
    let resp = tcp_recv(&mut s).await;
    assert_eq!(resp.metadata.id, q.metadata.id);
    resp
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

/// A TCP client whose connection was accepted just before shutdown (as during a take-over,
/// when the old agent stops) still gets its answer; the connection then closes and `serve`
/// returns within the drain window, however the client lingers.
#[tokio::test]
async fn a_tcp_query_sent_just_after_shutdown_is_answered() {
    let s = Server::start(DnsConfig::default()).await;
    let mut conn = TcpStream::connect(s.tcp).await.expect("connect");
    // The connection is accepted and its task waiting for a query.
    let q = query(1, "web.marathon.l4lb.thisdcos.directory.", RecordType::A);
    tcp_send(&mut conn, &q).await;
    assert_eq!(a_records(&tcp_recv(&mut conn).await), ["11.0.0.1"]);
    s.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let q = query(2, "web.marathon.l4lb.thisdcos.directory.", RecordType::A);
    tcp_send(&mut conn, &q).await;
    let r = tcp_recv(&mut conn).await;
    assert_eq!(
        (r.metadata.id, a_records(&r)),
        (2, vec!["11.0.0.1".to_string()])
    );
    let t0 = Instant::now();
    // Idle now: closed at the end of the drain window, and serve is done.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), conn.read_to_end(&mut rest))
        .await
        .expect("closed within the drain window")
        .expect("read");
    assert_eq!(n, 0);
    s.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn udp_and_pipelined_tcp() {
    let s = Server::start(DnsConfig::default()).await;
    let r = udp_query(s.udp, &query(1, WEB, RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert_eq!(a_records(&r), ["11.0.0.1"]);

    let r = udp_query(
        s.udp,
        &query(2, "nope.marathon.l4lb.thisdcos.directory.", RecordType::A),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(r.authorities.len(), 1);

    // Three queries in one write; three answers in order on the same connection.
    let mut conn = TcpStream::connect(s.tcp).await.expect("connect");
    let qs = [
        query(10, WEB, RecordType::A),
        query(11, WEB, RecordType::AAAA),
        query(
            12,
            "_web._tcp.marathon.l4lb.thisdcos.directory.",
            RecordType::SRV,
        ),
    ];
    conn.write_all(&framed(&qs)).await.expect("write");
    let r10 = tcp_recv(&mut conn).await;
    let r11 = tcp_recv(&mut conn).await;
    let r12 = tcp_recv(&mut conn).await;
    assert_eq!(
        (r10.metadata.id, r11.metadata.id, r12.metadata.id),
        (10, 11, 12)
    );
    assert_eq!(a_records(&r10), ["11.0.0.1"]);
    assert_eq!(a_records(&r11), ["fd01:c::1"]);
    assert_eq!(r12.answers.len(), 2);
    assert_eq!(r12.additionals.len(), 2);
    // The connection stays usable, also when a query arrives in pieces.
    tcp_send(&mut conn, &query(13, WEB, RecordType::A)).await;
    assert_eq!(tcp_recv(&mut conn).await.metadata.id, 13);
    let framed = framed([&query(14, WEB, RecordType::A)]);
    for piece in [&framed[..1], &framed[1..7], &framed[7..]] {
        conn.write_all(piece).await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tcp_recv(&mut conn).await.metadata.id, 14);

    assert_eq!(s.metrics.queries_with("A", "NOERROR"), 4);
    assert_eq!(s.metrics.queries_with("A", "NXDOMAIN"), 1);
    s.stop().await;
}

#[tokio::test]
async fn malformed_and_refused() {
    let s = Server::start(DnsConfig::default()).await;
    // No upstreams: REFUSED outside the zone.
    let r = udp_query(s.udp, &query(3, "example.com.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    // Header only: FORMERR echoing the id. Shorter than a header: dropped.
    let q = query(77, WEB, RecordType::A).to_vec().expect("encode");
    let r = Message::from_vec(&udp_raw(s.udp, &q[..14]).await.expect("an answer")).expect("parse");
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (77, ResponseCode::FormErr)
    );
    assert!(udp_dropped(s.udp, &q[..5]).await);
    // A response sent to us: dropped.
    let mut resp = q.clone();
    resp[2] |= 0x80;
    assert!(udp_dropped(s.udp, &resp).await);
    // Still serving.
    udp_query(s.udp, &query(4, WEB, RecordType::A)).await;
    s.stop().await;
}

#[tokio::test]
async fn truncated_over_udp_full_over_tcp() {
    let s = Server::start(DnsConfig::default()).await;
    let vips: Vec<Vip> = (1..=60)
        .map(|p| named("big", "11.0.0.9", 2000 + p, Protocol::Tcp))
        .collect();
    s.catalog.publish(&vips);
    let q = query(
        5,
        "_big._tcp.marathon.l4lb.thisdcos.directory.",
        RecordType::SRV,
    );
    let r = udp_query_within(s.udp, &q, 512).await;
    assert!(r.metadata.truncation);
    let r = tcp_query(s.tcp, &q).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 60);
    // With EDNS0 and a large buffer the answer fits in 1232 bytes? 60 SRVs do not; it is
    // truncated at our cap but keeps the OPT record.
    let mut qe = q.clone();
    let mut e = Edns::new();
    e.set_max_payload(4096);
    qe.set_edns(e);
    let r = udp_query_within(s.udp, &qe, 1232).await;
    assert!(r.edns.is_some());
    // 20 ports fit in an EDNS answer but not in 512 bytes.
    s.catalog.publish(&vips[..20]);
    let r = udp_query(s.udp, &qe).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 20);
    let r = udp_query(s.udp, &q).await;
    assert!(r.metadata.truncation);
    s.stop().await;
}

/// How a test upstream answers over UDP.
#[derive(Clone, Copy, PartialEq)]
enum Up {
    /// An A record, 192.0.2.1.
    Answer,
    /// The same, after a delay.
    AnswerAfter(Duration),
    /// Only TC set (the full answer comes over TCP).
    Truncate,
    /// REFUSED, at once.
    Refuse,
    /// Forty A records (about 700 bytes), whatever the client can take.
    Big,
}

/// A tiny upstream: answers A queries with 192.0.2.1 over TCP, and over UDP as `up` says.
async fn upstream(up: Up) -> (SocketAddr, CancellationToken) {
    // UDP and TCP on the same port; another test may hold that TCP port, so retry.
    let mut attempt = 0;
    let (udp, tcp, addr) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = udp.local_addr().expect("addr");
        match TcpListener::bind(addr).await {
            Ok(tcp) => break (udp, tcp, addr),
            Err(e) if attempt < 50 => {
                attempt += 1;
                eprintln!("port {addr} busy for TCP ({e}); retrying");
            }
            Err(e) => panic!("no port free for UDP and TCP: {e}"),
        }
    };
    let stop = CancellationToken::new();
    fn answer(req: &[u8]) -> Option<Message> {
        let req = Message::from_vec(req).ok()?;
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_available = true;
        resp.add_queries(req.queries.clone());
        let name = req.queries.first()?.name().clone();
        resp.add_answer(Record::from_rdata(
            name,
            60,
            RData::A(A([192, 0, 2, 1].into())),
        ));
        Some(resp)
    }
    let stop2 = stop.clone();
    let udp = std::sync::Arc::new(udp);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                _ = stop2.cancelled() => return,
                r = udp.recv_from(&mut buf) => {
                    let Ok((n, peer)) = r else { continue };
                    let Some(mut resp) = answer(&buf[..n]) else { continue };
                    match up {
                        Up::Answer => {}
                        Up::AnswerAfter(d) => tokio::time::sleep(d).await,
                        Up::Truncate => resp = resp.truncate(),
                        Up::Refuse => {
                            resp.answers.clear();
                            resp.metadata.response_code = ResponseCode::Refused;
                        }
                        Up::Big => {
                            let name = resp.answers[0].name.clone();
                            for i in 2..41u8 {
                                resp.add_answer(Record::from_rdata(
                                    name.clone(),
                                    60,
                                    RData::A(A([192, 0, 2, i].into())),
                                ));
                            }
                        }
                    }
                    let _ = udp.send_to(&resp.to_vec().expect("encode"), peer).await;
                }
                r = tcp.accept() => {
                    let Ok((mut s, _)) = r else { continue };
                    tokio::spawn(async move {
                        let len = s.read_u16().await.expect("len") as usize;
                        let mut b = vec![0u8; len];
                        s.read_exact(&mut b).await.expect("body");
                        let out = answer(&b).expect("answer");
                        s.write_all(&framed([&out])).await.expect("write");
                    });
                }
            }
        }
    });
    (addr, stop)
}

#[tokio::test]
async fn forwards_to_upstream_and_retries_over_tcp() {
    let (good, _g) = upstream(Up::Answer).await;
    let s = Server::forwarding(&[good], Duration::from_secs(2)).await;
    let r = udp_query(s.udp, &query(0xbeef, "example.com.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&r), ["192.0.2.1"]);
    let r = tcp_query(s.tcp, &query(0xcafe, "Example.COM.", RecordType::A)).await;
    assert_eq!(a_records(&r), ["192.0.2.1"]);
    assert_eq!(s.metrics.forwarded_count(), 2);
    // In-zone names are still answered locally.
    let r = udp_query(s.udp, &query(6, WEB, RecordType::A)).await;
    assert_eq!(a_records(&r), ["11.0.0.1"]);
    assert_eq!(s.metrics.forwarded_count(), 2);
    s.stop().await;

    // An upstream that truncates over UDP: a TCP client gets the full answer via TCP retry, a
    // UDP client gets TC (and would retry over TCP itself).
    let (trunc, _t) = upstream(Up::Truncate).await;
    let s = Server::forwarding(&[trunc], DnsConfig::default().upstream_timeout).await;
    let r = tcp_query(s.tcp, &query(7, "example.org.", RecordType::A)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(a_records(&r), ["192.0.2.1"]);
    let r = udp_query(s.udp, &query(8, "example.org.", RecordType::A)).await;
    assert!(r.metadata.truncation);
    s.stop().await;
}

#[tokio::test]
async fn silent_upstream_gives_servfail_and_a_live_one_wins() {
    // Bound but never read: queries to it vanish.
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let s = Server::forwarding(&[silent_addr], Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let r = udp_query(s.udp, &query(9, "example.net.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    // At the timeout, not before; within it plus slack for a busy machine.
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(280), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(s.metrics.upstream_failure_count(), 1);

    // Pipelined over TCP: the local answer is not held up behind the slow forwarded one.
    let mut conn = TcpStream::connect(s.tcp).await.expect("connect");
    let both = [
        query(20, "example.net.", RecordType::A),
        query(21, WEB, RecordType::A),
    ];
    conn.write_all(&framed(&both)).await.expect("write");
    let first = tcp_recv(&mut conn).await;
    let second = tcp_recv(&mut conn).await;
    assert_eq!(first.metadata.id, 21);
    assert_eq!(a_records(&first), ["11.0.0.1"]);
    assert_eq!(second.metadata.id, 20);
    assert_eq!(second.metadata.response_code, ResponseCode::ServFail);
    s.stop().await;

    // Two upstreams at once: the silent one does not delay the live one.
    let (good, _g) = upstream(Up::Answer).await;
    let s = Server::forwarding(&[silent_addr, good], Duration::from_secs(5)).await;
    for id in 0..4 {
        let t0 = Instant::now();
        let r = udp_query(s.udp, &query(id, "example.net.", RecordType::A)).await;
        assert_eq!(a_records(&r), ["192.0.2.1"]);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
    drop(silent);
    s.stop().await;
}

#[tokio::test]
async fn a_large_forwarded_answer_is_truncated_to_what_the_client_can_take() {
    let (big, _b) = upstream(Up::Big).await;
    let s = Server::start(DnsConfig {
        upstreams: vec![big],
        ..DnsConfig::default()
    })
    .await;
    // No EDNS: at most 512 bytes, with TC so the client retries over TCP.
    let q = query(1, "example.com.", RecordType::A);
    let r = udp_query_within(s.udp, &q, 512).await;
    assert!(r.metadata.truncation);
    assert_eq!(r.metadata.id, 1);
    // With EDNS 4096 the whole answer fits.
    let mut qe = query(2, "example.com.", RecordType::A);
    let mut e = Edns::new();
    e.set_max_payload(4096);
    qe.set_edns(e);
    let r = udp_query(s.udp, &qe).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 40);
    s.stop().await;
}

/// `n` queries for example.net. A to `s` over UDP, each answered with `rcode`.
async fn ask_example_net(s: &Server, n: u16, rcode: ResponseCode) -> Vec<Message> {
    let mut answers = Vec::new();
    for id in 0..n {
        let r = udp_query(s.udp, &query(id, "example.net.", RecordType::A)).await;
        assert_eq!(r.metadata.response_code, rcode, "query {id}");
        answers.push(r);
    }
    answers
}
#[tokio::test]
async fn a_refusing_upstream_does_not_beat_one_that_answers() {
    let (refusing, _r) = upstream(Up::Refuse).await;
    let (slow, _s) = upstream(Up::AnswerAfter(Duration::from_millis(150))).await;
    let s = Server::forwarding(&[refusing, slow], Duration::from_secs(3)).await;
    // Both are asked every time; the REFUSED arrives first and the answer wins anyway.
    for r in ask_example_net(&s, 4, ResponseCode::NoError).await {
        assert_eq!(a_records(&r), ["192.0.2.1"]);
    }
    s.stop().await;

    // Alone, the refusal is passed on as it is, not turned into SERVFAIL.
    let s = Server::start(DnsConfig {
        upstreams: vec![refusing],
        upstream_timeout: Duration::from_secs(3),
        ..DnsConfig::default()
    })
    .await;
    let t0 = Instant::now();
    let r = udp_query(s.udp, &query(9, "example.net.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    s.stop().await;

    // Beside a silent upstream, the refusal is the answer at the deadline.
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let s = Server::start(DnsConfig {
        upstreams: vec![refusing, silent.local_addr().expect("addr")],
        upstream_timeout: Duration::from_millis(300),
        ..DnsConfig::default()
    })
    .await;
    ask_example_net(&s, 2, ResponseCode::Refused).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_swaps_names_while_queries_run() {
    let s = Server::start(DnsConfig::default()).await;
    let a = [named("web", "11.0.0.1", 80, Protocol::Tcp)];
    let b = [
        named("web", "11.0.0.2", 80, Protocol::Tcp),
        named("other", "11.0.0.3", 80, Protocol::Tcp),
    ];
    let catalog = s.catalog.clone();
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    let publisher = tokio::spawn(async move {
        let mut n = 0u32;
        while !stop2.is_cancelled() {
            if n.is_multiple_of(2) {
                catalog.publish(&a);
            } else {
                catalog.publish(&b);
            }
            n += 1;
            tokio::task::yield_now().await;
        }
        n
    });
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut seen = std::collections::BTreeSet::new();
    let mut buf = vec![0u8; 2048];
    for id in 0..300u16 {
        sock.send_to(
            &query(id, WEB, RecordType::A).to_vec().expect("encode"),
            s.udp,
        )
        .await
        .expect("send");
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
            .await
            .expect("answer in time")
            .expect("recv");
        let r = Message::from_vec(&buf[..n]).expect("parse");
        assert_eq!(r.metadata.id, id);
        let ans = a_records(&r);
        assert_eq!(ans.len(), 1, "always exactly one consistent answer");
        seen.insert(ans[0].clone());
    }
    stop.cancel();
    let publishes = publisher.await.expect("publisher");
    assert!(publishes > 1);
    assert!(
        seen.iter().all(|a| a == "11.0.0.1" || a == "11.0.0.2"),
        "{seen:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn tcp_connection_cap_and_idle_timeout() {
    let s = Server::start_with(
        DnsConfig::default(),
        ServerLimits {
            max_tcp_connections: 1,
            tcp_idle_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        },
    )
    .await;
    let mut first = TcpStream::connect(s.tcp).await.expect("connect");
    tcp_send(&mut first, &query(1, WEB, RecordType::A)).await;
    tcp_recv(&mut first).await;
    // Over the cap: closed without an answer.
    let mut second = TcpStream::connect(s.tcp).await.expect("connect");
    let mut b = [0u8; 2];
    let n = tokio::time::timeout(Duration::from_secs(2), second.read(&mut b))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // The idle first connection is closed by the server.
    let n = tokio::time::timeout(Duration::from_secs(2), first.read(&mut b))
        .await
        .expect("closed by idle timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // The slot is free again.
    tcp_query(s.tcp, &query(2, WEB, RecordType::A)).await;
    s.stop().await;
}

const DIG: &str = "/usr/bin/dig";

/// Whether `dig` is installed (the tests that use it skip otherwise, saying so).
fn have_dig() -> bool {
    let there = std::path::Path::new(DIG).exists();
    if !there {
        eprintln!("dig not installed; skipping");
    }
    there
}

/// `dig`'s output for `args`, asking 127.0.0.1 on `port` once, 2 s at the most.
async fn dig(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::new(DIG)
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .await
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn dig_against_the_server() {
    if !have_dig() {
        return;
    }
    let s = Server::start(DnsConfig::default()).await;
    let a = dig(s.udp.port(), &["+short", WEB, "A"]).await;
    assert_eq!(a.trim(), "11.0.0.1");
    let srv_name = "_web._tcp.marathon.l4lb.thisdcos.directory";
    let srv = dig(s.tcp.port(), &["+tcp", "+short", srv_name, "SRV"]).await;
    assert_eq!(
        srv.trim(),
        "0 0 80 web.marathon.l4lb.thisdcos.directory.\n0 0 443 web.marathon.l4lb.thisdcos.directory."
    );
    let out = dig(
        s.udp.port(),
        &["nope.marathon.dclb.thisdcos.directory", "A"],
    )
    .await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains("flags: qr aa rd"), "{out}");
    assert!(out.contains("SOA\tns.dclb.thisdcos.directory."), "{out}");
    s.stop().await;
}

/// In-process cost of answering (parse, look up, encode) against 1,000 named VIPs. Run with
/// `cargo test --release --test dns -- --ignored --nocapture bench_`.
#[test]
#[ignore = "benchmark; run in release"]
fn bench_answer_packet() {
    let cat = DnsCatalog::new(&DnsConfig::default());
    let vips: Vec<Vip> = (0..1000u32)
        .map(|i| {
            let ip = format!("11.0.{}.{}", i / 256, i % 256);
            named(&format!("app{i}"), &ip, 80, Protocol::Tcp)
        })
        .collect();
    let t0 = Instant::now();
    cat.publish(&vips);
    println!("publish 1000 VIPs: {:?}", t0.elapsed());
    for (what, name, t) in [
        (
            "A hit",
            "app500.marathon.l4lb.thisdcos.directory.",
            RecordType::A,
        ),
        (
            "NXDOMAIN",
            "nope.marathon.l4lb.thisdcos.directory.",
            RecordType::A,
        ),
        (
            "SRV",
            "_app7._tcp.marathon.l4lb.thisdcos.directory.",
            RecordType::SRV,
        ),
        ("REFUSED", "example.com.", RecordType::A),
    ] {
        let q = query(1, name, t).to_vec().expect("encode");
        let n = 200_000;
        let t0 = Instant::now();
        for _ in 0..n {
            std::hint::black_box(l4lb::agent::dns::answer_packet(
                &cat,
                std::hint::black_box(&q),
                true,
            ));
        }
        let per = t0.elapsed() / n;
        println!(
            "{what:>9}: {per:?}/query ({:.0} queries/s on one core)",
            1e9 / per.as_nanos() as f64
        );
    }
}

/// End to end over UDP with dnsperf (skipped if not installed). Run with
/// `cargo test --release --test dns -- --ignored --nocapture dnsperf`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release"]
async fn dnsperf_udp() {
    if !std::path::Path::new("/usr/bin/dnsperf").exists() {
        eprintln!("dnsperf not installed; skipping");
        return;
    }
    let s = Server::start(DnsConfig::default()).await;
    let dir = std::env::temp_dir().join(format!("l4lb-dnsperf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let data = dir.join("queries.txt");
    std::fs::write(
        &data,
        "web.marathon.l4lb.thisdcos.directory A\n\
         web.marathon.l4lb.thisdcos.directory AAAA\n\
         nope.marathon.l4lb.thisdcos.directory A\n\
         _web._tcp.marathon.l4lb.thisdcos.directory SRV\n",
    )
    .expect("write queries");
    let out = tokio::process::Command::new("/usr/bin/dnsperf")
        .args(["-s", "127.0.0.1", "-p"])
        .arg(s.udp.port().to_string())
        .args(["-d"])
        .arg(&data)
        .args(["-l", "5", "-c", "4", "-Q", "1000000"])
        .output()
        .await
        .expect("run dnsperf");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| {
        l.contains("Queries per second")
            || l.contains("Queries lost")
            || l.contains("Average Latency")
    }) {
        println!("{}", line.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
    s.stop().await;
}

#[tokio::test]
async fn serve_needs_a_socket() {
    let cfg = DnsConfig::default();
    let err = l4lb::agent::dns::serve(
        cfg.clone(),
        DnsCatalog::new(&cfg),
        vec![],
        vec![],
        DnsMetrics::new(&mut Registry::default()),
        CancellationToken::new(),
        ServerLimits::default(),
    )
    .await
    .expect_err("no sockets");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

// --- The cache of forwarded answers --------------------------------------------------------

/// An upstream that counts the queries it gets, per name, and answers by name:
/// `short.` A TTL 2, `long.` A TTL 60, `gone.` NXDOMAIN with an SOA (TTL 60, MINIMUM 2),
/// `broken.` SERVFAIL, `zero.` A TTL 0, `slow.` A TTL 60 after 300 ms, `big.` forty A
/// records TTL 60 (about 700 bytes); all under `example.`, anything else REFUSED.
struct Counting {
    addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl Counting {
    async fn start() -> Counting {
        use hickory_proto::rr::rdata::SOA;
        let udp = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let addr = udp.local_addr().expect("addr");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (seen2, stop2) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = udp.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = req.queries.first() else {
                    continue;
                };
                let qname = q.name().clone();
                let lower = qname.to_lowercase().to_string();
                seen2.lock().unwrap().push(lower.clone());
                if req
                    .edns
                    .as_ref()
                    .is_some_and(|e| !e.options().as_ref().is_empty())
                {
                    seen2.lock().unwrap().push("<EDNS options>".into());
                }
                let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
                resp.metadata.recursion_desired = req.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                resp.add_queries(req.queries.clone());
                if let Some(e) = &req.edns {
                    let mut out = Edns::new();
                    out.set_max_payload(1232);
                    out.flags_mut().dnssec_ok = e.flags().dnssec_ok;
                    resp.set_edns(out);
                }
                let a = |ttl: u32, last: u8| {
                    Record::from_rdata(qname.clone(), ttl, RData::A(A([192, 0, 2, last].into())))
                };
                let mut delay = None;
                match lower.as_str() {
                    "short.example." => {
                        resp.add_answer(a(2, 1));
                    }
                    "long.example." => {
                        resp.add_answer(a(60, 1));
                    }
                    "zero.example." => {
                        resp.add_answer(a(0, 1));
                    }
                    "slow.example." => {
                        resp.add_answer(a(60, 1));
                        delay = Some(Duration::from_millis(300));
                    }
                    "big.example." => {
                        for i in 1..=40 {
                            resp.add_answer(a(60, i));
                        }
                    }
                    "gone.example." => {
                        resp.metadata.response_code = ResponseCode::NXDomain;
                        resp.add_authority(Record::from_rdata(
                            Name::from_ascii("example.").unwrap(),
                            60,
                            RData::SOA(SOA::new(
                                Name::from_ascii("ns.example.").unwrap(),
                                Name::from_ascii("hostmaster.example.").unwrap(),
                                1,
                                3600,
                                600,
                                86400,
                                2,
                            )),
                        ));
                    }
                    "broken.example." => resp.metadata.response_code = ResponseCode::ServFail,
                    _ => resp.metadata.response_code = ResponseCode::Refused,
                }
                let out = resp.to_vec().expect("encode");
                let udp = udp.clone();
                tokio::spawn(async move {
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await;
                    }
                    let _ = udp.send_to(&out, peer).await;
                });
            }
        });
        Counting { addr, seen, stop }
    }

    /// Queries seen for `name` (lower case, fully qualified).
    fn asked(&self, name: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == name)
            .count()
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn with_upstream(up: &Counting, cache_entries: usize) -> Server {
    Server::start(DnsConfig {
        upstreams: vec![up.addr],
        upstream_timeout: Duration::from_secs(3),
        cache: CacheConfig {
            entries: cache_entries,
            ..Default::default()
        },
        ..DnsConfig::default()
    })
    .await
}

#[tokio::test]
async fn forwarded_answers_are_cached_for_their_ttl() {
    let up = Counting::start().await;
    let s = with_upstream(&up, 100).await;

    // The first query goes upstream; the next ones, over UDP or TCP and in any case, do not,
    // and come back with their own id and case and a TTL that does not grow.
    let r = udp_query(s.udp, &query(1, "long.example.", RecordType::A)).await;
    assert_eq!(a_records(&r), ["192.0.2.1"]);
    assert_eq!(r.answers[0].ttl, 60);
    assert_eq!(up.asked("long.example."), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = udp_query(s.udp, &query(2, "LoNg.ExAmPlE.", RecordType::A)).await;
    assert_eq!(r.metadata.id, 2);
    assert_eq!(r.queries[0].name().to_string(), "LoNg.ExAmPlE.");
    assert_eq!(a_records(&r), ["192.0.2.1"]);
    let ttl = r.answers[0].ttl;
    assert!(
        (50..60).contains(&ttl),
        "TTL {ttl} after a second in the cache"
    );
    let r = tcp_query(s.tcp, &query(3, "long.EXAMPLE.", RecordType::A)).await;
    assert_eq!(r.queries[0].name().to_string(), "long.EXAMPLE.");
    assert!(r.answers[0].ttl <= ttl);
    // A query the wire reader leaves to the decoding path (a byte after the question) is
    // answered from the cache there.
    let mut odd = query(33, "long.example.", RecordType::A).to_vec().unwrap();
    odd.push(0);
    let r = Message::from_vec(&udp_raw(s.udp, &odd).await.expect("an answer")).unwrap();
    assert_eq!(
        (r.metadata.id, a_records(&r)),
        (33, vec!["192.0.2.1".to_string()])
    );
    assert_eq!(
        up.asked("long.example."),
        1,
        "cached answers do not reach the upstream"
    );
    // Another type is another question.
    let r = udp_query(s.udp, &query(4, "long.example.", RecordType::AAAA)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(up.asked("long.example."), 2);
    let (hits, misses, entries) = s.metrics.cache_counts();
    assert_eq!((hits, misses, entries), (3, 2, 2));
    assert_eq!(s.metrics.forwarded_count(), 2);
    assert_eq!(s.metrics.queries_with("A", "NOERROR"), 4);

    // A TTL of 2 s: cached within it, asked again after it.
    udp_query(s.udp, &query(5, "short.example.", RecordType::A)).await;
    udp_query(s.udp, &query(6, "short.example.", RecordType::A)).await;
    assert_eq!(up.asked("short.example."), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = udp_query(s.udp, &query(7, "short.example.", RecordType::A)).await;
    assert_eq!(r.answers[0].ttl, 2, "a fresh answer");
    assert_eq!(up.asked("short.example."), 2);

    // NXDOMAIN is cached for the SOA's MINIMUM (2 s), with its SOA counting down.
    let r = udp_query(s.udp, &query(8, "gone.example.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    let r = udp_query(s.udp, &query(9, "Gone.Example.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(r.metadata.id, 9);
    assert!(r.authorities[0].ttl <= 60);
    assert_eq!(up.asked("gone.example."), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    udp_query(s.udp, &query(10, "gone.example.", RecordType::A)).await;
    assert_eq!(up.asked("gone.example."), 2);

    // SERVFAIL and TTL 0 are never cached.
    for id in 11..14 {
        let r = udp_query(s.udp, &query(id, "broken.example.", RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        let r = udp_query(s.udp, &query(id, "zero.example.", RecordType::A)).await;
        assert_eq!(r.answers[0].ttl, 0);
    }
    assert_eq!(up.asked("broken.example."), 3);
    assert_eq!(up.asked("zero.example."), 3);
    s.stop().await;

    // The same queries with the cache off all reach the upstream.
    let up = Counting::start().await;
    let s = with_upstream(&up, 0).await;
    for id in 0..3 {
        udp_query(s.udp, &query(id, "long.example.", RecordType::A)).await;
    }
    assert_eq!(up.asked("long.example."), 3);
    assert_eq!(s.metrics.cache_counts(), (0, 0, 0));
    s.stop().await;
}

#[tokio::test]
async fn identical_queries_in_flight_go_upstream_once() {
    let up = Counting::start().await;
    // Cache off: only coalescing can save the upstream the repeats.
    let s = with_upstream(&up, 0).await;
    let names = ["slow.example.", "SLOW.example.", "sLoW.eXaMpLe."];
    let asks = (0..9u16).map(|id| {
        let q = query(100 + id, names[usize::from(id) % 3], RecordType::A);
        let server = s.udp;
        tokio::spawn(async move { (q.clone(), udp_query(server, &q).await) })
    });
    for t in asks.collect::<Vec<_>>() {
        let (q, r) = t.await.expect("query");
        assert_eq!(r.metadata.id, q.metadata.id);
        assert_eq!(
            r.queries[0].name(),
            q.queries[0].name(),
            "the client's own case"
        );
        assert_eq!(a_records(&r), ["192.0.2.1"]);
    }
    assert_eq!(up.asked("slow.example."), 1);
    assert_eq!(s.metrics.coalesced_count(), 8);
    // Once it has landed, the next one goes upstream again (nothing cached).
    udp_query(s.udp, &query(1, "slow.example.", RecordType::A)).await;
    assert_eq!(up.asked("slow.example."), 2);
    s.stop().await;
}

#[tokio::test]
async fn a_cached_answer_is_truncated_for_a_small_udp_client() {
    let up = Counting::start().await;
    let s = with_upstream(&up, 100).await;
    let edns = |id: u16, payload: u16| {
        let mut q = query(id, "big.example.", RecordType::A);
        let mut e = Edns::new();
        e.set_max_payload(payload);
        q.set_edns(e);
        q
    };
    // Over TCP the whole answer comes back and is cached.
    let r = tcp_query(s.tcp, &edns(1, 1232)).await;
    assert_eq!(r.answers.len(), 40);
    // A UDP client that takes 512 bytes gets TC from the cache; one that takes 1232, all.
    let r = udp_query_within(s.udp, &edns(2, 512), 512).await;
    assert!(r.metadata.truncation);
    assert_eq!(r.metadata.id, 2);
    let r = udp_query(s.udp, &edns(3, 1232)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 40);
    assert_eq!(up.asked("big.example."), 1);
    assert_eq!(s.metrics.cache_counts().0, 2);
    s.stop().await;
}

#[tokio::test]
async fn dig_gets_cached_answers() {
    if !have_dig() {
        return;
    }
    let up = Counting::start().await;
    let s = with_upstream(&up, 100).await;
    // `name A` over TCP or UDP.
    let dig_a = |name: &'static str, tcp: bool| {
        let (port, over) = if tcp {
            (s.tcp.port(), "+tcp")
        } else {
            (s.udp.port(), "+notcp")
        };
        async move { dig(port, &["+noall", "+answer", "+comments", name, "A", over]).await }
    };
    // `name. TTL IN A addr` lines: (TTL, addr).
    let answers = |out: &str| -> Vec<(u32, String)> {
        out.lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1].parse().expect("a TTL"), f[4].to_string())
            })
            .collect()
    };
    let first = dig_a("long.example.", false).await;
    assert!(first.contains("status: NOERROR"), "{first}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = dig_a("long.example.", false).await;
    let third = dig_a("long.example.", true).await;
    let (a, b, c) = (answers(&first), answers(&second), answers(&third));
    assert_eq!(a, [(60, "192.0.2.1".to_string())], "{first}");
    assert_eq!(b.len(), 1, "{second}");
    assert!(b[0].0 < 60 && b[0].1 == "192.0.2.1", "{second}");
    assert!(c[0].0 <= b[0].0, "{third}");
    assert_eq!(up.asked("long.example."), 1);
    let nx = dig_a("gone.example.", false).await;
    let nx2 = dig_a("gone.example.", false).await;
    assert!(
        nx.contains("status: NXDOMAIN") && nx2.contains("status: NXDOMAIN"),
        "{nx2}"
    );
    assert_eq!(up.asked("gone.example."), 1);
    // dig sends a COOKIE; it is not passed on (nor cached for the next client).
    assert_eq!(up.asked("<EDNS options>"), 0);
    s.stop().await;
}
