//! The records a DNS snapshot is made of, and the keys and limits every part of the DNS
//! shares: what lives at a name ([`Node`], [`SrvTarget`]), how a name becomes a lookup key,
//! the TTLs of the apex, the UDP payload limits. Pure data; depends on no other DNS module,
//! so that `catalog` (which builds snapshots), `tasks`, `fast` and `answer` (which read
//! them) all point down to it and never at each other in a circle.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;

/// Largest UDP payload we advertise and send (DNS Flag Day 2020: no IP fragmentation).
pub(crate) const MAX_UDP_PAYLOAD: u16 = 1232;
/// Without EDNS0 a UDP response may be at most this long (RFC 1035).
pub(crate) const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// An SRV target: one port of one named VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SrvTarget {
    pub(crate) port: u16,
    /// The VIP name relative to the zone (`web.marathon`), not fully qualified.
    pub(crate) host: Name,
    pub(crate) v4: Box<[Ipv4Addr]>,
    pub(crate) v6: Box<[Ipv6Addr]>,
}

/// What lives at a name inside a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// The zone apex: SOA and NS.
    Apex,
    /// A named VIP: its addresses (sorted, unique). Boxed slices, not `Vec`s: one of these
    /// per task (its SRV target's name) and per SRV target, 16 bytes less each.
    Host {
        v4: Box<[Ipv4Addr]>,
        v6: Box<[Ipv6Addr]>,
    },
    /// `_<label>._<proto>.<framework>`: one target per port.
    Srv(Vec<SrvTarget>),
    /// An empty non-terminal (`marathon`, `_tcp.marathon`): exists, holds no records.
    Empty,
}

/// The wire-style key of a relative name: each label as a length byte then its lowercase bytes.
/// Unambiguous even for labels holding dots or binary.
pub(crate) fn key_of<'a>(labels: impl Iterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
    out.clear();
    for label in labels {
        out.push(label.len() as u8);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
}

/// The key of `ns` in the zones of `group`: the nameserver name of every zone.
pub(crate) fn ns_key(group: u8) -> [u8; 4] {
    [group, 2, b'n', b's']
}
/// TTL of the zone's NS record (as dcos-net and minuteman: the nameserver set never changes).
pub(crate) const NS_TTL: u32 = 3600;
/// The SOA minimum, the negative-caching TTL (RFC 2308): 1 s as dcos-net and minuteman, so a
/// name looked up just before its app starts is not hidden behind a cached NXDOMAIN.
pub(crate) const NEGATIVE_TTL: u32 = 1;

/// Addresses split by family, in the order given (callers give them sorted and unique).
pub(crate) fn split<'a>(
    ips: impl IntoIterator<Item = &'a IpAddr>,
) -> (Box<[Ipv4Addr]>, Box<[Ipv6Addr]>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in ips {
        match ip {
            IpAddr::V4(a) => v4.push(*a),
            IpAddr::V6(a) => v6.push(*a),
        }
    }
    (v4.into(), v6.into())
}
