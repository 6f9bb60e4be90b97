//! Byte layouts of the BPF maps' keys and values, mirrored field by field from the structs in
//! `progs/l4lb.bpf.c` (a test checks every size and offset against the compiled object's BTF).
//! Plain byte arrays (already `Pod` for aya), so no `unsafe` is needed.
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
/// `struct nat_key`: socket cookie, backend address, port, pad.
pub(crate) type NatKey = [u8; 32];
/// `struct nat_val`: VIP address, port, pad.
pub(crate) type NatVal = [u8; 20];
/// `struct destroy_key`: the VIP (`struct svc_key`), backend address, port, pad.
pub(crate) type DestroyKey = [u8; 40];

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

pub(crate) fn destroy_key(vip: &VipKey, backend: SocketAddr) -> DestroyKey {
    let mut b = [0u8; 40];
    b[..20].copy_from_slice(&svc_key(vip));
    b[20..36].copy_from_slice(&ip16(backend.ip()));
    b[36..38].copy_from_slice(&backend.port().to_be_bytes());
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
    use crate::agent::bpf::object;

    type Structs = std::collections::BTreeMap<String, (usize, Vec<(String, usize)>)>;

    /// `(size, [(field, byte offset)])` of every struct of a compiled object's BTF.
    fn btf_structs(obj: &[u8]) -> Structs {
        let btf = object::section(obj, ".BTF").unwrap();
        object::btf_types(btf, |kind, _| kind == object::KIND_STRUCT)
            .unwrap()
            .into_iter()
            .map(|t| {
                let fields = t
                    .members
                    .iter()
                    .map(|m| (m.name.clone(), m.bit_offset as usize / 8))
                    .collect();
                (t.name, (t.size as usize, fields))
            })
            .collect()
    }

    /// Where `field` of `st` starts, per the object.
    fn at(structs: &Structs, st: &str, field: &str) -> usize {
        let (_, fields) = &structs[st];
        fields
            .iter()
            .find(|(n, _)| n == field)
            .unwrap_or_else(|| panic!("struct {st} has no {field}"))
            .1
    }

    #[test]
    fn layouts_match_the_objects_btf() {
        let [progs, sockets] = super::super::loader::objects();
        let mut s = btf_structs(progs);
        let shared = btf_structs(sockets);
        // The iterators read the programs' revnat: the same layouts in both objects.
        for st in ["svc_key", "nat_key", "nat_val"] {
            assert_eq!(
                s.get(st),
                shared.get(st),
                "struct {st} differs between the objects"
            );
        }
        s.extend(shared);
        let sizes = [
            ("svc_key", size_of::<SvcKey>()),
            ("svc_val", size_of::<SvcVal>()),
            ("be_key", size_of::<BeKey>()),
            ("be_val", size_of::<BeVal>()),
            ("counters", size_of::<Counters>()),
            ("nat_key", size_of::<NatKey>()),
            ("nat_val", size_of::<NatVal>()),
            ("destroy_key", size_of::<DestroyKey>()),
        ];
        for (name, size) in sizes {
            assert_eq!(
                s.get(name).map(|t| t.0),
                Some(size),
                "size of struct {name}"
            );
        }
        let k = VipKey {
            ip: "198.18.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let key = svc_key(&k);
        let ip = at(&s, "svc_key", "ip");
        assert_eq!(&key[ip..ip + 16], &ip16(k.ip));
        let port = at(&s, "svc_key", "port");
        assert_eq!(&key[port..port + 2], &80u16.to_be_bytes());
        assert_eq!(key[at(&s, "svc_key", "proto")], 6);
        let k6 = VipKey {
            ip: "fd01:c::5".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(svc_key(&k6)[at(&s, "svc_key", "proto")], 17);

        let v = svc_val(3, 9);
        let count = at(&s, "svc_val", "count");
        assert_eq!(&v[count..count + 4], &3u32.to_ne_bytes());
        let set = at(&s, "svc_val", "set");
        assert_eq!(&v[set..set + 4], &9u32.to_ne_bytes());
        let bk = be_key(4, 5);
        let (set, slot) = (at(&s, "be_key", "set"), at(&s, "be_key", "slot"));
        assert_eq!(&bk[set..set + 4], &4u32.to_ne_bytes());
        assert_eq!(&bk[slot..slot + 4], &5u32.to_ne_bytes());

        for addr in ["198.18.1.2:31001", "[fd01:c::9]:8080"] {
            let a: SocketAddr = addr.parse().unwrap();
            let bv = be_val(a, 77);
            assert_eq!(parse_be_val(&bv), (a, 77));
            let ip = at(&s, "be_val", "ip");
            assert_eq!(&bv[ip..ip + 16], &ip16(a.ip()));
            let port = at(&s, "be_val", "port");
            assert_eq!(&bv[port..port + 2], &a.port().to_be_bytes());
            let counter = at(&s, "be_val", "counter");
            assert_eq!(&bv[counter..counter + 4], &77u32.to_ne_bytes());

            let dk = destroy_key(&k, a);
            let vip = at(&s, "destroy_key", "vip");
            assert_eq!(&dk[vip..vip + 20], &key);
            let ip = at(&s, "destroy_key", "ip");
            assert_eq!(&dk[ip..ip + 16], &ip16(a.ip()));
            let port = at(&s, "destroy_key", "port");
            assert_eq!(&dk[port..port + 2], &a.port().to_be_bytes());
        }

        let mut c = [0u8; 16];
        c[at(&s, "counters", "conns")..][..8].copy_from_slice(&5u64.to_ne_bytes());
        c[at(&s, "counters", "datagrams")..][..8].copy_from_slice(&9u64.to_ne_bytes());
        assert_eq!(parse_counters(&c), (5, 9));
        // The takeover copies reverse entries as bytes: only their sizes matter, checked above;
        // the cookie leads the key, as the programs build it.
        assert_eq!(at(&s, "nat_key", "cookie"), 0);
    }
}
