//! How a node's DNS starts listening, in one call ([`listen`]): the listen addresses that are
//! not the host's yet go on the VIP link (kept there until shutdown), the UDP and TCP sockets
//! are bound (or taken as given), and the resolv.conf policy runs: point the host's
//! resolv.conf at l4lb (`--dns-manage-resolv-conf`), and without `--dns-upstream` forward to
//! the nameservers it listed. The start-up shell of the DNS: unlike the server core, it
//! touches files and uses `netif`.

use std::net::SocketAddr;
use std::path::PathBuf;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use super::DnsConfig;
use super::resolv::{self, ManagedResolvConf, ResolvConf, ResolvError};
use crate::agent::netif::{InterfaceKind, Netif, NetifError};

/// Where a node's DNS listens and where its upstreams come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    /// Addresses served over UDP and TCP (port 0: any free port).
    pub addrs: Vec<SocketAddr>,
    /// Without `DnsConfig::upstreams`, forward to this file's nameservers.
    pub resolv_conf: PathBuf,
    /// Point `resolv_conf` at the port-53 listen addresses while running.
    pub manage_resolv_conf: bool,
}

/// Why the DNS cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listing host addresses")]
    HostAddresses(#[source] NetifError),
    #[error("installing DNS listen addresses {addrs:?}")]
    Install {
        addrs: Vec<std::net::IpAddr>,
        #[source]
        source: NetifError,
    },
    #[error("cannot bind DNS on {proto} {addr}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--dns-manage-resolv-conf")]
    ManageResolvConf(#[source] ResolvError),
}

/// The DNS server's sockets: a UDP socket and a TCP listener per listen address, each pair on
/// the same address and port.
#[derive(Debug, Default)]
pub struct DnsSockets {
    pub udp: Vec<UdpSocket>,
    pub tcp: Vec<TcpListener>,
}

impl DnsSockets {
    /// Bind a UDP socket and a TCP listener on each of `addrs`.
    pub fn bind(addrs: &[SocketAddr]) -> Result<DnsSockets, ListenError> {
        let mut s = DnsSockets::default();
        for addr in addrs {
            let (u, t) = bind_pair(*addr)?;
            s.udp.push(u);
            s.tcp.push(t);
        }
        Ok(s)
    }

    /// The addresses the UDP sockets are bound to (a port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|u| u.local_addr().ok())
            .collect()
    }
}

/// The DNS, listening: its sockets, its settings with the upstreams filled in, and, when it
/// manages the host's resolv.conf, the guard that restores the file (also when dropped).
#[derive(Debug)]
pub struct Listening {
    pub sockets: DnsSockets,
    pub config: DnsConfig,
    pub resolv_conf: Option<ManagedResolvConf>,
}

/// Keep the listen addresses on `netif`, bind the sockets (unless `given` already bound),
/// then apply the resolv.conf policy to `dns`.
pub async fn listen(
    cfg: &ListenConfig,
    dns: &DnsConfig,
    netif: &mut Netif,
    given: Option<DnsSockets>,
) -> Result<Listening, ListenError> {
    keep_addresses(netif, &cfg.addrs).await?;
    let sockets = match given {
        Some(s) => s,
        None => DnsSockets::bind(&cfg.addrs)?,
    };
    let bound = sockets.local_addrs();
    for a in &bound {
        tracing::info!(addr = %a, "DNS listening");
    }
    let (resolv_conf, config) = resolv_policy(cfg, dns, &bound)?;
    Ok(Listening {
        sockets,
        config,
        resolv_conf,
    })
}

/// Install the DNS listen addresses that are not this host's yet (the DC/OS ones,
/// 198.51.100.1-3) on the VIP interface, kept there until shutdown, so they can be bound.
async fn keep_addresses(netif: &mut Netif, listen: &[SocketAddr]) -> Result<(), ListenError> {
    if netif.kind() == InterfaceKind::None {
        return Ok(());
    }
    let host = netif
        .host_addresses()
        .await
        .map_err(ListenError::HostAddresses)?;
    let addrs = super::addresses_to_install(listen, &host.own);
    if !addrs.is_empty() {
        if let Err(source) = netif.keep(&addrs).await {
            return Err(ListenError::Install { addrs, source });
        }
        tracing::info!(addrs = ?addrs, "DNS listen addresses installed on the VIP interface");
    }
    Ok(())
}

/// The resolv.conf policy: install the managed file (its guard restores the original), or
/// read the host's; `dns` gets the upstreams that follow (its own if it names any).
fn resolv_policy(
    cfg: &ListenConfig,
    dns: &DnsConfig,
    bound: &[SocketAddr],
) -> Result<(Option<ManagedResolvConf>, DnsConfig), ListenError> {
    let (managed, host) = if cfg.manage_resolv_conf {
        let (guard, original) = ManagedResolvConf::install(&cfg.resolv_conf, bound)
            .map_err(ListenError::ManageResolvConf)?;
        tracing::info!(path = %cfg.resolv_conf.display(), "resolv.conf points at l4lb");
        (Some(guard), Some(original))
    } else if dns.upstreams.is_empty() {
        match resolv::read_host(&cfg.resolv_conf) {
            Ok(c) => (None, Some(c)),
            Err(e) => {
                tracing::warn!(error = %e, "no upstreams from resolv.conf; names outside the zones get REFUSED");
                (None, None)
            }
        }
    } else {
        (None, None)
    };
    let mut dns = dns.clone();
    if let Some(conf) = host.filter(|_| dns.upstreams.is_empty()) {
        dns.upstreams = upstreams_of(&conf, bound);
        tracing::info!(path = %cfg.resolv_conf.display(), upstreams = ?dns.upstreams, "DNS upstreams from resolv.conf");
    }
    Ok((managed, dns))
}

