//! The UDP fast path: answers pre-encoded at publish time for the common positive queries (A,
//! AAAA, SRV of a live name, under every zone alias), keyed by the lowercase wire query name
//! and type. A query is answered here only if it is exactly the plain shape the answers were
//! built for (one question, class IN, opcode QUERY, no EDNS or a bare version-0 OPT, nothing
//! trailing); anything else returns `None` and goes to the hickory path in `answer`, which
//! stays the reference. No heap allocation per query. Depends on hickory-proto only for the
//! names it encodes at build time.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::records::{CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD, Node, SrvTarget};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// Longest wire name (RFC 1035 §3.1), root byte included.
const MAX_NAME: usize = 255;
/// The OPT record we append: root owner, type OPT, our payload size, version 0, no flags,
/// no options (what `answer::response_to` builds).
const OPT_RR: [u8; 11] = {
    let p = MAX_UDP_PAYLOAD.to_be_bytes();
    [0, 0, 41, p[0], p[1], 0, 0, 0, 0, 0, 0]
};

/// One pre-encoded response for the lowercase query name with id 0, RD/CD/RA clear and no OPT.
/// Names other than the question (SRV targets) are in their canonical, lowercase spelling.
/// Once in the table, the question name is cut out of `bytes` (the key holds it, and every
/// answer copies the client's spelling in anyway): 80 bytes less for each of 80,000 task names.
#[derive(Debug)]
pub(crate) struct Prepared {
    bytes: Box<[u8]>,
    /// Metrics slot of the query type.
    type_idx: u8,
}

/// The pre-encoded answers of one snapshot. Key: lowercase wire name (root byte included)
/// followed by the query type, big-endian.
#[derive(Debug, Default)]
pub(crate) struct FastTable {
    map: HashMap<Box<[u8]>, Prepared>,
}

/// What the fast path produced: the response length in `out` and the metrics type slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answered {
    pub(crate) len: usize,
    pub(crate) type_idx: u8,
}

impl FastTable {
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Pre-encode the answers of `node` (relative key `rel`, length-prefixed lowercase labels)
    /// under the zone whose lowercase apex labels are `apex`.
    pub(crate) fn add(&mut self, rel: &[u8], apex: &[Box<[u8]>], ttl: u32, node: &Node) {
        let mut qname = rel.to_vec();
        for label in apex {
            qname.push(label.len() as u8);
            qname.extend_from_slice(label);
        }
        qname.push(0);
        if qname.len() > MAX_NAME {
            return;
        }
        let mut put = |qtype: u16, prepared: Option<Prepared>| {
            if let Some(p) = prepared.filter(|p| {
                p.bytes.len() <= MAX_UDP_PAYLOAD as usize
                    && p.bytes.get(12..12 + qname.len()) == Some(&qname[..])
            }) {
                let mut key = Vec::with_capacity(qname.len() + 2);
                key.extend_from_slice(&qname);
                key.extend_from_slice(&qtype.to_be_bytes());
                let mut bytes = p.bytes.into_vec();
                bytes.drain(12..12 + qname.len());
                let p = Prepared {
                    bytes: bytes.into(),
                    type_idx: p.type_idx,
                };
                self.map.insert(key.into(), p);
            }
        };
        match node {
            Node::Host { v4, v6 } => {
                if !v4.is_empty() {
                    put(
                        TYPE_A,
                        Some(addresses(&qname, ttl, v4, &[], super::TYPE_A_IDX)),
                    );
                }
                if !v6.is_empty() {
                    put(
                        TYPE_AAAA,
                        Some(addresses(&qname, ttl, &[], v6, super::TYPE_AAAA_IDX)),
                    );
                }
            }
            Node::Srv(targets) if !targets.is_empty() => {
                put(TYPE_SRV, srv(&qname, apex, ttl, targets));
            }
            _ => {}
        }
    }

