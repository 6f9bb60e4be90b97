//! Pure answering: request bytes or a parsed query plus a catalog [`Snapshot`] → a response
//! message, the decision to forward, or nothing. No I/O, no clock; the server and forwarder
//! call into this.
//!
//! Choices: ANY (type 255) inside our zones gets the RFC 8482 §4.2 minimal answer, one
//! synthesised `HINFO "RFC8482" ""`; ANY outside our zones is never forwarded and gets NOTIMP.
//! Zone transfers (AXFR/IXFR) are REFUSED, as are classes other than IN inside the zones.

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, HINFO, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::catalog::{Node, Snapshot, SrvTarget};

/// Largest UDP payload we advertise and send (DNS Flag Day 2020: no IP fragmentation).
pub(crate) const MAX_UDP_PAYLOAD: u16 = 1232;
/// Without EDNS0 a UDP response may be at most this long (RFC 1035).
pub(crate) const CLASSIC_UDP_PAYLOAD: u16 = 512;

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
        Ok(req) => (
            respond(snap, &req, can_forward),
            size_limit(req.edns.as_ref(), transport),
        ),
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
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD).set_version(0);
        resp.set_edns(edns);
    }
    resp
}

/// Answer a parsed request (a query, not a response).
pub(crate) fn respond(snap: &Snapshot, req: &Message, can_forward: bool) -> Outcome {
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
            return Outcome::Forward(req.clone());
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
        (Node::Apex, RecordType::NS) => resp.answers.push(echo(&zone.ns, qname)),
        (Node::Host { v4, .. }, RecordType::A) => {
            add_addresses(&mut resp.answers, qname, ttl, v4, &[]);
        }
        (Node::Host { v6, .. }, RecordType::AAAA) => {
            add_addresses(&mut resp.answers, qname, ttl, &[], v6);
        }
        (Node::Srv(targets), RecordType::SRV) => {
            let apex = zone_apex_of(q, zone_idx, snap);
            add_srv(&mut resp, qname, apex, ttl, targets);
        }
        _ => {}
    }
    if resp.answers.is_empty() {
        // NODATA: the name exists, not with this type.
        resp.add_authority(zone.soa.clone());
    }
    Outcome::Reply(resp)
}

/// The zone apex as the client spelled it (the last labels of the query name), so SRV targets
/// stay in the alias and case the client asked about.
fn zone_apex_of(q: &Query, zone_idx: usize, snap: &Snapshot) -> Name {
    let apex = &snap.zones[zone_idx].apex;
    let n = apex.num_labels();
    let mut name = q.name().trim_to(n as usize);
    name.set_fqdn(true);
    name
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
    match q.query_type() {
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
