//! Pure answering: request bytes or a parsed query plus a catalog [`Snapshot`] → a response
//! message, the decision to forward, or nothing. No I/O, no clock; the server and forwarder
//! call into this.
//!
//! Choices: ANY (type 255) inside our zones gets the RFC 8482 §4.2 minimal answer, one
//! synthesised `HINFO "RFC8482" ""`; ANY outside our zones is never forwarded and gets NOTIMP.
//! Zone transfers (AXFR/IXFR) are REFUSED, as are classes other than IN inside the zones.

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, HINFO, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::catalog::Snapshot;
use super::records::{CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD, Node, SrvTarget, ns_key};

/// How the query arrived; decides the response size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What to do with a packet.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Send this response.
    Reply(Message),
    /// Outside our zones and upstreams exist: forward this (parsed, valid) request.
    Forward(Message),
    /// Send nothing (a response, or not even a header).
    Drop,
}

/// Decode `bytes` and decide. `can_forward`: upstreams are configured. Also returns the size
/// limit for the response on `transport` (see [`size_limit`]).
pub(crate) fn handle(
    snap: &Snapshot,
    bytes: &[u8],
    can_forward: bool,
    transport: Transport,
) -> (Outcome, usize) {
    let classic = size_limit(None, transport);
    let Some(header_bytes) = bytes.get(..12) else {
        return (Outcome::Drop, classic);
    };
    let Ok(header) = Header::read(&mut BinDecoder::new(header_bytes)) else {
        return (Outcome::Drop, classic);
    };
    if header.metadata.message_type == MessageType::Response {
        return (Outcome::Drop, classic);
    }
    match Message::from_vec(bytes) {
        Ok(req) => {
            let limit = size_limit(req.edns.as_ref(), transport);
            (respond(snap, req, can_forward), limit)
        }
        Err(_) => {
            let mut resp = Message::error_msg(
                header.metadata.id,
                header.metadata.op_code,
                ResponseCode::FormErr,
            );
            resp.metadata.recursion_desired = header.metadata.recursion_desired;
            (Outcome::Reply(resp), classic)
        }
    }
}

/// The response skeleton for `req`: id, opcode, RD/CD copied, the question echoed, and an OPT
/// record if the request had one.
fn response_to(req: &Message, rcode: ResponseCode) -> Message {
    let mut resp = Message::error_msg(req.metadata.id, req.metadata.op_code, rcode);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.checking_disabled = req.metadata.checking_disabled;
    if let Some(q) = req.queries.first()
        && req.queries.len() == 1
    {
        resp.add_query(q.clone());
    }
    if let Some(theirs) = &req.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD).set_version(0);
        // RFC 3225 §3: the DO bit is copied into the response.
        edns.flags_mut().dnssec_ok = theirs.flags().dnssec_ok;
        resp.set_edns(edns);
    }
    resp
}

/// Answer a parsed request (a query, not a response).
pub(crate) fn respond(snap: &Snapshot, owned: Message, can_forward: bool) -> Outcome {
    let req = &owned;
    if req.metadata.message_type == MessageType::Response {
        return Outcome::Drop;
    }
    if req.metadata.op_code != OpCode::Query {
        return Outcome::Reply(response_to(req, ResponseCode::NotImp));
    }
    if req.queries.len() != 1 {
        return Outcome::Reply(response_to(req, ResponseCode::FormErr));
    }
    if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Outcome::Reply(response_to(req, ResponseCode::BADVERS));
    }
    let q = &req.queries[0];
    let mut key = Vec::with_capacity(64);
    let Some(zone_idx) = snap.locate(q.name(), &mut key) else {
        if q.query_type() == RecordType::ANY {
            return Outcome::Reply(response_to(req, ResponseCode::NotImp));
        }
        if can_forward {
            return Outcome::Forward(owned);
        }
        return Outcome::Reply(response_to(req, ResponseCode::Refused));
    };
    if q.query_class() != DNSClass::IN
        || matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR)
    {
        return Outcome::Reply(response_to(req, ResponseCode::Refused));
    }
    let mut resp = response_to(req, ResponseCode::NoError);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_available = can_forward;
    let zone = &snap.zones[zone_idx];
    let ttl = snap.ttl;
    let Some(node) = snap.get(&key) else {
        resp.metadata.response_code = ResponseCode::NXDomain;
        resp.add_authority(zone.soa.clone());
        return Outcome::Reply(resp);
    };
    let qname = q.name();
    match (node, q.query_type()) {
        (Node::Empty, _) => {}
        (_, RecordType::ANY) => {
            let hinfo = HINFO::new("RFC8482".into(), String::new());
            resp.add_answer(Record::from_rdata(qname.clone(), ttl, RData::HINFO(hinfo)));
        }
        (Node::Apex, RecordType::SOA) => resp.answers.push(echo(&zone.soa, qname)),
        (Node::Apex, RecordType::NS) => {
            resp.answers.push(echo(&zone.ns, qname));
            // Glue: the nameserver's addresses, so a resolver priming the zone needs no
            // second query.
            if let Some(Node::Host { v4, v6 }) = snap.get(&ns_key(zone.group)) {
                let ns = zone.ns_name();
                add_addresses(&mut resp.additionals, &ns, ttl, v4, v6);
            }
        }
        (Node::Host { v4, .. }, RecordType::A) => {
            add_addresses(&mut resp.answers, qname, ttl, v4, &[]);
        }
        (Node::Host { v6, .. }, RecordType::AAAA) => {
            add_addresses(&mut resp.answers, qname, ttl, &[], v6);
        }
        (Node::Srv(targets), RecordType::SRV) => {
            // Targets in the zone (alias) asked about, spelled canonically: not in the 0x20
            // case of the question, which is the client's to check, not the target's.
            add_srv(&mut resp, qname, zone.apex.clone(), ttl, targets);
        }
        _ => {}
    }
    if resp.answers.is_empty() {
        // NODATA: the name exists, not with this type.
        resp.add_authority(zone.soa.clone());
    }
    Outcome::Reply(resp)
}