    /// Answer `query` into `out` if it is a plain query for a prepared answer that fits the
    /// UDP size limit. `ra`: recursion is available (upstreams configured).
    pub(crate) fn answer(&self, query: &[u8], ra: bool, out: &mut Vec<u8>) -> Option<Answered> {
        let header = query.get(..12)?;
        // QR=0, opcode QUERY; qdcount 1, ancount 0, nscount 0, arcount 0 or 1.
        if header[2] & 0xf8 != 0 || header[4..10] != [0, 1, 0, 0, 0, 0] || header[10] != 0 {
            return None;
        }
        let arcount = header[11];
        if arcount > 1 {
            return None;
        }
        // The question name, lowercased into `key`; no compression, no extended labels.
        let mut key = [0u8; MAX_NAME + 2];
        let mut pos = 12;
        loop {
            let len = *query.get(pos)? as usize;
            if len & 0xc0 != 0 || pos - 12 + len + 1 > MAX_NAME {
                return None;
            }
            let label = query.get(pos..pos + 1 + len)?;
            for (k, b) in key[pos - 12..].iter_mut().zip(label) {
                *k = b.to_ascii_lowercase();
            }
            pos += 1 + len;
            if len == 0 {
                break;
            }
        }
        let name_len = pos - 12;
        let tail = query.get(pos..pos + 4)?;
        if tail[2..4] != CLASS_IN.to_be_bytes() {
            return None;
        }
        key[name_len..name_len + 2].copy_from_slice(&tail[..2]);
        pos += 4;
        let limit = if arcount == 1 {
            // A bare OPT: root owner, version 0, no extended rcode, no options, nothing after.
            let opt = query.get(pos..)?;
            if opt.len() != 11
                || opt[0] != 0
                || opt[1..3] != TYPE_OPT.to_be_bytes()
                || opt[5..7] != [0, 0]
                || opt[9..11] != [0, 0]
            {
                return None;
            }
            u16::from_be_bytes([opt[3], opt[4]]).clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
        } else {
            if pos != query.len() {
                return None;
            }
            CLASSIC_UDP_PAYLOAD
        };
        let p = self.map.get(&key[..name_len + 2])?;
        let opt_len = if arcount == 1 { OPT_RR.len() } else { 0 };
        if p.bytes.len() + name_len + opt_len > limit as usize {
            return None;
        }
        out.clear();
        // The question as the client spelled it (answers own it through a pointer).
        out.extend_from_slice(&p.bytes[..12]);
        out.extend_from_slice(&query[12..12 + name_len]);
        out.extend_from_slice(&p.bytes[12..]);
        out[..2].copy_from_slice(&header[..2]);
        out[2] |= header[2] & 0x01; // RD
        out[3] |= (header[3] & 0x10) | if ra { 0x80 } else { 0 }; // CD, RA
        if arcount == 1 {
            out[11] += 1;
            out.extend_from_slice(&OPT_RR);
            // RFC 3225 §3: the DO bit is copied from the query's OPT.
            let last = out.len();
            out[last - 4] |= query[query.len() - 4] & 0x80;
        }
        Some(Answered {
            len: out.len(),
            type_idx: p.type_idx,
        })
    }
}

/// Header and question for `qname` (lowercase wire, root included) with these counts.
fn start(qname: &[u8], qtype: u16, ancount: usize, arcount: usize) -> Option<Vec<u8>> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&[0, 0, 0x84, 0, 0, 1]); // QR, AA; NOERROR; qdcount 1
    b.extend_from_slice(&u16::try_from(ancount).ok()?.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&u16::try_from(arcount).ok()?.to_be_bytes());
    b.extend_from_slice(qname);
    b.extend_from_slice(&qtype.to_be_bytes());
    b.extend_from_slice(&CLASS_IN.to_be_bytes());
    Some(b)
}

/// Owner (a name or a pointer), type, class, TTL, rdata length, rdata.
fn record(b: &mut Vec<u8>, owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) {
    b.extend_from_slice(owner);
    b.extend_from_slice(&rtype.to_be_bytes());
    b.extend_from_slice(&CLASS_IN.to_be_bytes());
    b.extend_from_slice(&ttl.to_be_bytes());
    b.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    b.extend_from_slice(rdata);
}

/// A compression pointer to `offset`.
fn pointer(offset: usize) -> Option<[u8; 2]> {
    let o = u16::try_from(offset).ok().filter(|o| *o < 0x4000)?;
    Some((0xc000 | o).to_be_bytes())
}