/// The upstreams `conf` lists, never l4lb's own `listen` addresses.
fn upstreams_of(conf: &ResolvConf, listen: &[SocketAddr]) -> Vec<SocketAddr> {
    for bad in &conf.skipped {
        tracing::warn!(nameserver = %bad, "resolv.conf nameserver not used (not an address)");
    }
    resolv::upstreams(conf, listen)
}

/// UDP and TCP DNS sockets on the same address and port. With port 0 the UDP socket picks the
/// port and TCP follows; if TCP finds that port taken, try again with a new one.
fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), ListenError> {
    let bind_error = |proto, addr| {
        move |source| ListenError::Bind {
            proto,
            addr,
            source,
        }
    };
    let mut attempts = 0;
    loop {
        let u = socket(addr, Type::DGRAM)
            .and_then(|s| UdpSocket::from_std(s.into()))
            .map_err(bind_error("udp", addr))?;
        let port = u.local_addr().map(|a| a.port()).unwrap_or(addr.port());
        let tcp = SocketAddr::new(addr.ip(), port);
        match socket(tcp, Type::STREAM).and_then(|s| {
            s.listen(1024)?;
            TcpListener::from_std(s.into())
        }) {
            Ok(t) => return Ok((u, t)),
            Err(e) if addr.port() == 0 && attempts < 16 => {
                attempts += 1;
                tracing::debug!(port, error = %e, "DNS TCP port taken; picking another");
            }
            Err(e) => return Err(bind_error("tcp", addr)(e)),
        }
    }
}

/// A non-blocking socket bound to `addr`. An IPv6 one is IPv6 only, so `--dns-listen
/// 0.0.0.0:53 --dns-listen [::]:53` binds both instead of the second finding the port taken.
fn socket(addr: SocketAddr, ty: Type) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if ty == Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dns_binds_ipv4_and_ipv6_wildcards_on_one_port() {
        let (u4, t4) = bind_pair("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = u4.local_addr().unwrap().port();
        assert_eq!(t4.local_addr().unwrap().port(), port);
        match bind_pair(SocketAddr::new("::".parse().unwrap(), port)) {
            Ok((u6, t6)) => {
                assert_eq!(u6.local_addr().unwrap().port(), port);
                assert_eq!(t6.local_addr().unwrap().port(), port);
            }
            // No IPv6 on this host at all: nothing to check.
            Err(e) if std::net::UdpSocket::bind("[::1]:0").is_err() => {
                eprintln!("skipped, no IPv6: {e}");
            }
            Err(e) => panic!("IPv6 wildcard beside the IPv4 one: {e}"),
        }
    }

    #[tokio::test]
    async fn an_address_in_use_names_protocol_and_address() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = DnsSockets::bind(&[addr]).unwrap_err();
        assert!(
            matches!(err, ListenError::Bind { proto: "udp", addr: a, .. } if a == addr),
            "{err:?}"
        );
        assert_eq!(err.to_string(), format!("cannot bind DNS on udp {addr}"));
    }

    #[test]
    fn upstreams_come_from_the_flags_else_from_resolv_conf_minus_l4lb() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "nameserver 127.0.0.1\nnameserver 198.18.0.53\nnameserver dns.example\n",
        )
        .unwrap();
        let cfg = ListenConfig {
            addrs: vec!["127.0.0.1:53".parse().unwrap()],
            resolv_conf: path.clone(),
            manage_resolv_conf: false,
        };
        let bound = cfg.addrs.clone();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let (guard, dns) = resolv_policy(&cfg, &DnsConfig::default(), &bound).unwrap();
        assert!(guard.is_none());
        assert_eq!(
            dns.upstreams,
            [sa("198.18.0.53:53")],
            "l4lb itself left out"
        );
        let given = DnsConfig {
            upstreams: vec![sa("198.18.0.54:53")],
            ..DnsConfig::default()
        };
        let (_, dns) = resolv_policy(&cfg, &given, &bound).unwrap();
        assert_eq!(dns.upstreams, given.upstreams, "--dns-upstream wins");
        let missing = ListenConfig {
            resolv_conf: dir.path().join("none"),
            ..cfg.clone()
        };
        let (_, dns) = resolv_policy(&missing, &DnsConfig::default(), &bound).unwrap();
        assert!(
            dns.upstreams.is_empty(),
            "no file: no upstreams, not an error"
        );
    }

    #[test]
    fn a_managed_resolv_conf_points_at_l4lb_and_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        let original = "search example\nnameserver 198.18.0.53\n";
        std::fs::write(&path, original).unwrap();
        let cfg = ListenConfig {
            addrs: vec!["127.0.0.1:53".parse().unwrap()],
            resolv_conf: path.clone(),
            manage_resolv_conf: true,
        };
        let (guard, dns) = resolv_policy(&cfg, &DnsConfig::default(), &cfg.addrs).unwrap();
        assert_eq!(
            dns.upstreams,
            ["198.18.0.53:53".parse::<SocketAddr>().unwrap()]
        );
        let managed = std::fs::read_to_string(&path).unwrap();
        assert!(managed.contains("nameserver 127.0.0.1"), "{managed}");
        guard.expect("a guard").restore().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
    }
}
