use super::*;

use std::io::{Read, Write};
use std::os::fd::AsFd;

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

#[test]
fn names_round_trip_and_garbage_is_refused() {
    for s in [
        "dns-udp 198.51.100.1:53",
        "dns-tcp [::1]:53",
        "api 127.0.0.1:62080",
        "tcp 198.18.5.5:80",
        "udp 198.18.5.5:53",
        "lock /run/l4lb/minuteman.4026531840.lock",
    ] {
        assert_eq!(name(s).to_string(), s);
    }
    for bad in ["", "tcp", "tcp nowhere", "sctp 1.2.3.4:5", "udp 1.2.3.4"] {
        assert!(bad.parse::<Name>().is_err(), "{bad:?} accepted");
    }
}

/// A listener in a fresh directory, and its path.
fn listener() -> (tempfile::TempDir, Listener) {
    let dir = tempfile::tempdir().unwrap();
    let l = Listener::bind(&dir.path().join("vip.1.handoff.sock")).unwrap();
    (dir, l)
}

#[tokio::test]
async fn a_successor_gets_every_socket_serves_from_it_and_the_old_one_learns_its_pid() {
    let (_dir, l) = listener();
    let mode = std::fs::metadata(l.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only root (or our user) may connect");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (ta, ua) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
    let lock = tempfile::NamedTempFile::new().unwrap();
    let old = Sockets::default();
    old.offer(Name::socket(Kind::Tcp, ta), tcp.as_fd());
    old.offer(Name::socket(Kind::DnsUdp, ua), udp.as_fd());
    let lock_name = Name {
        kind: Kind::Lock,
        at: lock.path().display().to_string(),
    };
    old.offer(lock_name, lock.as_file().as_fd());
    let stop = CancellationToken::new();
    let mut prepared = 0;
    let path = l.path().to_path_buf();
    let (served, taken) = tokio::join!(l.serve(&old, || prepared += 1, &stop), async {
        let (inherited, successor) = take_over(&path).await.unwrap();
        assert_eq!(successor.predecessor, std::process::id());
        assert_eq!(inherited.unclaimed(), 3);
        // The wrong kind or address takes nothing.
        assert!(inherited.take_tcp(Kind::Api, ta).is_none());
        let t = inherited.take_tcp(Kind::Tcp, ta).expect("the TCP listener");
        // Port 0 takes the predecessor's pick.
        let want = SocketAddr::new(ua.ip(), 0);
        let u = inherited
            .take_udp(Kind::DnsUdp, want)
            .expect("the DNS socket");
        assert!(inherited.take_lock(lock.path()).is_some());
        assert_eq!(inherited.unclaimed(), 0);
        successor.ready().await.unwrap();
        (t, u)
    });
    assert_eq!(served, Some(std::process::id()));
    assert_eq!(prepared, 1);
    let (t, u) = taken;
    // The very sockets: a connection made to the old listener is accepted by the new one.
    drop(tcp);
    let mut c = std::net::TcpStream::connect(ta).unwrap();
    t.set_nonblocking(false).unwrap();
    let (mut s, _) = t.accept().unwrap();
    c.write_all(b"hi").unwrap();
    let mut got = [0u8; 2];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
    drop(udp);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"q", ua).unwrap();
    u.set_nonblocking(false).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(u.recv_from(&mut buf).unwrap().0, 1);
}

#[tokio::test]
async fn more_sockets_than_one_message_carries_arrive_in_several() {
    let (_dir, l) = listener();
    let old = Sockets::default();
    let n = FDS_PER_MESSAGE + 10;
    let socks: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for s in &socks {
        old.offer(Name::socket(Kind::Udp, s.local_addr().unwrap()), s.as_fd());
    }
    let stop = CancellationToken::new();
    let path = l.path().to_path_buf();
    let (served, ()) = tokio::join!(l.serve(&old, || {}, &stop), async {
        let (inherited, successor) = take_over(&path).await.unwrap();
        assert_eq!(inherited.unclaimed(), n);
        for s in &socks {
            let a = s.local_addr().unwrap();
            assert!(inherited.take_udp(Kind::Udp, a).is_some(), "{a}");
        }
        successor.ready().await.unwrap();
    });
    assert!(served.is_some());
}