fn add_addresses(b: &mut Vec<u8>, owner: &[u8], ttl: u32, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) {
    for a in v4 {
        record(b, owner, TYPE_A, ttl, &a.octets());
    }
    for a in v6 {
        record(b, owner, TYPE_AAAA, ttl, &a.octets());
    }
}

/// A or AAAA answers owned by the question name (a pointer to it, so its case is echoed).
fn addresses(qname: &[u8], ttl: u32, v4: &[Ipv4Addr], v6: &[Ipv6Addr], type_idx: u8) -> Prepared {
    let qtype = if v4.is_empty() { TYPE_AAAA } else { TYPE_A };
    let mut b = start(qname, qtype, v4.len() + v6.len(), 0).unwrap_or_default();
    add_addresses(&mut b, &[0xc0, 12], ttl, v4, v6);
    Prepared {
        bytes: b.into(),
        type_idx,
    }
}

/// SRV answers as `answer::add_srv` builds them: one per target, the target being the VIP
/// name under the canonical apex of the zone asked about; each target's addresses in
/// additional, owned by a pointer to the target name of its first SRV record.
fn srv(qname: &[u8], apex: &[Box<[u8]>], ttl: u32, targets: &[SrvTarget]) -> Option<Prepared> {
    let mut answers = Vec::new();
    let mut additional = Vec::new();
    let mut n = 0;
    // The host whose addresses were added last (as `answer::add_srv` groups them).
    let mut last: Option<&hickory_proto::rr::Name> = None;
    let base = 12 + qname.len() + 4;
    let mut extra = 0;
    for t in targets {
        let mut target = Vec::with_capacity(64);
        for label in t.host.iter() {
            target.push(u8::try_from(label.len()).ok()?);
            target.extend_from_slice(label);
        }
        for label in apex {
            target.push(label.len() as u8);
            target.extend_from_slice(label);
        }
        target.push(0);
        if target.len() > MAX_NAME {
            continue;
        }
        let mut rdata = vec![0, 0, 0, 0];
        rdata.extend_from_slice(&t.port.to_be_bytes());
        // Owner pointer (2) + type, class, TTL, length (10) + priority, weight, port (6).
        let target_at = base + answers.len() + 18;
        rdata.extend_from_slice(&target);
        record(&mut answers, &[0xc0, 12], TYPE_SRV, ttl, &rdata);
        n += 1;
        match last {
            Some(host) if *host == t.host => {}
            _ => {
                last = Some(&t.host);
                let mut adds = Vec::new();
                add_addresses(&mut adds, &pointer(target_at)?, ttl, &t.v4, &t.v6);
                extra += t.v4.len() + t.v6.len();
                additional.push(adds);
            }
        }
    }
    if n == 0 {
        return None;
    }
    let mut b = start(qname, TYPE_SRV, n, extra)?;
    b.extend_from_slice(&answers);
    for adds in additional {
        b.extend_from_slice(&adds);
    }
    Some(Prepared {
        bytes: b.into(),
        type_idx: super::TYPE_SRV_IDX,
    })
}

