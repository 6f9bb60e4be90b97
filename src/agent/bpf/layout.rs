//! Byte layouts of the BPF maps' keys and values, mirrored field by field from the structs in
//! `progs/l4lb.bpf.c`. Plain byte arrays (already `Pod` for aya), so no `unsafe` is needed.
//! Addresses and ports are in network order; counts, ids and counters in host order.

use std::net::{IpAddr, SocketAddr};

use crate::model::{Protocol, VipKey};

/// `struct svc_key`: address (IPv4 as `::ffff:a.b.c.d`), port, protocol, pad.
pub(crate) type SvcKey = [u8; 20];
/// `struct svc_val`: backend count, set id.
pub(crate) type SvcVal = [u8; 8];
/// `struct be_key`: set id, slot.
pub(crate) type BeKey = [u8; 8];
/// `struct be_val`: address, port, pad, counter index.
pub(crate) type BeVal = [u8; 24];
/// `struct counters`: connections, datagrams.
pub(crate) type Counters = [u8; 16];

/// Sixteen address bytes as the programs see them (IPv4 mapped into IPv6).
fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

pub(crate) fn svc_key(k: &VipKey) -> SvcKey {
    let mut b = [0u8; 20];
    b[..16].copy_from_slice(&ip16(k.ip));
    b[16..18].copy_from_slice(&k.port.to_be_bytes());
    b[18] = proto_number(k.protocol);
    b
}

pub(crate) fn svc_val(count: u32, set: u32) -> SvcVal {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&count.to_ne_bytes());
    b[4..].copy_from_slice(&set.to_ne_bytes());
    b
}

pub(crate) fn be_key(set: u32, slot: u32) -> BeKey {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&set.to_ne_bytes());
    b[4..].copy_from_slice(&slot.to_ne_bytes());
    b
}

pub(crate) fn be_val(addr: SocketAddr, counter: u32) -> BeVal {
    let mut b = [0u8; 24];
    b[..16].copy_from_slice(&ip16(addr.ip()));
    b[16..18].copy_from_slice(&addr.port().to_be_bytes());
    b[20..].copy_from_slice(&counter.to_ne_bytes());
    b
}

/// Decode `struct be_val`.
#[cfg(test)]
pub(crate) fn parse_be_val(b: &BeVal) -> (SocketAddr, u32) {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    let ip = std::net::Ipv6Addr::from(ip);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    let port = u16::from_be_bytes([b[16], b[17]]);
    let counter = u32::from_ne_bytes([b[20], b[21], b[22], b[23]]);
    (SocketAddr::new(ip, port), counter)
}

/// Decode `struct counters`: (connections, datagrams).
pub(crate) fn parse_counters(b: &Counters) -> (u64, u64) {
    let mut c = [0u8; 8];
    c.copy_from_slice(&b[..8]);
    let conns = u64::from_ne_bytes(c);
    c.copy_from_slice(&b[8..]);
    (conns, u64::from_ne_bytes(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_structs() {
        let k = VipKey {
            ip: "198.18.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let key = svc_key(&k);
        assert_eq!(
            &key[..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1]
        );
        assert_eq!(&key[16..], &[0, 80, 6, 0]);
        let k6 = VipKey {
            ip: "fd01:c::5".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        let key6 = svc_key(&k6);
        assert_eq!(key6[0], 0xfd);
        assert_eq!(&key6[16..], &[0, 53, 17, 0]);
        for addr in ["198.18.1.2:31001", "[fd01:c::9]:8080"] {
            let a: SocketAddr = addr.parse().unwrap();
            assert_eq!(parse_be_val(&be_val(a, 77)), (a, 77));
        }
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&5u64.to_ne_bytes());
        c[8..].copy_from_slice(&9u64.to_ne_bytes());
        assert_eq!(parse_counters(&c), (5, 9));
    }
}