/// `rec` with `owner` as its name (echoes the query's case).
fn echo(rec: &Record, owner: &Name) -> Record {
    Record::from_rdata(owner.clone(), rec.ttl, rec.data.clone())
}

fn add_addresses(
    out: &mut Vec<Record>,
    owner: &Name,
    ttl: u32,
    v4: &[std::net::Ipv4Addr],
    v6: &[std::net::Ipv6Addr],
) {
    out.extend(
        v4.iter()
            .map(|a| Record::from_rdata(owner.clone(), ttl, RData::A(A(*a)))),
    );
    out.extend(
        v6.iter()
            .map(|a| Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(*a)))),
    );
}

fn add_srv(resp: &mut Message, qname: &Name, apex: Name, ttl: u32, targets: &[SrvTarget]) {
    let mut last: Option<(&Name, Name)> = None;
    for t in targets {
        let fqdn = match &last {
            Some((host, fqdn)) if *host == &t.host => fqdn.clone(),
            _ => {
                let Ok(fqdn) = t.host.clone().append_domain(&apex) else {
                    continue;
                };
                add_addresses(&mut resp.additionals, &fqdn, ttl, &t.v4, &t.v6);
                last = Some((&t.host, fqdn.clone()));
                fqdn
            }
        };
        let srv = SRV::new(0, 0, t.port, fqdn);
        resp.answers
            .push(Record::from_rdata(qname.clone(), ttl, RData::SRV(srv)));
    }
}

/// The UDP payload limit for a response to `req`: the client's EDNS0 size clamped to
/// [512, [`MAX_UDP_PAYLOAD`]], or 512 without EDNS0. TCP: 65535.
pub(crate) fn size_limit(edns: Option<&Edns>, transport: Transport) -> usize {
    match transport {
        Transport::Tcp => u16::MAX as usize,
        Transport::Udp => edns
            .map(|e| e.max_payload().clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD))
            .unwrap_or(CLASSIC_UDP_PAYLOAD) as usize,
    }
}

/// Encode `resp` within `limit` bytes: whole if it fits; else without the additional section
/// (not a truncation, RFC 2181 §9); else header + question + OPT with TC set. `None` only if
/// even that cannot be encoded.
pub(crate) fn encode(resp: &Message, limit: usize) -> Option<Vec<u8>> {
    if let Ok(bytes) = resp.to_vec()
        && bytes.len() <= limit
    {
        return Some(bytes);
    }
    if !resp.additionals.is_empty() {
        let mut slim = resp.clone();
        slim.additionals.clear();
        if let Ok(bytes) = slim.to_vec()
            && bytes.len() <= limit
        {
            return Some(bytes);
        }
    }
    let truncated = resp.truncate();
    match truncated.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Some(bytes),
        _ => {
            // Not even the question fits (cannot happen for a question that parsed within
            // 512 bytes); answer a bare header.
            let mut bare = Message::error_msg(
                resp.metadata.id,
                resp.metadata.op_code,
                ResponseCode::ServFail,
            );
            bare.metadata.truncation = true;
            bare.to_vec().ok()
        }
    }
}

/// The metrics label of a query type (bounded cardinality).
pub(crate) fn type_label(msg: &Message) -> &'static str {
    let Some(q) = msg.queries.first() else {
        return "none";
    };
    record_type_label(q.query_type())
}

/// The metrics label of a record type (bounded cardinality).
pub(crate) fn record_type_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::ANY => "ANY",
        RecordType::PTR => "PTR",
        RecordType::MX => "MX",
        RecordType::TXT => "TXT",
        RecordType::CNAME => "CNAME",
        RecordType::HTTPS => "HTTPS",
        _ => "other",
    }
}

