//! Root tests of the VIP interface (`agent::netif`) in throw-away network namespaces: link
//! creation and reuse, address reconciliation, real TCP connects to the VIPs, and the error
//! paths. Each test passes with a note when not run as root.

use crate::common::netns;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use l4lb::agent::netif::{InterfaceKind, Netif, NetifError};
use netns::{NetNs, Switch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LINK: &str = "minuteman";

fn ips(s: &[&str]) -> BTreeSet<IpAddr> {
    s.iter().map(|a| a.parse().expect("test address")).collect()
}

/// `inet`/`inet6` addresses on `dev` as `addr/prefix`, link-local excluded.
fn addrs_on(ns: &NetNs, dev: &str) -> BTreeSet<String> {
    let out = ns.exec_ok(&["ip", "-o", "addr", "show", "dev", dev]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            let a = words.next()?;
            (!a.starts_with("fe80:")).then(|| a.to_string())
        })
        .collect()
}

fn set(s: &[&str]) -> BTreeSet<String> {
    s.iter().map(|a| a.to_string()).collect()
}

/// The kind `Auto` must pick in `ns`: dummy if the kernel can make one, else bridge.
fn expected_auto_kind(ns: &NetNs) -> InterfaceKind {
    if ns
        .exec(&["ip", "link", "add", "probe0", "type", "dummy"])
        .status
        .success()
    {
        ns.exec_ok(&["ip", "link", "del", "probe0"]);
        InterfaceKind::Dummy
    } else {
        InterfaceKind::Bridge
    }
}

/// Bind a listener on `ip`, connect to it and exchange a few bytes.
async fn tcp_roundtrip(ip: IpAddr) {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        s.write_all(&buf).await.expect("write");
    });
    // An IPv6 address's local route is installed by the kernel's addrconf work queue, even
    // with NODAD; right after other tests deleted many namespaces (rtnl busy) that can lag by
    // a moment, and a connect meanwhile fails "no route to host". Retry within a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => break c,
            Ok(Err(e))
                if e.raw_os_error() == Some(libc::EHOSTUNREACH)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Err(e)) => panic!("connect {addr}: {e}"),
            Err(_) => panic!("connect {addr}: timeout"),
        }
    };
    c.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");
    server.await.expect("server task");
}