/// The reference check: if the fast path answers `bytes`, the hickory path's answer parses to
/// exactly the same message (names compared with their case). Returns whether it answered.
#[cfg(test)]
pub(crate) fn check_against_slow(snap: &super::catalog::Snapshot, bytes: &[u8], ra: bool) -> bool {
    use super::answer::{Outcome, Transport, encode, handle};
    use hickory_proto::op::Message;
    let mut out = Vec::new();
    let Some(done) = snap.fast.answer(bytes, ra, &mut out) else {
        return false;
    };
    assert_eq!(done.len, out.len());
    let (outcome, limit) = handle(snap, bytes, ra, Transport::Udp);
    let Outcome::Reply(resp) = outcome else {
        panic!("fast path answered what the slow path does not: {outcome:?}");
    };
    let slow = encode(&resp, limit).expect("slow path encodes");
    assert!(out.len() <= limit, "{} > {limit}", out.len());
    let fast = Message::from_vec(&out).expect("fast answer parses");
    let slow = Message::from_vec(&slow).expect("slow answer parses");
    assert_eq!(fast, slow);
    // `Name` equality ignores case; Debug shows it.
    assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::dns::{DnsCatalog, DnsConfig, ZONE_ALIASES};
    use crate::model::{Protocol, Vip, VipKey, VipName};
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    use proptest::prelude::*;

    fn vip(label: &str, ip: std::net::IpAddr, port: u16, protocol: Protocol) -> Vip {
        Vip {
            key: VipKey { ip, port, protocol },
            name: Some(VipName {
                label: label.into(),
                framework: "marathon".into(),
            }),
            backends: vec![],
        }
    }

    fn zones() -> Vec<&'static str> {
        let mut z = vec![crate::model::DEFAULT_ZONE];
        z.extend(ZONE_ALIASES);
        z
    }

    struct Q {
        id: u16,
        name: String,
        qtype: RecordType,
        rd: bool,
        cd: bool,
        edns: Option<(u16, bool)>,
    }

    fn encode_query(q: &Q) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = q.id;
        m.metadata.recursion_desired = q.rd;
        m.metadata.checking_disabled = q.cd;
        m.add_query(Query::query(
            Name::from_ascii(&q.name).expect("name"),
            q.qtype,
        ));
        if let Some((size, dnssec_ok)) = q.edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            e.flags_mut().dnssec_ok = dnssec_ok;
            m.set_edns(e);
        }
        m.to_vec().expect("encodes")
    }

    /// Flip the case of the ASCII letters where `flips` says so.
    fn recase(s: &str, flips: &[bool]) -> String {
        s.chars()
            .enumerate()
            .map(|(i, c)| {
                if flips.get(i % flips.len().max(1)).copied().unwrap_or(false) {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    #[test]
    fn answers_plain_queries_and_leaves_the_rest() {
        let cat = DnsCatalog::new(&DnsConfig::default());
        let v4 = "11.0.0.1".parse().expect("ip");
        let v6 = "fd01:c::1".parse().expect("ip");
        cat.publish(&[
            vip("web", v4, 80, Protocol::Tcp),
            vip("web", v4, 443, Protocol::Tcp),
            vip("web", v6, 80, Protocol::Tcp),
        ]);
        let snap = cat.load();
        let q = |name: &str, qtype, edns| Q {
            id: 7,
            name: name.into(),
            qtype,
            rd: true,
            cd: false,
            edns,
        };
        for (query, answered) in [
            (
                q("web.marathon.l4lb.thisdcos.directory.", RecordType::A, None),
                true,
            ),
            (
                q(
                    "WEB.Marathon.dclb.thisdcos.GLOBAL.",
                    RecordType::AAAA,
                    Some((4096, true)),
                ),
                true,
            ),
            (
                q(
                    "_web._tcp.marathon.L4LB.thisdcos.directory.",
                    RecordType::SRV,
                    None,
                ),
                true,
            ),
            (
                q(
                    "_web._tcp.marathon.l4lb.thisdcos.global.",
                    RecordType::SRV,
                    Some((512, false)),
                ),
                true,
            ),
            (
                q(
                    "web.marathon.l4lb.thisdcos.directory.",
                    RecordType::MX,
                    None,
                ),
                false,
            ),
            (
                q(
                    "web.marathon.l4lb.thisdcos.directory.",
                    RecordType::ANY,
                    None,
                ),
                false,
            ),
            (
                q(
                    "nope.marathon.l4lb.thisdcos.directory.",
                    RecordType::A,
                    None,
                ),
                false,
            ),
            (
                q("marathon.l4lb.thisdcos.directory.", RecordType::A, None),
                false,
            ),
            (q("l4lb.thisdcos.directory.", RecordType::SOA, None), false),
            (q("example.com.", RecordType::A, None), false),
        ] {
            let bytes = encode_query(&query);
            for ra in [false, true] {
                assert_eq!(
                    check_against_slow(&snap, &bytes, ra),
                    answered,
                    "{} {}",
                    query.name,
                    query.qtype
                );
            }
        }
        // Shapes the fast path leaves alone: a trailing byte, a second question, EDNS version
        // 1, an OPT option, TC-less but opcode STATUS, a response.
        let base = encode_query(&q(
            "web.marathon.l4lb.thisdcos.directory.",
            RecordType::A,
            Some((1232, false)),
        ));
        let mut out = Vec::new();
        assert!(snap.fast.answer(&base, false, &mut out).is_some());
        let opt = base.len() - 11;
        let mut bad: Vec<Vec<u8>> = Vec::new();
        let mut v = base.clone();
        v.push(0);
        bad.push(v);
        let mut v = base.clone();
        v[5] = 2;
        bad.push(v);
        let mut v = base.clone();
        v[opt + 6] = 1;
        bad.push(v);
        let mut v = base.clone();
        v[opt + 10] = 4;
        v.extend_from_slice(&[0, 10, 0, 0]);
        bad.push(v);
        let mut v = base.clone();
        v[2] |= 2 << 3;
        bad.push(v);
        let mut v = base.clone();
        v[2] |= 0x80;
        bad.push(v);
        for v in bad {
            assert!(snap.fast.answer(&v, false, &mut out).is_none(), "{v:?}");
        }
    }

    #[test]
    fn oversized_answers_fall_back() {
        // 15 SRV ports: over 512 bytes, so only an EDNS query with room gets the fast answer.
        let cat = DnsCatalog::new(&DnsConfig::default());
        let ip = "11.0.0.9".parse().expect("ip");
        let vips: Vec<Vip> = (1..=15)
            .map(|p| vip("big", ip, 1000 + p, Protocol::Tcp))
            .collect();
        cat.publish(vips.iter());
        let snap = cat.load();
        let mut q = Q {
            id: 1,
            name: "_big._tcp.marathon.l4lb.thisdcos.directory.".into(),
            qtype: RecordType::SRV,
            rd: false,
            cd: false,
            edns: None,
        };
        assert!(!check_against_slow(&snap, &encode_query(&q), false));
        q.edns = Some((1232, false));
        assert!(check_against_slow(&snap, &encode_query(&q), false));
        q.edns = Some((600, false));
        assert!(!check_against_slow(&snap, &encode_query(&q), false));
    }

    fn catalog_strategy() -> impl Strategy<Value = Vec<Vip>> {
        let ip = prop_oneof![
            (0u8..4).prop_map(|i| std::net::IpAddr::from([11, 0, 0, i])),
            (0u16..3).prop_map(|i| std::net::IpAddr::from([0xfd01, 0xc, 0, 0, 0, 0, 0, i])),
        ];
        let label = "[a-zA-Z][a-zA-Z0-9-]{0,6}(\\.[a-z]{1,4})?";
        let proto = prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)];
        proptest::collection::vec(
            (label, ip, 1u16..5, proto).prop_map(|(l, ip, port, p)| vip(&l, ip, port, p)),
            0..8,
        )
    }

    /// Apps with running tasks: (task name, [(id, host, container, port, protocol)]).
    fn tasks_strategy()
    -> impl Strategy<Value = std::collections::BTreeMap<String, std::sync::Arc<crate::model::AppTasks>>>
    {
        use crate::model::{AppTasks, TaskPort, TaskRecord};
        let task = (
            "[a-z]{1,3}\\.[0-9]{1,2}",
            (1u8..4).prop_map(|i| std::net::IpAddr::from([198, 18, 1, i])),
            proptest::option::of(prop_oneof![
                (1u8..3).prop_map(|i| std::net::IpAddr::from([9, 0, 0, i])),
                Just(std::net::IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 7])),
            ]),
            proptest::option::of((31000u16..31003, any::<bool>())),
        )
            .prop_map(|(id, host, container, port)| TaskRecord {
                id,
                host: Some(host),
                container: container.into_iter().collect(),
                ports: port
                    .map(|(port, udp)| TaskPort {
                        port,
                        protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                        name: None,
                    })
                    .into_iter()
                    .collect(),
            });
        proptest::collection::btree_map(
            "/[a-z]{1,3}(/[A-Z_]{1,2})?",
            proptest::collection::vec(task, 1..4),
            0..4,
        )
        .prop_map(|apps| {
            apps.into_iter()
                .map(|(id, tasks)| {
                    let name = id.trim_start_matches('/').replace('/', ".");
                    let t = AppTasks {
                        name,
                        framework: "marathon".into(),
                        tasks,
                    };
                    (id, std::sync::Arc::new(t))
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn fast_answers_equal_slow_answers_for_task_names(
            apps in tasks_strategy(),
            pick in any::<prop::sample::Index>(),
            zone in 0usize..4,
            flips in proptest::collection::vec(any::<bool>(), 1..16),
            qtype in prop_oneof![
                Just(RecordType::A),
                Just(RecordType::AAAA),
                Just(RecordType::SRV),
                Just(RecordType::TXT),
            ],
            edns in proptest::option::of((any::<u16>(), any::<bool>())),
            (id, rd, ra) in (any::<u16>(), any::<bool>(), any::<bool>()),
        ) {
            let cat = DnsCatalog::new(&DnsConfig::default());
            cat.publish_tasks(&apps);
            let snap = cat.load();
            let mut names = vec!["nope.marathon".to_string(), "marathon".into(), "ns".into()];
            for a in apps.values() {
                let l = crate::agent::dns::tasks::label(&a.name);
                names.push(format!("{l}.marathon"));
                names.push(format!("_{l}._tcp.marathon"));
                names.push(format!("_{l}._udp.marathon"));
                for t in &a.tasks {
                    names.push(format!("{}.{l}.marathon", crate::agent::dns::tasks::label(&t.id)));
                }
            }
            let zone = ["mesos", "autoip.dcos.thisdcos.directory", "agentip.dcos.thisdcos.directory",
                        "containerip.dcos.thisdcos.directory"][zone];
            let fqdn = format!("{}.{zone}.", pick.get(&names));
            let q = Q { id, name: recase(&fqdn, &flips), qtype, rd, cd: false, edns };
            check_against_slow(&snap, &encode_query(&q), ra);
        }

        #[test]
        fn fast_answers_equal_slow_answers(
            vips in catalog_strategy(),
            pick in any::<prop::sample::Index>(),
            zone in 0usize..4,
            flips in proptest::collection::vec(any::<bool>(), 1..16),
            qtype in prop_oneof![
                4 => Just(RecordType::A),
                4 => Just(RecordType::AAAA),
                4 => Just(RecordType::SRV),
                1 => Just(RecordType::MX),
                1 => Just(RecordType::SOA),
                1 => Just(RecordType::ANY),
                1 => Just(RecordType::TXT),
            ],
            edns in proptest::option::of((any::<u16>(), any::<bool>())),
            nameservers in proptest::collection::vec(
                prop_oneof![
                    (1u8..4).prop_map(|i| std::net::IpAddr::from([198, 51, 100, i])),
                    Just(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
                ],
                0..3,
            ),
            (id, rd, cd, ra) in (any::<u16>(), any::<bool>(), any::<bool>(), any::<bool>()),
        ) {
            let cat = DnsCatalog::new(&DnsConfig::default());
            cat.set_nameservers(&nameservers);
            cat.publish(vips.iter());
            let snap = cat.load();
            // Names that exist (hosts, SRV names, the nameserver), their ancestors, and ones
            // that do not.
            let mut names = vec![
                "nope.marathon".to_string(),
                "marathon".into(),
                String::new(),
                "ns".into(),
            ];
            for v in &vips {
                let n = v.name.as_ref().expect("named");
                let proto = match v.key.protocol {
                    Protocol::Tcp => "_tcp",
                    Protocol::Udp => "_udp",
                };
                names.push(format!("{}.{}", n.label, n.framework));
                names.push(format!("_{}.{proto}.{}", n.label, n.framework));
            }
            let rel = pick.get(&names);
            let zone = zones()[zone];
            let fqdn = if rel.is_empty() { format!("{zone}.") } else { format!("{rel}.{zone}.") };
            let q = Q { id, name: recase(&fqdn, &flips), qtype, rd, cd, edns };
            let bytes = encode_query(&q);
            check_against_slow(&snap, &bytes, ra);
        }
    }
}