/// The metrics label of a response code.
pub(crate) fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::dns::{DnsCatalog, DnsConfig};
    use crate::model::test_util::named;
    use crate::model::{AppTasks, Protocol, Vip};
    use hickory_proto::op::Query;
    use proptest::prelude::*;

    fn catalog() -> DnsCatalog {
        let cat = DnsCatalog::new(&DnsConfig::default());
        cat.set_nameservers(&[
            "198.51.100.1".parse().expect("ip"),
            "::1".parse().expect("ip"),
        ]);
        let vips = [
            named("web", "11.0.0.1", 80, Protocol::Tcp),
            named("web", "11.0.0.1", 443, Protocol::Tcp),
            named("web", "fd01:c::1", 80, Protocol::Tcp),
            named("dns", "11.0.0.2", 53, Protocol::Udp),
            named("api.hello-world", "11.0.0.3", 8080, Protocol::Tcp),
        ];
        cat.publish(vips.iter());
        cat
    }

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m
    }

    fn reply(snap: &Snapshot, req: &Message, can_forward: bool) -> Message {
        match respond(snap, req.clone(), can_forward) {
            Outcome::Reply(m) => m,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Records of a section as `(owner, "TYPE rdata")` strings.
    fn show(rs: &[Record]) -> Vec<String> {
        rs.iter()
            .map(|r| format!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data))
            .collect()
    }

    /// name, type → rcode, answers, authority, additional.
    type Case<'a> = (
        &'a str,
        RecordType,
        ResponseCode,
        &'a [&'a str],
        &'a [&'a str],
        &'a [&'a str],
    );

    const SOA_L4LB: &str = "l4lb.thisdcos.directory. 5 SOA ns.l4lb.thisdcos.directory. hostmaster.l4lb.thisdcos.directory. 3 60 30 86400 1";
    /// The additional section of an SRV answer for `web`: the target's addresses.
    const WEB_ADDRS: &[&str] = &[
        "web.marathon.l4lb.thisdcos.directory. 5 A 11.0.0.1",
        "web.marathon.l4lb.thisdcos.directory. 5 AAAA fd01:c::1",
    ];

    #[test]
    fn answers_table() {
        let cat = catalog();
        let snap = cat.load();
        #[rustfmt::skip]
        let cases: &[Case] = &[
            // SRV with addresses of the target in additional.
            ("_web._tcp.marathon.l4lb.thisdcos.directory.", RecordType::SRV, ResponseCode::NoError,
             &["_web._tcp.marathon.l4lb.thisdcos.directory. 5 SRV 0 0 80 web.marathon.l4lb.thisdcos.directory.",
               "_web._tcp.marathon.l4lb.thisdcos.directory. 5 SRV 0 0 443 web.marathon.l4lb.thisdcos.directory."],
             &[], WEB_ADDRS),
            ("_dns._udp.marathon.l4lb.thisdcos.global.", RecordType::SRV, ResponseCode::NoError,
             &["_dns._udp.marathon.l4lb.thisdcos.global. 5 SRV 0 0 53 dns.marathon.l4lb.thisdcos.global."],
             &[], &["dns.marathon.l4lb.thisdcos.global. 5 A 11.0.0.2"]),
            ("_api.hello-world._tcp.marathon.l4lb.thisdcos.directory.", RecordType::SRV, ResponseCode::NoError,
             &["_api.hello-world._tcp.marathon.l4lb.thisdcos.directory. 5 SRV 0 0 8080 api.hello-world.marathon.l4lb.thisdcos.directory."],
             &[], &["api.hello-world.marathon.l4lb.thisdcos.directory. 5 A 11.0.0.3"]),
            // Apex.
            ("l4lb.thisdcos.directory.", RecordType::SOA, ResponseCode::NoError, &[SOA_L4LB], &[], &[]),
            ("L4LB.thisdcos.directory.", RecordType::NS, ResponseCode::NoError,
             &["L4LB.thisdcos.directory. 3600 NS ns.l4lb.thisdcos.directory."], &[],
             &["ns.l4lb.thisdcos.directory. 5 A 198.51.100.1", "ns.l4lb.thisdcos.directory. 5 AAAA ::1"]),
            // SRV targets spelled canonically whatever the question's case (0x20).
            ("_WEB._tcp.MARATHON.l4lb.THISDCOS.directory.", RecordType::SRV, ResponseCode::NoError,
             &["_WEB._tcp.MARATHON.l4lb.THISDCOS.directory. 5 SRV 0 0 80 web.marathon.l4lb.thisdcos.directory.",
               "_WEB._tcp.MARATHON.l4lb.THISDCOS.directory. 5 SRV 0 0 443 web.marathon.l4lb.thisdcos.directory."],
             &[], WEB_ADDRS),
            // ANY: RFC 8482 HINFO for existing names (NODATA for empty non-terminals, below).
            ("web.marathon.l4lb.thisdcos.directory.", RecordType::ANY, ResponseCode::NoError,
             &["web.marathon.l4lb.thisdcos.directory. 5 HINFO RFC8482 "], &[], &[]),
            ("l4lb.thisdcos.directory.", RecordType::AXFR, ResponseCode::Refused, &[], &[], &[]),
            // Outside the zones without upstreams: REFUSED; ANY outside: NOTIMP.
            ("example.com.", RecordType::A, ResponseCode::Refused, &[], &[], &[]),
            ("thisdcos.directory.", RecordType::A, ResponseCode::Refused, &[], &[], &[]),
            ("example.com.", RecordType::ANY, ResponseCode::NotImp, &[], &[], &[]),
        ];
        // Names that exist, and types they have no records of: NODATA (NOERROR, the SOA).
        #[rustfmt::skip]
        let nodata: &[(&str, &[RecordType])] = &[
            ("dns.marathon.l4lb.thisdcos.directory.", &[RecordType::AAAA]),
            ("web.marathon.l4lb.thisdcos.directory.", &[RecordType::MX]),
            ("ns.l4lb.thisdcos.directory.", &[RecordType::MX]),
            ("_web._tcp.marathon.l4lb.thisdcos.directory.", &[RecordType::A]),
            ("l4lb.thisdcos.directory.", &[RecordType::A]),
            // Empty non-terminals, ANY included.
            ("marathon.l4lb.thisdcos.directory.", &[RecordType::A, RecordType::ANY]),
            ("hello-world.marathon.l4lb.thisdcos.directory.", &[RecordType::A]),
            ("_tcp.marathon.l4lb.thisdcos.directory.", &[RecordType::SRV]),
        ];
        // Unknown, below a known name, wrong proto, ANY of an unknown name: NXDOMAIN, the SOA.
        #[rustfmt::skip]
        let nxdomain: &[(&str, RecordType)] = &[
            ("nope.marathon.l4lb.thisdcos.directory.", RecordType::A),
            ("x.web.marathon.l4lb.thisdcos.directory.", RecordType::A),
            ("_web._udp.marathon.l4lb.thisdcos.directory.", RecordType::SRV),
            ("nope.l4lb.thisdcos.directory.", RecordType::ANY),
        ];
        // A single record owned by the question's name, spelled as asked: type, rdata.
        #[rustfmt::skip]
        let one_record: &[(&str, RecordType, &str)] = &[
            ("web.marathon.l4lb.thisdcos.directory.", RecordType::A, "11.0.0.1"),
            ("web.marathon.l4lb.thisdcos.directory.", RecordType::AAAA, "fd01:c::1"),
            // Echoed case, alias zone.
            ("WeB.Marathon.DCLB.thisdcos.Global.", RecordType::A, "11.0.0.1"),
            ("api.hello-world.marathon.l4lb.thisdcos.directory.", RecordType::A, "11.0.0.3"),
            ("dclb.thisdcos.directory.", RecordType::SOA,
             "ns.dclb.thisdcos.directory. hostmaster.dclb.thisdcos.directory. 3 60 30 86400 1"),
            // The nameserver's own name, under every alias (BIND and unbound prime with it).
            ("NS.l4lb.thisdcos.directory.", RecordType::A, "198.51.100.1"),
            ("ns.dclb.thisdcos.global.", RecordType::AAAA, "::1"),
        ];
        for &(name, types) in nodata {
            for &t in types {
                check(
                    &snap,
                    (name, t, ResponseCode::NoError, &[], &[SOA_L4LB], &[]),
                );
            }
        }
        for &(name, t) in nxdomain {
            check(
                &snap,
                (name, t, ResponseCode::NXDomain, &[], &[SOA_L4LB], &[]),
            );
        }
        for &(name, t, rdata) in one_record {
            let answer = format!("{name} 5 {t} {rdata}");
            check(
                &snap,
                (name, t, ResponseCode::NoError, &[answer.as_str()], &[], &[]),
            );
        }
        for &case in cases {
            check(&snap, case);
        }
    }

    /// Asks `name` `t` and checks the reply against the rest of `case`, its header and that it
    /// encodes.
    fn check(snap: &Snapshot, case: Case<'_>) {
        let (name, t, rcode, ans, auth, add) = case;
        let req = query(name, t);
        let resp = reply(snap, &req, false);
        let ctx = format!("{name} {t}");
        assert_eq!(resp.metadata.response_code, rcode, "{ctx}");
        assert_eq!(resp.metadata.id, 4242, "{ctx}");
        assert_eq!(resp.metadata.message_type, MessageType::Response, "{ctx}");
        assert!(resp.metadata.recursion_desired, "{ctx}");
        assert_eq!(resp.queries, req.queries, "{ctx}");
        assert_eq!(show(&resp.answers), ans, "{ctx}");
        assert_eq!(show(&resp.authorities), auth, "{ctx}");
        assert_eq!(show(&resp.additionals), add, "{ctx}");
        let in_zone = snap
            .locate(req.queries[0].name(), &mut Vec::new())
            .is_some();
        let authoritative = in_zone && rcode != ResponseCode::Refused;
        assert_eq!(resp.metadata.authoritative, authoritative, "{ctx}");
        // Whatever we answer must encode and parse back.
        let bytes = encode(&resp, 65_535).expect("encodes");
        let back = Message::from_vec(&bytes).expect("parses");
        assert_eq!(back.answers.len(), ans.len(), "{ctx}");
        assert_eq!(
            back.answers.first().map(|r| r.name.to_string()),
            ans.first().map(|_| name.to_string()),
            "{ctx}: owner name echoed with its case"
        );
    }

    pub(crate) fn tasks_fixture() -> std::collections::BTreeMap<String, std::sync::Arc<AppTasks>> {
        let t = crate::model::test_util::task_record;
        let app = |name: &str, tasks| {
            std::sync::Arc::new(AppTasks {
                name: name.into(),
                framework: "marathon".into(),
                tasks,
            })
        };
        [
            (
                "/cassandra".to_string(),
                app(
                    "cassandra",
                    vec![
                        t("cassandra.1", "198.18.1.1", &[], &[(31000, Protocol::Tcp)]),
                        t("cassandra.2", "198.18.1.2", &[], &[(31001, Protocol::Tcp)]),
                    ],
                ),
            ),
            (
                "/g/db".to_string(),
                app(
                    "db.g",
                    vec![t(
                        "g_db.1",
                        "198.18.1.3",
                        &["9.0.0.7"],
                        &[(31002, Protocol::Udp)],
                    )],
                ),
            ),
        ]
        .into()
    }

    /// name, type → rcode, answers, authority, additional; the name built at run time or not.
    type OwnedCase<N = &'static str> = (
        N,
        RecordType,
        ResponseCode,
        Vec<String>,
        Vec<String>,
        Vec<String>,
    );

    #[test]
    fn task_names_table() {
        let cat = catalog();
        cat.publish_tasks(&tasks_fixture());
        let snap = cat.load();
        let soa =
            |zone: &str| format!("{zone}. 5 SOA ns.{zone}. hostmaster.{zone}. 4 60 30 86400 1");
        #[rustfmt::skip]
        let cases: Vec<OwnedCase> = vec![
            ("cassandra.marathon.mesos.", RecordType::A, ResponseCode::NoError,
             vec!["cassandra.marathon.mesos. 5 A 198.18.1.1".into(), "cassandra.marathon.mesos. 5 A 198.18.1.2".into()], vec![], vec![]),
            ("_cassandra._tcp.marathon.mesos.", RecordType::SRV, ResponseCode::NoError,
             vec!["_cassandra._tcp.marathon.mesos. 5 SRV 0 0 31000 cassandra-1.cassandra.marathon.mesos.".into(),
                  "_cassandra._tcp.marathon.mesos. 5 SRV 0 0 31001 cassandra-2.cassandra.marathon.mesos.".into()],
             vec![],
             vec!["cassandra-1.cassandra.marathon.mesos. 5 A 198.18.1.1".into(), "cassandra-2.cassandra.marathon.mesos. 5 A 198.18.1.2".into()]),
            ("_cassandra._udp.marathon.mesos.", RecordType::SRV, ResponseCode::NXDomain, vec![], vec![soa("mesos")], vec![]),
            // Groups: /g/db runs tasks named db.g, answered as db-g (Mesos-DNS); container IP first.
            ("DB-G.marathon.MESOS.", RecordType::A, ResponseCode::NoError, vec!["DB-G.marathon.MESOS. 5 A 9.0.0.7".into()], vec![], vec![]),
            ("_db-g._udp.marathon.mesos.", RecordType::SRV, ResponseCode::NoError,
             vec!["_db-g._udp.marathon.mesos. 5 SRV 0 0 31002 g-db-1.db-g.marathon.mesos.".into()], vec![],
             vec!["g-db-1.db-g.marathon.mesos. 5 A 198.18.1.3".into()]),
            ("db-g.marathon.autoip.dcos.thisdcos.directory.", RecordType::A, ResponseCode::NoError,
             vec!["db-g.marathon.autoip.dcos.thisdcos.directory. 5 A 9.0.0.7".into()], vec![], vec![]),
            ("db-g.marathon.agentip.dcos.thisdcos.directory.", RecordType::A, ResponseCode::NoError,
             vec!["db-g.marathon.agentip.dcos.thisdcos.directory. 5 A 198.18.1.3".into()], vec![], vec![]),
            ("db-g.marathon.containerip.dcos.thisdcos.directory.", RecordType::A, ResponseCode::NoError,
             vec!["db-g.marathon.containerip.dcos.thisdcos.directory. 5 A 9.0.0.7".into()], vec![], vec![]),
            ("cassandra.marathon.autoip.dcos.thisdcos.directory.", RecordType::A, ResponseCode::NoError,
             vec!["cassandra.marathon.autoip.dcos.thisdcos.directory. 5 A 198.18.1.1".into(),
                  "cassandra.marathon.autoip.dcos.thisdcos.directory. 5 A 198.18.1.2".into()], vec![], vec![]),
            ("cassandra.marathon.containerip.dcos.thisdcos.directory.", RecordType::A, ResponseCode::NXDomain,
             vec![], vec![soa("containerip.dcos.thisdcos.directory")], vec![]),
            ("cassandra.marathon.mesos.", RecordType::AAAA, ResponseCode::NoError, vec![], vec![soa("mesos")], vec![]),
            ("nope.marathon.mesos.", RecordType::A, ResponseCode::NXDomain, vec![], vec![soa("mesos")], vec![]),
            ("marathon.mesos.", RecordType::A, ResponseCode::NoError, vec![], vec![soa("mesos")], vec![]),
            ("ns.mesos.", RecordType::A, ResponseCode::NoError, vec!["ns.mesos. 5 A 198.51.100.1".into()], vec![], vec![]),
            ("mesos.", RecordType::SOA, ResponseCode::NoError, vec![soa("mesos")], vec![], vec![]),
            // Task names are not VIP names, and the other way round.
            ("cassandra.marathon.l4lb.thisdcos.directory.", RecordType::A, ResponseCode::NXDomain, vec![], vec![SOA_L4LB.replace(" 3 ", " 4 ")], vec![]),
            ("web.marathon.mesos.", RecordType::A, ResponseCode::NXDomain, vec![], vec![soa("mesos")], vec![]),
            // Between the zones: outside, refused without upstreams.
            ("dcos.thisdcos.directory.", RecordType::A, ResponseCode::Refused, vec![], vec![], vec![]),
        ];
        check_owned(&snap, &cases);
        // Leaving .mesos to a Mesos-DNS: forwarded like any other name.
        let cat = DnsCatalog::new(&DnsConfig {
            mesos: false,
            ..DnsConfig::default()
        });
        cat.publish_tasks(&tasks_fixture());
        let snap = cat.load();
        let req = query("cassandra.marathon.mesos.", RecordType::A);
        assert!(matches!(respond(&snap, req, true), Outcome::Forward(_)));
        let req = query(
            "cassandra.marathon.autoip.dcos.thisdcos.directory.",
            RecordType::A,
        );
        assert_eq!(reply(&snap, &req, true).answers.len(), 2);
    }

    /// Asks each case's name and type, checks the reply, and that the fast path agrees.
    fn check_owned<N: AsRef<str>>(snap: &Snapshot, cases: &[OwnedCase<N>]) {
        for (name, t, rcode, ans, auth, add) in cases {
            let name = name.as_ref();
            let req = query(name, *t);
            let resp = reply(snap, &req, false);
            let ctx = format!("{name} {t}");
            assert_eq!(resp.metadata.response_code, *rcode, "{ctx}");
            assert_eq!(show(&resp.answers), *ans, "{ctx}");
            assert_eq!(show(&resp.authorities), *auth, "{ctx}");
            assert_eq!(show(&resp.additionals), *add, "{ctx}");
            let bytes = req.to_vec().expect("encodes");
            super::super::fast::check_against_slow(snap, &bytes, false);
        }
    }

    /// A table built by the controller's own path from Marathon apps: `dual` a container
    /// app whose task has an IPv4 and an IPv6 address, `six` one with IPv6 only, `four` one
    /// on a host with IPv4 only.
    fn families_catalog() -> DnsCatalog {
        use crate::source::marathon::apps::app_contribution;
        use crate::source::state::{BuildConfig, TableState};
        let body = r#"{"apps":[
            {"id":"/dual","networks":[{"mode":"container","name":"dcos6"}],
             "container":{"type":"MESOS","portMappings":[{"containerPort":80,"labels":{"VIP_0":"/dual:80"}}]},
             "tasks":[{"id":"dual.1","host":"198.18.1.1","ports":[],"state":"TASK_RUNNING",
                       "ipAddresses":[{"ipAddress":"9.0.0.1","protocol":"IPv4"},{"ipAddress":"fd00::1","protocol":"IPv6"}]}]},
            {"id":"/six","networks":[{"mode":"container","name":"dcos6"}],
             "container":{"type":"MESOS","portMappings":[{"containerPort":80,"labels":{"VIP_0":"/six:80"}}]},
             "tasks":[{"id":"six.1","host":"198.18.1.2","ports":[],"state":"TASK_RUNNING",
                       "ipAddresses":[{"ipAddress":"fd00::2","protocol":"IPv6"}]}]},
            {"id":"/four","portDefinitions":[{"port":0,"labels":{"VIP_0":"/four:80"}}],
             "tasks":[{"id":"four.1","host":"198.18.1.3","ports":[31000],"state":"TASK_RUNNING"}]}
        ]}"#;
        let (apps, bad) =
            crate::source::marathon::types::parse_apps(body.as_bytes()).expect("apps");
        assert!(bad.is_empty(), "{bad:?}");
        let cfg = BuildConfig {
            vip_cidr: "11.0.0.0/30".parse().expect("net"),
            vip_cidr6: "fd01:c::/126".parse().expect("net"),
            ..BuildConfig::default()
        };
        let mut state = TableState::new(cfg, 1);
        state.replace_all(apps.iter().map(|a| app_contribution(a, &mut |_| None)));
        let table = state.rebuild(0).table.expect("a table");
        let cat = DnsCatalog::new(&DnsConfig::default());
        cat.publish(table.vips.values().map(|v| &**v));
        cat.publish_tasks(&table.apps);
        cat
    }

    #[test]
    fn a_and_aaaa_follow_the_families_of_the_backends() {
        let cat = families_catalog();
        let snap = cat.load();
        // The addresses the allocator gave, by name and family.
        let addr = |name: &str, t: RecordType| -> Vec<String> {
            let resp = reply(&snap, &query(name, t), false);
            resp.answers.iter().map(|r| r.data.to_string()).collect()
        };
        let vip = |label: &str| format!("{label}.marathon.l4lb.thisdcos.directory.");
        let (dual4, dual6) = (
            addr(&vip("dual"), RecordType::A),
            addr(&vip("dual"), RecordType::AAAA),
        );
        let (four, six) = (
            addr(&vip("four"), RecordType::A),
            addr(&vip("six"), RecordType::AAAA),
        );
        for a in [&dual4, &dual6, &four, &six] {
            assert_eq!(a.len(), 1, "{dual4:?} {dual6:?} {four:?} {six:?}");
        }
        let soa = |zone: &str, serial: u32| {
            format!("{zone}. 5 SOA ns.{zone}. hostmaster.{zone}. {serial} 60 30 86400 1")
        };
        let l4lb = soa("l4lb.thisdcos.directory", 3);
        let rec = |owner: &str, t: &str, a: &[String]| format!("{owner} 5 {t} {}", a[0]);
        #[rustfmt::skip]
        let cases: Vec<OwnedCase<String>> = vec![
            (vip("dual"), RecordType::A, ResponseCode::NoError,
             vec![rec(&vip("dual"), "A", &dual4)], vec![], vec![]),
            (vip("dual"), RecordType::AAAA, ResponseCode::NoError,
             vec![rec(&vip("dual"), "AAAA", &dual6)], vec![], vec![]),
            // IPv6 backends only: no A (NOERROR, no data); IPv4 only: no AAAA.
            (vip("six"), RecordType::A, ResponseCode::NoError,
             vec![], vec![l4lb.clone()], vec![]),
            (vip("four"), RecordType::AAAA, ResponseCode::NoError,
             vec![], vec![l4lb.clone()], vec![]),
            // SRV targets resolve to every family the name has.
            ("_dual._tcp.marathon.l4lb.thisdcos.directory.".into(), RecordType::SRV, ResponseCode::NoError,
             vec![format!("_dual._tcp.marathon.l4lb.thisdcos.directory. 5 SRV 0 0 80 {}", vip("dual"))],
             vec![], vec![rec(&vip("dual"), "A", &dual4), rec(&vip("dual"), "AAAA", &dual6)]),
            ("_six._tcp.marathon.l4lb.thisdcos.directory.".into(), RecordType::SRV, ResponseCode::NoError,
             vec![format!("_six._tcp.marathon.l4lb.thisdcos.directory. 5 SRV 0 0 80 {}", vip("six"))],
             vec![], vec![rec(&vip("six"), "AAAA", &six)]),
            // Task names: a container's IPv6 address answers AAAA (Mesos-DNS).
            ("dual.marathon.mesos.".into(), RecordType::A, ResponseCode::NoError,
             vec!["dual.marathon.mesos. 5 A 9.0.0.1".into()], vec![], vec![]),
            ("dual.marathon.mesos.".into(), RecordType::AAAA, ResponseCode::NoError,
             vec!["dual.marathon.mesos. 5 AAAA fd00::1".into()], vec![], vec![]),
            ("six.marathon.containerip.dcos.thisdcos.directory.".into(), RecordType::AAAA, ResponseCode::NoError,
             vec!["six.marathon.containerip.dcos.thisdcos.directory. 5 AAAA fd00::2".into()], vec![], vec![]),
            ("six.marathon.mesos.".into(), RecordType::A, ResponseCode::NoError,
             vec![], vec![soa("mesos", 3)], vec![]),
        ];
        check_owned(&snap, &cases);
    }

    #[test]
    fn outside_zone_forwards_when_upstreams_exist() {
        let cat = catalog();
        let snap = cat.load();
        let req = query("example.com.", RecordType::A);
        assert!(matches!(respond(&snap, req.clone(), true), Outcome::Forward(m) if m == req));
        // In-zone names are never forwarded, and advertise recursion when it is available.
        let req = query("web.marathon.l4lb.thisdcos.directory.", RecordType::A);
        assert!(reply(&snap, &req, true).metadata.recursion_available);
        let req = query("example.com.", RecordType::ANY);
        assert_eq!(
            reply(&snap, &req, true).metadata.response_code,
            ResponseCode::NotImp
        );
    }

    #[test]
    fn opcode_qdcount_edns_and_malformed() {
        let cat = catalog();
        let snap = cat.load();
        let mut req = query("web.marathon.l4lb.thisdcos.directory.", RecordType::A);
        req.metadata.op_code = OpCode::Status;
        assert_eq!(
            reply(&snap, &req, false).metadata.response_code,
            ResponseCode::NotImp
        );
        req.metadata.op_code = OpCode::Update;
        assert_eq!(
            reply(&snap, &req, false).metadata.response_code,
            ResponseCode::NotImp
        );

        let mut none = query("web.marathon.l4lb.thisdcos.directory.", RecordType::A);
        none.queries.clear();
        let resp = reply(&snap, &none, false);
        assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
        assert!(resp.queries.is_empty());
        let mut two = query("web.marathon.l4lb.thisdcos.directory.", RecordType::A);
        two.add_query(two.queries[0].clone());
        assert_eq!(
            reply(&snap, &two, false).metadata.response_code,
            ResponseCode::FormErr
        );

        // EDNS: OPT echoed with our size; version 1 gets BADVERS.
        let mut edns_req = query("web.marathon.l4lb.thisdcos.directory.", RecordType::A);
        let mut e = Edns::new();
        e.set_max_payload(4096);
        edns_req.set_edns(e.clone());
        let resp = reply(&snap, &edns_req, false);
        assert_eq!(
            resp.edns.as_ref().map(Edns::max_payload),
            Some(MAX_UDP_PAYLOAD)
        );
        assert!(
            reply(&snap, &query("a.", RecordType::A), false)
                .edns
                .is_none()
        );
        // RFC 3225: DO echoed, both ways.
        for dnssec_ok in [false, true] {
            let mut e = Edns::new();
            e.flags_mut().dnssec_ok = dnssec_ok;
            edns_req.set_edns(e);
            let resp = reply(&snap, &edns_req, false);
            let back = Message::from_vec(&encode(&resp, 512).expect("encodes")).expect("parses");
            assert_eq!(back.edns.map(|e| e.flags().dnssec_ok), Some(dnssec_ok));
        }
        e.set_version(1);
        edns_req.set_edns(e);
        let bytes = encode(&reply(&snap, &edns_req, false), 512).expect("encodes");
        let back = Message::from_vec(&bytes).expect("parses");
        // BADVERS is 16: 0 in the header, 1 in the OPT's high bits.
        let rc = back.metadata.response_code;
        assert_eq!((rc.high(), rc.low()), (1, 0));

        // Bytes: short → dropped; header only / garbage body → FORMERR with the id;
        // responses → dropped.
        let ok = query("web.marathon.l4lb.thisdcos.directory.", RecordType::A)
            .to_vec()
            .expect("encodes");
        assert!(matches!(
            handle(&snap, &ok[..11], false, Transport::Udp).0,
            Outcome::Drop
        ));
        for bad in [&ok[..12], &ok[..20]] {
            let Outcome::Reply(r) = handle(&snap, bad, false, Transport::Udp).0 else {
                panic!("expected FORMERR")
            };
            assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
            assert_eq!(r.metadata.id, 4242);
        }
        let mut resp_bytes = ok.clone();
        resp_bytes[2] |= 0x80;
        assert!(matches!(
            handle(&snap, &resp_bytes, false, Transport::Udp).0,
            Outcome::Drop
        ));
        let (out, limit) = handle(&snap, &ok, false, Transport::Udp);
        assert!(matches!(out, Outcome::Reply(_)));
        assert_eq!(limit, 512);
        assert_eq!(handle(&snap, &ok, false, Transport::Tcp).1, 65_535);
    }

    #[test]
    fn size_limits_and_truncation() {
        let none: Option<&Edns> = None;
        assert_eq!(size_limit(none, Transport::Udp), 512);
        let mut e = Edns::new();
        for (asked, got) in [(0, 512), (100, 512), (1232, 1232), (4096, 1232), (700, 700)] {
            e.set_max_payload(asked);
            assert_eq!(size_limit(Some(&e), Transport::Udp), got);
        }
        // Many SRV ports: over 512 bytes, truncated over UDP without EDNS, whole over TCP.
        let cat = DnsCatalog::new(&DnsConfig::default());
        let vips: Vec<Vip> = (1..=60)
            .map(|p| named("big", "11.0.0.9", 1000 + p, Protocol::Tcp))
            .collect();
        cat.publish(vips.iter());
        let snap = cat.load();
        let req = query(
            "_big._tcp.marathon.l4lb.thisdcos.directory.",
            RecordType::SRV,
        );
        let resp = reply(&snap, &req, false);
        let small = encode(&resp, 512).expect("encodes");
        assert!(small.len() <= 512);
        let small = Message::from_vec(&small).expect("parses");
        assert!(small.metadata.truncation);
        assert!(small.answers.is_empty());
        assert_eq!(small.queries, req.queries);
        let full = Message::from_vec(&encode(&resp, 65_535).expect("encodes")).expect("parses");
        assert!(!full.metadata.truncation);
        assert_eq!(full.answers.len(), 60);
        assert_eq!(full.additionals.len(), 1);

        // Additional records are dropped before anything is truncated.
        let mut resp = reply(&snap, &req, false);
        resp.answers.truncate(20);
        let whole = resp.to_vec().expect("encodes").len();
        let without_additional = {
            let mut r = resp.clone();
            r.additionals.clear();
            r.to_vec().expect("encodes").len()
        };
        assert!(without_additional < whole);
        let m = Message::from_vec(&encode(&resp, without_additional).expect("encodes"))
            .expect("parses");
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 20);
        assert!(m.additionals.is_empty());
    }

    fn check_packet(snap: &Snapshot, bytes: &[u8]) {
        for can_forward in [false, true] {
            super::super::fast::check_against_slow(snap, bytes, can_forward);
            for transport in [Transport::Udp, Transport::Tcp] {
                let (outcome, limit) = handle(snap, bytes, can_forward, transport);
                if let Outcome::Reply(resp) = outcome {
                    let out = encode(&resp, limit).expect("every reply encodes");
                    assert!(out.len() <= limit);
                    let back = Message::from_vec(&out).expect("every reply parses");
                    assert_eq!(back.metadata.message_type, MessageType::Response);
                    assert_eq!(
                        Some(back.metadata.id),
                        bytes.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
                    );
                }
            }
        }
    }

    fn seeds() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for (name, t) in [
            ("web.marathon.l4lb.thisdcos.directory.", RecordType::A),
            (
                "_web._tcp.marathon.l4lb.thisdcos.directory.",
                RecordType::SRV,
            ),
            ("l4lb.thisdcos.directory.", RecordType::SOA),
            ("example.com.", RecordType::AAAA),
        ] {
            let mut q = query(name, t);
            out.push(q.to_vec().expect("encodes"));
            q.set_edns(Edns::new());
            out.push(q.to_vec().expect("encodes"));
        }
        out
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let cat = catalog();
            check_packet(&cat.load(), &bytes);
        }

        #[test]
        fn mutated_queries_never_panic(
            seed in 0usize..8,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let cat = catalog();
            let mut bytes = seeds()[seed].clone();
            for (pos, val) in flips {
                let i = pos % bytes.len();
                bytes[i] = val;
            }
            check_packet(&cat.load(), &bytes);
            let cut = cut % (bytes.len() + 1);
            check_packet(&cat.load(), &bytes[..cut]);
        }
    }
}