#[test]
fn auto_creates_link_and_vips_accept_tcp() {
    skip_unless_root!();
    let ns = NetNs::new("netif");
    let expected = expected_auto_kind(&ns);
    let (kind, added, removed) = ns.run(|| async {
        let netif = Netif::open(LINK, InterfaceKind::Auto).await.expect("open");
        let (added, removed) = netif
            .sync(&ips(&["198.18.5.1", "198.18.5.2", "2001:2::5"]))
            .await
            .expect("sync");
        // Usable at once: IPv6 included (no DAD wait on a carrier-less bridge).
        for ip in ["198.18.5.1", "198.18.5.2", "2001:2::5"] {
            tcp_roundtrip(ip.parse().expect("ip")).await;
        }
        (netif.kind(), added, removed)
    });
    assert_eq!(kind, expected);
    assert_eq!(
        added,
        ips(&["198.18.5.1", "198.18.5.2", "2001:2::5"])
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert!(removed.is_empty());
    assert_eq!(
        addrs_on(&ns, LINK),
        set(&["198.18.5.1/32", "198.18.5.2/32", "2001:2::5/128"])
    );
    let link = ns.exec_ok(&["ip", "-o", "-d", "link", "show", "dev", LINK]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains(",UP"), "link not up: {link}");
}

#[test]
fn sync_removes_leftovers_and_clear_empties() {
    skip_unless_root!();
    let ns = NetNs::new("netif");
    ns.run(|| async {
        let netif = Netif::open(LINK, InterfaceKind::Auto).await.expect("open");
        netif.sync(&ips(&["198.18.6.1"])).await.expect("sync");
    });
    // A previous run's left-overs, one of them a wanted VIP with the wrong prefix.
    ns.exec_ok(&["ip", "addr", "add", "198.18.6.9/32", "dev", LINK]);
    ns.exec_ok(&["ip", "addr", "add", "198.18.6.2/24", "dev", LINK]);
    ns.exec_ok(&["ip", "addr", "add", "2001:2::9/128", "dev", LINK, "nodad"]);

    let (added, removed) = ns.run(|| async {
        // A second open reuses the link.
        let netif = Netif::open(LINK, InterfaceKind::Auto)
            .await
            .expect("reopen");
        let res = netif
            .sync(&ips(&["198.18.6.1", "198.18.6.2"]))
            .await
            .expect("sync");
        tcp_roundtrip("198.18.6.2".parse().expect("ip")).await;
        // Idempotent.
        let again = netif
            .sync(&ips(&["198.18.6.1", "198.18.6.2"]))
            .await
            .expect("sync again");
        assert_eq!(again, (vec![], vec![]));
        res
    });
    assert_eq!(added, vec!["198.18.6.2".parse::<IpAddr>().expect("ip")]);
    assert_eq!(
        removed.into_iter().collect::<BTreeSet<_>>(),
        ips(&["198.18.6.2", "198.18.6.9", "2001:2::9"])
    );
    assert_eq!(
        addrs_on(&ns, LINK),
        set(&["198.18.6.1/32", "198.18.6.2/32"])
    );
    let links = ns.exec_ok(&["ip", "-o", "link", "show"]);
    let n = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter(|l| l.contains(&format!(" {LINK}:")))
        .count();
    assert_eq!(n, 1, "exactly one {LINK} link");

    ns.run(|| async {
        let netif = Netif::open(LINK, InterfaceKind::Auto)
            .await
            .expect("reopen");
        netif
            .add(
                &ips(&["198.18.6.3", "2001:2::3"])
                    .into_iter()
                    .collect::<Vec<_>>(),
            )
            .await
            .expect("add");
        // Adding what exists and removing what is gone are fine.
        let one = |ip: &str| [ip.parse::<IpAddr>().expect("ip")];
        netif.add(&one("198.18.6.3")).await.expect("add again");
        for what in ["remove", "remove again"] {
            netif.remove(&one("198.18.6.1")).await.expect(what);
        }
    });
    assert_eq!(
        addrs_on(&ns, LINK),
        set(&["198.18.6.2/32", "198.18.6.3/32", "2001:2::3/128"])
    );

    ns.run(|| async {
        let netif = Netif::open(LINK, InterfaceKind::Auto)
            .await
            .expect("reopen");
        netif.clear().await.expect("clear");
    });
    assert!(addrs_on(&ns, LINK).is_empty());
    // The link stays.
    ns.exec_ok(&["ip", "link", "show", "dev", LINK]);
}

#[test]
fn kept_addresses_survive_sync_and_go_on_clear() {
    skip_unless_root!();
    let kept = ["198.51.100.1".parse::<IpAddr>().expect("ip")];
    let ns = NetNs::new("netifkeep");
    ns.run(move || async move {
        let mut netif = Netif::open(LINK, InterfaceKind::Auto).await.expect("open");
        // The DC/OS DNS addresses: installed at once and bindable on port 53.
        netif.keep(&kept).await.expect("keep");
        let sock = tokio::net::UdpSocket::bind("198.51.100.1:53")
            .await
            .expect("bind the kept address");
        drop(sock);
        let (added, removed) = netif.sync(&ips(&["198.18.6.1"])).await.expect("sync");
        assert_eq!(added, vec!["198.18.6.1".parse::<IpAddr>().expect("ip")]);
        assert!(removed.is_empty(), "{removed:?}");
        let (_, removed) = netif.sync(&BTreeSet::new()).await.expect("sync");
        assert_eq!(removed, vec!["198.18.6.1".parse::<IpAddr>().expect("ip")]);
    });
    assert_eq!(addrs_on(&ns, LINK), set(&["198.51.100.1/32"]));
    ns.run(move || async move {
        let mut netif = Netif::open(LINK, InterfaceKind::Auto).await.expect("open");
        netif.keep(&kept).await.expect("keep");
        netif.clear().await.expect("clear");
    });
    assert!(addrs_on(&ns, LINK).is_empty());
}

#[test]
fn ipv6_disabled_is_reported_and_does_not_block_ipv4() {
    skip_unless_root!();
    let ns = NetNs::new("netif");
    ns.run(|| async {
        Netif::open(LINK, InterfaceKind::Auto).await.expect("open");
    });
    ns.exec_ok(&[
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{LINK}.disable_ipv6=1"),
    ]);
    ns.run(|| async {
        let netif = Netif::open(LINK, InterfaceKind::Auto)
            .await
            .expect("reopen");
        match netif.sync(&ips(&["198.18.9.1", "2001:2::9"])).await {
            Err(e @ NetifError::Ipv6Disabled { .. }) => {
                assert!(!e.to_string().contains("CAP_NET_ADMIN"), "{e}");
            }
            other => panic!("expected Ipv6Disabled, got {other:?}"),
        }
        // The IPv4 VIP went in regardless.
        tcp_roundtrip("198.18.9.1".parse().expect("ip")).await;
    });
    assert_eq!(addrs_on(&ns, LINK), set(&["198.18.9.1/32"]));
}

#[test]
fn host_addresses_exclude_the_vip_link() {
    skip_unless_root!();
    let ns = NetNs::new("netif");
    ns.exec_ok(&["ip", "addr", "add", "198.18.8.8/32", "dev", "lo"]);
    let (host, all) = ns.run(|| async {
        let netif = Netif::open(LINK, InterfaceKind::Auto).await.expect("open");
        netif.sync(&ips(&["198.18.8.1"])).await.expect("sync");
        let host = netif.host_addresses().await.expect("host addresses");
        let none = Netif::open(LINK, InterfaceKind::None)
            .await
            .expect("open none");
        assert_eq!(none.kind(), InterfaceKind::None);
        // None installs nothing.
        assert_eq!(
            none.sync(&ips(&["198.18.8.2"])).await.expect("sync"),
            (vec![], vec![])
        );
        none.clear().await.expect("clear");
        (host, none.host_addresses().await.expect("all addresses"))
    });
    for ip in ["127.0.0.1", "::1", "198.18.8.8"] {
        let ip: IpAddr = ip.parse().expect("ip");
        assert!(host.contains(&ip), "{ip} missing from {host:?}");
        assert!(all.contains(&ip), "{ip} missing from {all:?}");
    }
    let vip: IpAddr = "198.18.8.1".parse().expect("ip");
    assert!(!host.contains(&vip), "VIP link counted as host: {host:?}");
    assert!(
        all.contains(&vip),
        "None must report every address: {all:?}"
    );
    assert_eq!(addrs_on(&ns, LINK), set(&["198.18.8.1/32"]));
}

#[test]
fn refuses_links_it_must_not_manage() {
    skip_unless_root!();
    let ns = NetNs::new("netif");
    let dummy_works = expected_auto_kind(&ns) == InterfaceKind::Dummy;
    ns.exec_ok(&[
        "ip", "link", "add", "vip0", "type", "veth", "peer", "name", "vip1",
    ]);
    ns.exec_ok(&["ip", "link", "add", "brp", "type", "bridge"]);
    ns.exec_ok(&["ip", "link", "set", "vip1", "master", "brp"]);
    ns.exec_ok(&["ip", "link", "add", "brq", "type", "bridge"]);
    ns.run(move || async move {
        for name in ["vip0", "brp"] {
            match Netif::open(name, InterfaceKind::Auto).await {
                Err(NetifError::Unsuitable { .. }) => {}
                other => panic!("{name}: expected Unsuitable, got {other:?}"),
            }
        }
        // An explicit kind must match an existing link.
        match Netif::open("brq", InterfaceKind::Dummy).await {
            Err(NetifError::Unsuitable { .. }) => {}
            other => panic!("brq as dummy: expected Unsuitable, got {other:?}"),
        }
        let brq = Netif::open("brq", InterfaceKind::Bridge)
            .await
            .expect("brq");
        assert_eq!(brq.kind(), InterfaceKind::Bridge);
        let explicit = Netif::open("vipd", InterfaceKind::Dummy).await;
        if dummy_works {
            assert_eq!(explicit.expect("dummy").kind(), InterfaceKind::Dummy);
        } else {
            match explicit {
                Err(NetifError::Unsupported(InterfaceKind::Dummy)) => {}
                other => panic!("expected Unsupported(Dummy), got {other:?}"),
            }
        }
    });
}

/// Child half of [`permission_denied_without_cap_net_admin`]: does nothing unless started by
/// it (with the environment variable set, inside capsh without CAP_NET_ADMIN).
#[test]
fn permission_denied_child() {
    if std::env::var_os("L4LB_NETIF_EPERM_CHILD").is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(Netif::open(LINK, InterfaceKind::Auto)) {
        Err(e @ NetifError::PermissionDenied { .. }) => {
            assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
}

#[test]
fn permission_denied_without_cap_net_admin() {
    skip_unless_root!();
    let has_capsh = std::process::Command::new("capsh")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_capsh {
        eprintln!("note: skipping: capsh not installed");
        return;
    }
    let ns = NetNs::new("netif");
    let exe = std::env::current_exe().expect("test binary");
    let out = ns
        .command("capsh")
        .args(["--drop=cap_net_admin", "--", "-c", "exec \"$0\" \"$@\""])
        .arg(&exe)
        .args([
            "--exact",
            "netif::permission_denied_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("L4LB_NETIF_EPERM_CHILD", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run capsh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was created.
    assert!(
        !ns.exec(&["ip", "link", "show", "dev", LINK])
            .status
            .success()
    );
}

#[test]
fn switch_joins_hosts_and_netns_cleans_up() {
    skip_unless_root!();
    let name;
    {
        let sw = Switch::new("sw");
        let a = NetNs::new("a");
        let b = NetNs::new("b");
        sw.attach(&a, "198.18.0.2/15");
        sw.attach(&b, "198.18.0.3/15");
        name = a.name().to_string();
        let sleeper = a.spawn(a.command("sleep").arg("600")).expect("spawn sleep");
        let pid = sleeper.id();
        std::thread::scope(|s| {
            let server = s.spawn(|| {
                b.run(|| async {
                    let l = TcpListener::bind("198.18.0.3:7000").await.expect("bind");
                    let (mut c, peer) = l.accept().await.expect("accept");
                    c.write_all(b"hi").await.expect("write");
                    peer.ip()
                })
            });
            let got = a.run(|| async {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                loop {
                    match TcpStream::connect("198.18.0.3:7000").await {
                        Ok(mut c) => {
                            let mut buf = [0u8; 2];
                            c.read_exact(&mut buf).await.expect("read");
                            return buf;
                        }
                        Err(e) if tokio::time::Instant::now() < deadline => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("connect through the switch: {e}"),
                    }
                }
            });
            assert_eq!(&got, b"hi");
            let peer = server.join().expect("server thread");
            assert_eq!(peer, "198.18.0.2".parse::<IpAddr>().expect("ip"));
        });
        drop(a);
        // The spawned process is killed with its namespace.
        let mut sleeper = sleeper;
        let status = sleeper.wait().expect("wait");
        assert!(!status.success(), "sleep should have been killed");
        assert!(!std::path::Path::new(&format!("/proc/{pid}/ns")).exists());
    }
    let list = netns::run_ok(&["ip", "netns", "list"]);
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&name),
        "namespace {name} left behind"
    );
}