#[tokio::test]
async fn a_withdrawn_socket_is_not_offered() {
    let (_dir, l) = listener();
    let old = Sockets::default();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let n = Name::socket(Kind::Tcp, tcp.local_addr().unwrap());
    old.offer(n.clone(), tcp.as_fd());
    old.withdraw(&n);
    let stop = CancellationToken::new();
    let path = l.path().to_path_buf();
    let (_, ()) = tokio::join!(l.serve(&old, || {}, &stop), async {
        let (inherited, successor) = take_over(&path).await.unwrap();
        assert_eq!(inherited.unclaimed(), 0);
        successor.ready().await.unwrap();
    });
}

#[tokio::test]
async fn a_successor_that_goes_away_leaves_the_old_agent_serving_the_next() {
    let (_dir, l) = listener();
    let old = Sockets::default();
    let stop = CancellationToken::new();
    let path = l.path().to_path_buf();
    let (served, ()) = tokio::join!(l.serve(&old, || {}, &stop), async {
        let (_, quitter) = take_over(&path).await.unwrap();
        quitter.refuse("cannot load the kernel path".into()).await;
        let (_, gone) = take_over(&path).await.unwrap();
        drop(gone);
        let (_, successor) = take_over(&path).await.unwrap();
        successor.ready().await.unwrap();
    });
    assert_eq!(served, Some(std::process::id()));
}

#[tokio::test]
async fn nobody_to_take_over_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = take_over(&dir.path().join("none.sock")).await.unwrap_err();
    assert!(matches!(e, HandoffError::NoPeer { .. }), "{e}");
    assert!(
        e.to_string().contains("no running agent to take over"),
        "{e}"
    );
}

/// A fake old agent that answers the first connection with `bytes`.
async fn fake_peer(bytes: Vec<u8>) -> HandoffError {
    let (_dir, l) = listener();
    let path = l.path().to_path_buf();
    let (_, r) = tokio::join!(
        async {
            let fd = l.accept().await.unwrap();
            rustix::net::send(&fd, &bytes, SendFlags::empty()).unwrap();
            // Kept open until the successor has read.
            tokio::time::sleep(Duration::from_millis(200)).await;
        },
        take_over(&path)
    );
    r.unwrap_err()
}

#[tokio::test]
async fn a_bad_peer_is_named_clearly() {
    let e =
        fake_peer(br#"{"msg":"offer","version":9,"pid":1,"names":[],"last":true}"#.to_vec()).await;
    assert!(matches!(e, HandoffError::Version(9)), "{e}");
    let e = fake_peer(b"GET / HTTP/1.1\r\n".to_vec()).await;
    assert!(e.to_string().contains("not a hand-over message"), "{e}");
    let e = fake_peer(vec![b' '; MAX_MESSAGE + 1]).await;
    assert!(e.to_string().contains("over 65536 bytes"), "{e}");
    // Names without their descriptors.
    let e = fake_peer(
        br#"{"msg":"offer","version":1,"pid":1,"names":["tcp 127.0.0.1:1"],"last":true}"#.to_vec(),
    )
    .await;
    assert!(e.to_string().contains("1 names for 0 descriptors"), "{e}");
    let e = fake_peer(br#"{"msg":"refused","version":1,"reason":"busy"}"#.to_vec()).await;
    assert!(matches!(e, HandoffError::Refused(r) if r == "busy"));
}

#[tokio::test]
async fn a_socket_that_is_not_what_its_name_says_is_not_used() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = tcp.local_addr().unwrap();
    // Named UDP, but a TCP listener.
    let s = Sockets::inherited(vec![(Name::socket(Kind::Udp, a), tcp.into())]);
    assert!(s.take_udp(Kind::Udp, a).is_none());
    assert_eq!(s.unclaimed(), 0);
}

#[tokio::test]
async fn the_socket_file_is_left_to_a_successor_that_bound_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vip.1.handoff.sock");
    let old = Listener::bind(&path).unwrap();
    let new = Listener::bind(&path).unwrap();
    drop(old);
    assert!(path.exists(), "the successor's socket stays");
    drop(new);
    assert!(!path.exists());
}
