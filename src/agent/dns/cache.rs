//! The cache of forwarded answers, as dnsmasq, unbound and CoreDNS's `cache` keep one. Pure: no
//! I/O, time passed in; the server (`server.rs`) looks up before forwarding and stores after.
//!
//! - **Key**: the question (name lower-cased, type, class) and the request bits that change
//!   the answer: RD, CD, AD, whether the query had EDNS (an OPT may only go back to a client
//!   that sent one), and DO.
//! - **What is kept** ([`analyse`]): NOERROR and NXDOMAIN answers only, never TC, never an
//!   answer with a TTL of 0. A positive answer lives for the least TTL of its answer and
//!   authority records, at most [`CacheConfig::max_ttl`]. A negative one (NXDOMAIN, or NOERROR
//!   without answers: NODATA) lives per RFC 2308 §5 for the least of the SOA's TTL, its MINIMUM
//!   and any answer record's TTL, at most [`CacheConfig::max_negative_ttl`]; without an SOA in
//!   the authority section it is not cached at all (RFC 2308 §5: it SHOULD NOT be).
//! - **A hit** is the stored answer with every TTL (OPT excepted) lowered by the whole seconds
//!   it has spent here (and never above `max_ttl`), so a downstream cache never holds a record
//!   longer than its owner meant; the caller puts in the client's id and question case
//!   ([`personalize`]).
//! - **Bounds**: at most [`CacheConfig::entries`] entries and [`CacheConfig::bytes`] bytes (an
//!   answer is at most 64 KiB, the DNS message limit); the least recently used go first.
//!   Expired entries go when looked up or when they reach the cold end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode};
use hickory_proto::serialize::binary::BinEncodable;

/// Cache limits and TTL caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Entries at most; 0 turns the cache off.
    pub entries: usize,
    /// Bytes at most (answers, keys and bookkeeping).
    pub bytes: usize,
    /// A positive answer is kept at most this long, seconds.
    pub max_ttl: u32,
    /// A negative answer (NXDOMAIN, NODATA) is kept at most this long, seconds.
    pub max_negative_ttl: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        // 10,000 entries (dnsmasq keeps 150 by default, unbound 4 MiB of messages): answers of
        // a few hundred bytes make a few MB.
        CacheConfig {
            entries: 10_000,
            bytes: 16 << 20,
            max_ttl: 3600,
            max_negative_ttl: 300,
        }
    }
}

impl CacheConfig {
    /// No cache.
    pub fn off() -> Self {
        CacheConfig {
            entries: 0,
            ..CacheConfig::default()
        }
    }
}

/// Why an answer was not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotCached {
    #[error("not a well-formed response to one question")]
    Malformed,
    #[error("not a standard query response")]
    NotQuery,
    #[error("truncated")]
    Truncated,
    #[error("response code {0} says nothing about the name")]
    Rcode(u16),
    #[error("a TTL of 0")]
    ZeroTtl,
    #[error("negative answer without an SOA")]
    NoSoa,
    #[error("larger than the cache")]
    TooLarge,
    #[error("EDNS options in an OPT record that is not the last")]
    Options,
    #[error("the cache is off")]
    Off,
}

/// Request flag bits of a [`Key`].
const RD: u8 = 1;
const CD: u8 = 2;
const AD: u8 = 4;
const EDNS: u8 = 8;
const DO: u8 = 16;

/// What an answer is cached under: one flag byte (RD, CD, AD, EDNS, DO), then the question in
/// wire form with the name lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key(Box<[u8]>);

impl Key {
    /// The key of a parsed request: `None` unless it is a standard query with one question.
    pub(crate) fn of(req: &Message) -> Option<Key> {
        if req.metadata.op_code != OpCode::Query || req.queries.len() != 1 {
            return None;
        }
        let q = &req.queries[0];
        let mut lower = q.clone();
        lower.set_name(q.name().to_lowercase());
        let question = lower.to_bytes().ok()?;
        let m = &req.metadata;
        let mut flags = 0;
        for (on, bit) in [
            (m.recursion_desired, RD),
            (m.checking_disabled, CD),
            (m.authentic_data, AD),
            (req.edns.is_some(), EDNS),
            (req.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok), DO),
        ] {
            if on {
                flags |= bit;
            }
        }
        let mut bytes = Vec::with_capacity(1 + question.len());
        bytes.push(flags);
        bytes.extend_from_slice(&question);
        Some(Key(bytes.into()))
    }

    /// The key of a query read from the wire, without decoding it (the hit path runs before
    /// any parsing, as `fast` does for our own names), and the query's question as it came.
    /// `None` for anything but a plain query: header flags QR=0 and opcode QUERY, one
    /// uncompressed question, no answer or authority records, and at most an OPT (version 0)
    /// that ends the packet; such queries go the decoding path, which computes [`Key::of`].
    pub(crate) fn of_wire(query: &[u8]) -> Option<Wire<'_>> {
        let header = query.get(..12)?;
        if header[2] & 0xf8 != 0 || header[4..10] != [0, 1, 0, 0, 0, 0] || header[10] != 0 {
            return None;
        }
        let arcount = header[11];
        let mut pos = 12;
        loop {
            let len = usize::from(*query.get(pos)?);
            if len & 0xc0 != 0 || pos + len - 12 >= 255 {
                return None;
            }
            pos += 1 + len;
            if len == 0 {
                break;
            }
        }
        pos += 4;
        let question = query.get(12..pos)?;
        let mut flags = 0;
        if header[2] & 0x01 != 0 {
            flags |= RD;
        }
        if header[3] & 0x10 != 0 {
            flags |= CD;
        }
        if header[3] & 0x20 != 0 {
            flags |= AD;
        }
        let payload = match arcount {
            0 if pos == query.len() => None,
            1 => {
                // Root owner, type OPT, payload, extended rcode 0, version 0, flags, options.
                let opt = query.get(pos..pos + 11)?;
                let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
                if opt[0] != 0
                    || opt[1..3] != T_OPT.to_be_bytes()
                    || opt[5..7] != [0, 0]
                    || pos + 11 + rdlen != query.len()
                {
                    return None;
                }
                flags |= EDNS;
                if opt[7] & 0x80 != 0 {
                    flags |= DO;
                }
                Some(u16::from_be_bytes([opt[3], opt[4]]))
            }
            _ => return None,
        };
        let mut bytes = Vec::with_capacity(1 + question.len());
        bytes.push(flags);
        bytes.extend(question.iter().map(u8::to_ascii_lowercase));
        // The type and class were lower-cased with the name: put them back as they are.
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&question[question.len() - 4..]);
        Some(Wire {
            key: Key(bytes.into()),
            id: u16::from_be_bytes([header[0], header[1]]),
            question,
            qtype: u16::from_be_bytes([question[question.len() - 4], question[question.len() - 3]]),
            payload,
        })
    }

    /// The question section, lower-cased.
    #[cfg(test)]
    fn question(&self) -> &[u8] {
        &self.0[1..]
    }
}

/// A plain query read from the wire by [`Key::of_wire`].
#[derive(Debug)]
pub(crate) struct Wire<'a> {
    pub(crate) key: Key,
    pub(crate) id: u16,
    /// The question section as the client sent it (its case).
    pub(crate) question: &'a [u8],
    pub(crate) qtype: u16,
    /// The EDNS UDP payload size, if the query had an OPT.
    pub(crate) payload: Option<u16>,
}

/// What [`analyse`] finds in a cacheable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cacheable {
    /// How long to keep it, seconds (> 0).
    pub(crate) ttl: u32,
    /// Offsets of every record's TTL field (OPT excepted).
    pub(crate) ttl_at: Vec<u16>,
    pub(crate) negative: bool,
    /// Where the OPT record's options start, if it has any: they are the last bytes of the
    /// answer and are cut when it is stored (a COOKIE or an extended error was meant for
    /// the client that asked, not for the next one).
    pub(crate) options_at: Option<usize>,
}

const T_SOA: u16 = 6;
const T_OPT: u16 = 41;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// A TTL as RFC 2181 §8 reads it: a value with the top bit set means 0.
fn ttl_value(raw: u32) -> u32 {
    if raw > i32::MAX as u32 { 0 } else { raw }
}

/// The offset just past the (possibly compressed) name at `pos`.
fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *msg.get(pos)? as usize;
        match len & 0xc0 {
            0 if len == 0 => return Some(pos + 1),
            0 => pos += 1 + len,
            0xc0 => {
                msg.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
}

/// Whether `answer` may be cached and for how long, read from the wire without decoding it
/// (this runs for every forwarded answer).
pub(crate) fn analyse(answer: &[u8], cfg: &CacheConfig) -> Result<Cacheable, NotCached> {
    if answer.len() > u16::MAX as usize {
        return Err(NotCached::TooLarge);
    }
    let head = answer.get(..12).ok_or(NotCached::Malformed)?;
    if head[2] & 0x80 == 0 || (head[2] >> 3) & 0x0f != 0 {
        return Err(NotCached::NotQuery);
    }
    if head[2] & 0x02 != 0 {
        return Err(NotCached::Truncated);
    }
    let rcode = u16::from(head[3] & 0x0f);
    if rcode != 0 && rcode != 3 {
        return Err(NotCached::Rcode(rcode));
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([head[i], head[i + 1]]));
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if qd != 1 {
        return Err(NotCached::Malformed);
    }
    let mut pos = skip_name(answer, 12).ok_or(NotCached::Malformed)? + 4;
    let mut ttl_at = Vec::with_capacity(an + ns + ar);
    let mut least: Option<u32> = None;
    let mut least_answer: Option<u32> = None;
    let mut soa: Option<u32> = None;
    let mut options_at = None;
    for i in 0..an + ns + ar {
        let at = skip_name(answer, pos).ok_or(NotCached::Malformed)?;
        let rtype = u16_at(answer, at).ok_or(NotCached::Malformed)?;
        let ttl = ttl_value(u32_at(answer, at + 4).ok_or(NotCached::Malformed)?);
        let rdlen = usize::from(u16_at(answer, at + 8).ok_or(NotCached::Malformed)?);
        let rdata = at + 10;
        let end = rdata + rdlen;
        if end > answer.len() {
            return Err(NotCached::Malformed);
        }
        if rtype == T_OPT {
            if i < an + ns || answer[at + 4] != 0 {
                // An OPT outside the additional section, or an extended rcode (BADVERS...).
                return Err(NotCached::Rcode(u16::from(answer[at + 4]) << 4 | rcode));
            }
            if rdlen > 0 {
                if end != answer.len() {
                    return Err(NotCached::Options);
                }
                options_at = Some(rdata);
            }
        } else {
            ttl_at.push(u16::try_from(at + 4).map_err(|_| NotCached::TooLarge)?);
            if i < an + ns {
                least = Some(least.map_or(ttl, |l| l.min(ttl)));
            }
            if i < an {
                least_answer = Some(least_answer.map_or(ttl, |l| l.min(ttl)));
            }
            if i >= an && i < an + ns && rtype == T_SOA && soa.is_none() {
                let names = skip_name(answer, rdata)
                    .and_then(|p| skip_name(answer, p))
                    .filter(|p| p + 20 == end)
                    .ok_or(NotCached::Malformed)?;
                let minimum = ttl_value(u32_at(answer, names + 16).ok_or(NotCached::Malformed)?);
                soa = Some(ttl.min(minimum));
            }
        }
        pos = end;
    }
    if pos != answer.len() {
        return Err(NotCached::Malformed);
    }
    let negative = rcode == 3 || an == 0;
    let ttl = if negative {
        let soa = soa.ok_or(NotCached::NoSoa)?;
        least_answer
            .map_or(soa, |a| a.min(soa))
            .min(cfg.max_negative_ttl)
    } else {
        least.unwrap_or(0).min(cfg.max_ttl)
    };
    if ttl == 0 {
        return Err(NotCached::ZeroTtl);
    }
    Ok(Cacheable {
        ttl,
        ttl_at,
        negative,
        options_at,
    })
}

/// Make a cached or shared answer the client's: its `id`, and its `question` (same name but
/// for case, so the client's 0x20 case check holds). False, leaving `answer` unchanged, if the
/// answer's question is not `question` but for case.
pub(crate) fn personalize(answer: &mut [u8], id: u16, question: &[u8]) -> bool {
    let same = answer.len() >= 12
        && answer[4..6] == [0, 1]
        && answer
            .get(12..12 + question.len())
            .is_some_and(|q| q.eq_ignore_ascii_case(question));
    if same {
        answer[..2].copy_from_slice(&id.to_be_bytes());
        answer[12..12 + question.len()].copy_from_slice(question);
    }
    same
}

struct Entry {
    answer: Box<[u8]>,
    ttl_at: Box<[u16]>,
    stored: Instant,
    expires: Instant,
}

impl Entry {
    fn cost(key: &Key) -> usize {
        // The key twice (map and node), the node, and the map's slot.
        2 * key.0.len() + std::mem::size_of::<Node>() + 32
    }

    fn size(&self, key: &Key) -> usize {
        self.answer.len() + 2 * self.ttl_at.len() + Entry::cost(key)
    }
}

const NIL: usize = usize::MAX;

struct Node {
    key: Key,
    entry: Entry,
    prev: usize,
    next: usize,
}

/// What a cache holds, by key, least recently used first to go: a map into a slab of nodes
/// threaded on a doubly linked list (head: most recently used).
pub(crate) struct Cache {
    cfg: CacheConfig,
    map: HashMap<Key, usize>,
    slab: Vec<Option<Node>>,
    free: Vec<usize>,
    head: usize,
    tail: usize,
    bytes: usize,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.map.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Cache {
    pub(crate) fn new(cfg: CacheConfig) -> Cache {
        Cache {
            cfg,
            map: HashMap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            bytes: 0,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.cfg.entries > 0
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    fn node(&self, i: usize) -> Option<&Node> {
        self.slab.get(i).and_then(Option::as_ref)
    }

    fn node_mut(&mut self, i: usize) -> Option<&mut Node> {
        self.slab.get_mut(i).and_then(Option::as_mut)
    }

    fn unlink(&mut self, i: usize) {
        let Some((prev, next)) = self.node(i).map(|n| (n.prev, n.next)) else {
            return;
        };
        match self.node_mut(prev) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.node_mut(next) {
            Some(n) => n.prev = prev,
            None => self.tail = prev,
        }
    }

    fn push_front(&mut self, i: usize) {
        let old = self.head;
        if let Some(n) = self.node_mut(i) {
            n.prev = NIL;
            n.next = old;
        }
        match self.node_mut(old) {
            Some(o) => o.prev = i,
            None => self.tail = i,
        }
        self.head = i;
    }

    fn remove_at(&mut self, i: usize) {
        self.unlink(i);
        if let Some(node) = self.slab.get_mut(i).and_then(Option::take) {
            self.bytes -= node.entry.size(&node.key);
            self.map.remove(&node.key);
            self.free.push(i);
        }
    }

    /// The answer stored under `key` at `now`, its TTLs lowered by the whole seconds spent
    /// here (capped at `max_ttl`); id and question case are still those of the query that
    /// filled it. An expired entry is dropped.
    pub(crate) fn get(&mut self, key: &Key, now: Instant) -> Option<Vec<u8>> {
        let i = *self.map.get(key)?;
        let entry = &self.node(i)?.entry;
        if now >= entry.expires {
            self.remove_at(i);
            return None;
        }
        let spent = u32::try_from(now.saturating_duration_since(entry.stored).as_secs())
            .unwrap_or(u32::MAX);
        let mut out = entry.answer.to_vec();
        for &at in &entry.ttl_at {
            let at = usize::from(at);
            if let Some(field) = out.get_mut(at..at + 4) {
                let ttl = ttl_value(u32::from_be_bytes([field[0], field[1], field[2], field[3]]));
                let left = ttl.min(self.cfg.max_ttl).saturating_sub(spent);
                field.copy_from_slice(&left.to_be_bytes());
            }
        }
        self.unlink(i);
        self.push_front(i);
        Some(out)
    }

    /// Store `answer` under `key` if [`analyse`] allows, evicting the least recently used
    /// entries (and expired ones at the cold end) to stay within the bounds. Returns the
    /// lifetime given.
    pub(crate) fn insert(
        &mut self,
        key: Key,
        answer: &[u8],
        now: Instant,
    ) -> Result<Duration, NotCached> {
        if !self.enabled() {
            return Err(NotCached::Off);
        }
        let found = analyse(answer, &self.cfg)?;
        let answer: Box<[u8]> = match found.options_at {
            Some(at) => {
                let mut cut = answer[..at].to_vec();
                cut[at - 2..].fill(0);
                cut.into()
            }
            None => answer.into(),
        };
        let entry = Entry {
            answer,
            ttl_at: found.ttl_at.into(),
            stored: now,
            expires: now + Duration::from_secs(u64::from(found.ttl)),
        };
        let size = entry.size(&key);
        if size > self.cfg.bytes {
            return Err(NotCached::TooLarge);
        }
        if let Some(&i) = self.map.get(&key) {
            self.remove_at(i);
        }
        // Expired entries at the cold end go first, whatever the room.
        while let Some(n) = self.node(self.tail)
            && n.entry.expires <= now
        {
            self.remove_at(self.tail);
        }
        while self.map.len() >= self.cfg.entries || self.bytes + size > self.cfg.bytes {
            if self.tail == NIL {
                break;
            }
            self.remove_at(self.tail);
        }
        let node = Node {
            key: key.clone(),
            entry,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(node);
                i
            }
            None => {
                self.slab.push(Some(node));
                self.slab.len() - 1
            }
        };
        self.map.insert(key, i);
        self.push_front(i);
        self.bytes += size;
        Ok(Duration::from_secs(u64::from(found.ttl)))
    }

    /// Keys from most to least recently used (for tests).
    #[cfg(test)]
    fn order(&self) -> Vec<Key> {
        let mut out = Vec::new();
        let mut i = self.head;
        while let Some(n) = self.node(i) {
            out.push(n.key.clone());
            i = n.next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, MessageType, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, CNAME, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use proptest::prelude::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    fn query(qname: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), t));
        m
    }

    fn a(owner: &str, ttl: u32, last: u8) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A([192, 0, 2, last].into())))
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        Record::from_rdata(
            name("example."),
            ttl,
            RData::SOA(SOA::new(
                name("ns.example."),
                name("hostmaster.example."),
                1,
                3600,
                600,
                86400,
                minimum,
            )),
        )
    }

    /// The upstream's answer to `q`, edited.
    fn answer(q: &Message, edit: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut m = Message::response(q.metadata.id, q.metadata.op_code);
        m.metadata.recursion_desired = q.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.add_queries(q.queries.clone());
        edit(&mut m);
        m.to_vec().expect("encodes")
    }

    fn cfg() -> CacheConfig {
        CacheConfig::default()
    }

    /// A cache of `entries` answers at the most (and the default byte budget).
    fn holding(entries: usize) -> Cache {
        Cache::new(CacheConfig { entries, ..cfg() })
    }

    /// The key of `n<n>.example. A` and an answer to it living `ttl` seconds.
    fn entry(n: u32, ttl: u32) -> (Key, Vec<u8>) {
        let q = query(&format!("n{n}.example."), RecordType::A);
        let bytes = answer(&q, |m| {
            m.add_answer(a(&format!("n{n}.example."), ttl, 1));
        });
        (Key::of(&q).expect("key"), bytes)
    }

    #[test]
    fn what_is_kept_and_for_how_long() {
        let q = query("www.example.", RecordType::A);
        type Case = (
            &'static str,
            Box<dyn FnOnce(&mut Message)>,
            Result<u32, NotCached>,
        );
        // An answer of one A record for www.example. with `ttl`.
        fn www_a(ttl: u32) -> Box<dyn FnOnce(&mut Message)> {
            Box::new(move |m| {
                m.add_answer(a("www.example.", ttl, 1));
            })
        }
        // NXDOMAIN with an SOA of `ttl` and `minimum` in the authority section.
        fn nx_soa(ttl: u32, minimum: u32) -> Box<dyn FnOnce(&mut Message)> {
            Box::new(move |m| {
                m.metadata.response_code = ResponseCode::NXDomain;
                m.add_authority(soa(ttl, minimum));
            })
        }
        let cases: Vec<Case> = vec![
            ("one A", www_a(60), Ok(60)),
            (
                "least TTL of answer and authority",
                Box::new(|m| {
                    m.add_answer(a("www.example.", 60, 1));
                    m.add_answer(a("www.example.", 30, 2));
                    m.add_authority(soa(20, 3600));
                }),
                Ok(20),
            ),
            (
                "the additional section does not count",
                Box::new(|m| {
                    m.add_answer(a("www.example.", 60, 1));
                    m.add_additional(a("ns.example.", 5, 9));
                }),
                Ok(60),
            ),
            (
                "a CNAME chain",
                Box::new(|m| {
                    m.add_answer(Record::from_rdata(
                        name("www.example."),
                        300,
                        RData::CNAME(CNAME(name("web.example."))),
                    ));
                    m.add_answer(a("web.example.", 45, 1));
                }),
                Ok(45),
            ),
            ("capped at max_ttl", www_a(86400), Ok(3600)),
            (
                "a TTL with the top bit set is 0",
                www_a(0x8000_0000),
                Err(NotCached::ZeroTtl),
            ),
            ("TTL 0", www_a(0), Err(NotCached::ZeroTtl)),
            (
                "one TTL 0 among others",
                Box::new(|m| {
                    m.add_answer(a("www.example.", 60, 1));
                    m.add_answer(a("www.example.", 0, 2));
                }),
                Err(NotCached::ZeroTtl),
            ),
            (
                "NXDOMAIN: the SOA's MINIMUM when lower",
                nx_soa(900, 60),
                Ok(60),
            ),
            ("NXDOMAIN: the SOA's TTL when lower", nx_soa(30, 60), Ok(30)),
            (
                "NXDOMAIN: capped at max_negative_ttl",
                nx_soa(86400, 86400),
                Ok(300),
            ),
            (
                "NXDOMAIN after a CNAME: the CNAME's TTL when lower",
                Box::new(|m| {
                    m.metadata.response_code = ResponseCode::NXDomain;
                    m.add_answer(Record::from_rdata(
                        name("www.example."),
                        10,
                        RData::CNAME(CNAME(name("gone.example."))),
                    ));
                    m.add_authority(soa(900, 60));
                }),
                Ok(10),
            ),
            (
                "NODATA with an SOA",
                Box::new(|m| {
                    m.add_authority(soa(900, 120));
                }),
                Ok(120),
            ),
            (
                "NODATA without an SOA",
                Box::new(|_| {}),
                Err(NotCached::NoSoa),
            ),
            (
                "NXDOMAIN without an SOA",
                Box::new(|m| m.metadata.response_code = ResponseCode::NXDomain),
                Err(NotCached::NoSoa),
            ),
            (
                "NXDOMAIN with SOA minimum 0",
                nx_soa(900, 0),
                Err(NotCached::ZeroTtl),
            ),
            (
                "BADVERS (extended, in the OPT)",
                Box::new(|m| {
                    m.metadata.response_code = ResponseCode::BADVERS;
                    m.set_edns(Edns::new());
                    m.add_answer(a("www.example.", 60, 1));
                }),
                Err(NotCached::Rcode(16)),
            ),
            (
                "TC",
                Box::new(|m| {
                    m.add_answer(a("www.example.", 60, 1));
                    m.metadata.truncation = true;
                }),
                Err(NotCached::Truncated),
            ),
            (
                "with EDNS: the OPT does not count",
                Box::new(|m| {
                    m.set_edns(Edns::new());
                    m.add_answer(a("www.example.", 60, 1));
                }),
                Ok(60),
            ),
            (
                "a query, not a response",
                Box::new(|m| {
                    m.metadata.message_type = MessageType::Query;
                    m.add_answer(a("www.example.", 60, 1));
                }),
                Err(NotCached::NotQuery),
            ),
            (
                "no question",
                Box::new(|m| {
                    m.queries.clear();
                    m.add_answer(a("www.example.", 60, 1));
                }),
                Err(NotCached::Malformed),
            ),
        ];
        for (what, edit, want) in cases {
            let got = analyse(&answer(&q, edit), &cfg()).map(|c| c.ttl);
            assert_eq!(got, want, "{what}");
        }
        // Other response codes, as numbered on the wire (BADVERS above: extended, in the OPT).
        let rcodes = [
            (ResponseCode::ServFail, 2),
            (ResponseCode::Refused, 5),
            (ResponseCode::FormErr, 1),
            (ResponseCode::NotImp, 4),
        ];
        for (rcode, number) in rcodes {
            let got = analyse(&answer(&q, |m| m.metadata.response_code = rcode), &cfg());
            assert_eq!(got.map(|c| c.ttl), Err(NotCached::Rcode(number)), "{rcode}");
        }
        // Cut anywhere, a good answer is malformed, never a panic or a wrong TTL.
        let full = answer(&q, |m| {
            m.add_answer(a("www.example.", 60, 1));
            m.add_authority(soa(20, 3600));
        });
        for cut in 0..full.len() {
            assert!(analyse(&full[..cut], &cfg()).is_err(), "cut at {cut}");
        }
        let mut trailing = full.clone();
        trailing.push(0);
        assert_eq!(analyse(&trailing, &cfg()), Err(NotCached::Malformed));
    }

    #[test]
    fn keys_fold_case_and_keep_what_changes_the_answer() {
        let key = |edit: &dyn Fn(&mut Message)| {
            let mut q = query("WwW.Example.", RecordType::A);
            edit(&mut q);
            Key::of(&q)
        };
        let base = key(&|_| {}).expect("a key");
        assert_eq!(
            key(&|q| {
                q.queries[0].set_name(name("www.example."));
            }),
            Some(base.clone())
        );
        assert_eq!(
            key(&|q| {
                q.queries[0].set_name(name("WWW.EXAMPLE."));
            }),
            Some(base.clone())
        );
        assert_eq!(
            key(&|q| q.metadata.id = 7),
            Some(base.clone()),
            "the id is not in the key"
        );
        type Edit = Box<dyn Fn(&mut Message)>;
        let differ: Vec<(&str, Edit)> = vec![
            (
                "name",
                Box::new(|q| {
                    q.queries[0].set_name(name("www.example.org."));
                }),
            ),
            (
                "type",
                Box::new(|q| {
                    q.queries[0].set_query_type(RecordType::AAAA);
                }),
            ),
            (
                "class",
                Box::new(|q| {
                    q.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
                }),
            ),
            ("RD", Box::new(|q| q.metadata.recursion_desired = false)),
            ("CD", Box::new(|q| q.metadata.checking_disabled = true)),
            ("AD", Box::new(|q| q.metadata.authentic_data = true)),
            (
                "EDNS",
                Box::new(|q| {
                    q.set_edns(Edns::new());
                }),
            ),
            (
                "DO",
                Box::new(|q| {
                    let mut e = Edns::new();
                    e.flags_mut().dnssec_ok = true;
                    q.set_edns(e);
                }),
            ),
        ];
        let mut seen = vec![base.clone()];
        for (what, edit) in differ {
            let k = key(&*edit).expect("a key");
            assert!(!seen.contains(&k), "{what} must change the key");
            seen.push(k);
        }
        assert_eq!(key(&|q| q.queries.clear()), None);
        assert_eq!(key(&|q| q.metadata.op_code = OpCode::Status), None);
        assert_eq!(base.question().len(), "www.example.".len() + 1 + 4);
        assert!(base.question().starts_with(b"\x03www\x07example\x00"));
    }

    #[test]
    fn wire_keys_agree_with_decoded_ones() {
        type Edit = Box<dyn Fn(&mut Message)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("plain", Box::new(|_| {})),
            ("no RD", Box::new(|q| q.metadata.recursion_desired = false)),
            (
                "CD and AD",
                Box::new(|q| {
                    q.metadata.checking_disabled = true;
                    q.metadata.authentic_data = true;
                }),
            ),
            (
                "EDNS 1232",
                Box::new(|q| {
                    let mut e = Edns::new();
                    e.set_max_payload(1232);
                    q.set_edns(e);
                }),
            ),
            (
                "DO and a cookie",
                Box::new(|q| {
                    use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
                    let mut e = Edns::new();
                    e.flags_mut().dnssec_ok = true;
                    e.options_mut()
                        .insert(EdnsOption::Unknown(EdnsCode::Cookie.into(), vec![1; 8]));
                    q.set_edns(e);
                }),
            ),
            (
                "class CH, type TXT",
                Box::new(|q| {
                    q.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
                    q.queries[0].set_query_type(RecordType::TXT);
                }),
            ),
        ];
        for name in ["WwW.Example.", "a.", ".", "x-Y_z.EXAMPLE.org."] {
            for (what, edit) in &edits {
                let mut q = query(name, RecordType::A);
                q.metadata.id = 0xabcd;
                edit(&mut q);
                let bytes = q.to_vec().expect("encodes");
                let wire = Key::of_wire(&bytes).unwrap_or_else(|| panic!("{name} {what}"));
                assert_eq!(Some(&wire.key), Key::of(&q).as_ref(), "{name} {what}");
                assert_eq!(wire.id, 0xabcd);
                assert_eq!(
                    wire.question,
                    &q.queries[0].to_bytes().expect("encodes")[..]
                );
                assert_eq!(wire.qtype, u16::from(q.queries[0].query_type()));
                assert_eq!(wire.payload, q.edns.as_ref().map(|e| e.max_payload()));
            }
        }
        // Not plain: left to the decoding path.
        let q = query("www.example.", RecordType::A)
            .to_vec()
            .expect("encodes");
        let mut response = q.clone();
        response[2] |= 0x80;
        let mut trailing = q.clone();
        trailing.push(0);
        let mut two = q.clone();
        two[5] = 2;
        let mut an = q.clone();
        an[7] = 1;
        for (what, bytes) in [
            ("a response", response),
            ("trailing bytes", trailing),
            ("two questions", two),
            ("an answer record", an),
            ("short", q[..q.len() - 1].to_vec()),
            ("header only", q[..12].to_vec()),
        ] {
            assert!(Key::of_wire(&bytes).is_none(), "{what}");
        }
    }

    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    #[test]
    fn hits_count_down_and_expire() {
        let t0 = Instant::now();
        let mut c = Cache::new(cfg());
        let q = query("www.example.", RecordType::A);
        let bytes = answer(&q, |m| {
            m.add_answer(a("www.example.", 60, 1));
            m.add_authority(soa(7200, 3600));
            m.add_additional(a("ns.example.", 10, 9));
            m.set_edns(Edns::new());
        });
        let key = Key::of(&q).expect("key");
        assert_eq!(
            c.insert(key.clone(), &bytes, t0),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(c.len(), 1);
        // (seconds later, answer TTL, authority TTL (capped at max_ttl 3600), additional TTL)
        for (later, want) in [
            (0.0, Some((60, 3600, 10))),
            (0.9, Some((60, 3600, 10))),
            (1.0, Some((59, 3599, 9))),
            (10.5, Some((50, 3590, 0))),
            (59.99, Some((1, 3541, 0))),
            (60.0, None),
        ] {
            let got = c.get(&key, at(t0, later)).map(|b| {
                let m = Message::from_vec(&b).expect("a cached answer parses");
                assert_eq!(m.answers[0].data.to_string(), "192.0.2.1");
                assert!(m.edns.is_some(), "the OPT survives");
                (m.answers[0].ttl, m.authorities[0].ttl, m.additionals[0].ttl)
            });
            assert_eq!(got, want, "at +{later}s");
        }
        assert_eq!(c.len(), 0, "an expired entry is dropped when looked up");
        assert_eq!(c.bytes(), 0);
        // A time before the store (a clock that went back) spends nothing.
        c.insert(key.clone(), &bytes, at(t0, 100.0))
            .expect("cached");
        let b = c.get(&key, at(t0, 99.0)).expect("a hit");
        assert_eq!(Message::from_vec(&b).expect("parses").answers[0].ttl, 60);
    }

    #[test]
    fn edns_options_are_not_kept() {
        use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
        let t0 = Instant::now();
        let q = query("www.example.", RecordType::A);
        let with_cookie = |m: &mut Message| {
            m.add_answer(a("www.example.", 60, 1));
            let mut e = Edns::new();
            e.options_mut()
                .insert(EdnsOption::Unknown(EdnsCode::Cookie.into(), vec![7; 24]));
            m.set_edns(e);
        };
        let bytes = answer(&q, with_cookie);
        let mut c = Cache::new(cfg());
        let key = Key::of(&q).expect("key");
        c.insert(key.clone(), &bytes, t0).expect("cached");
        let hit = c.get(&key, t0).expect("a hit");
        assert_eq!(
            hit.len(),
            bytes.len() - 28,
            "the cookie option (4 + 24 bytes) is cut"
        );
        let m = Message::from_vec(&hit).expect("parses");
        let edns = m.edns.expect("the OPT stays");
        assert!(edns.options().as_ref().is_empty());
        assert_eq!(m.answers[0].data.to_string(), "192.0.2.1");
        // Options in an OPT followed by another record: not cached rather than cut wrong.
        let mut moved = Message::from_vec(&bytes).expect("parses");
        let last = moved.answers[0].clone();
        moved.add_additional(last);
        let moved = moved.to_vec().expect("encodes");
        if analyse(&moved, &cfg()).is_err() {
            assert_eq!(analyse(&moved, &cfg()), Err(NotCached::Options));
        }
    }

    #[test]
    fn personalize_puts_back_id_and_case() {
        let q = query("www.example.", RecordType::A);
        let mut bytes = answer(&q, |m| {
            m.add_answer(a("www.example.", 60, 1));
        });
        let client = query("WwW.eXample.", RecordType::A);
        let question = client.queries[0].to_bytes().expect("encodes");
        assert!(personalize(&mut bytes, 0xbeef, &question));
        let m = Message::from_vec(&bytes).expect("parses");
        assert_eq!(m.metadata.id, 0xbeef);
        assert_eq!(m.queries[0].name().to_string(), "WwW.eXample.");
        let other = query("www.example.org.", RecordType::A).queries[0]
            .to_bytes()
            .expect("encodes");
        let before = bytes.clone();
        assert!(!personalize(&mut bytes, 1, &other));
        assert_eq!(bytes, before);
        assert!(!personalize(&mut bytes[..11], 1, &question));
    }

    #[test]
    fn least_recently_used_go_first_within_both_bounds() {
        let t0 = Instant::now();
        let mut c = holding(3);
        let entry = |n| entry(n, 60);
        for n in 0..3 {
            let (k, b) = entry(n);
            c.insert(k, &b, t0).expect("cached");
        }
        // Touch n0: n1 is now the least recently used and goes for n3.
        assert!(c.get(&entry(0).0, t0).is_some());
        let (k3, b3) = entry(3);
        c.insert(k3.clone(), &b3, t0).expect("cached");
        assert_eq!(c.len(), 3);
        assert!(c.get(&entry(1).0, t0).is_none());
        assert_eq!(c.order(), [entry(3).0, entry(0).0, entry(2).0]);
        // Storing a key again replaces it, no duplicate.
        c.insert(k3.clone(), &b3, t0).expect("cached");
        assert_eq!(c.len(), 3);

        // The byte budget: room for two of these answers only.
        let (k, b) = entry(9);
        let one = b.len() + 2 + Entry::cost(&k);
        let mut c = Cache::new(CacheConfig {
            bytes: 2 * one + one / 2,
            ..cfg()
        });
        for n in 0..5 {
            let (k, b) = entry(n);
            c.insert(k, &b, t0).expect("cached");
            assert!(c.bytes() <= 2 * one + one / 2);
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.order(), [entry(4).0, entry(3).0]);
        // An answer larger than the whole budget is refused and evicts nothing.
        let mut tiny = Cache::new(CacheConfig { bytes: 10, ..cfg() });
        assert_eq!(tiny.insert(k, &b, t0), Err(NotCached::TooLarge));
        // Off: nothing is stored.
        let mut off = Cache::new(CacheConfig::off());
        let (k, b) = entry(1);
        assert_eq!(off.insert(k.clone(), &b, t0), Err(NotCached::Off));
        assert!(off.get(&k, t0).is_none());
    }

    #[test]
    fn expired_entries_at_the_cold_end_go_before_live_ones() {
        let t0 = Instant::now();
        let mut c = holding(3);
        for (n, ttl) in [(0, 5), (1, 5), (2, 60)] {
            let (k, b) = entry(n, ttl);
            c.insert(k, &b, t0).expect("cached");
        }
        let (k, b) = entry(3, 60);
        c.insert(k, &b, at(t0, 10.0)).expect("cached");
        assert_eq!(c.order(), [entry(3, 60).0, entry(2, 60).0]);
    }

    proptest! {
        /// Any sequence of inserts and lookups at increasing times: the bounds always hold, the
        /// list and the map agree, and a hit never returns a TTL above what was stored minus
        /// the time spent.
        #[test]
        fn bounds_and_ttls_hold(
            entries in 1usize..8,
            ops in proptest::collection::vec((0u32..12, 0u32..120, 0u64..3000, any::<bool>()), 1..200),
        ) {
            let t0 = Instant::now();
            let mut c = Cache::new(CacheConfig { entries, bytes: 2_000, ..cfg() });
            let mut now_ms = 0u64;
            let mut stored: HashMap<Key, (u32, u64)> = HashMap::new();
            for (n, ttl, step, look) in ops {
                now_ms += step;
                let now = t0 + Duration::from_millis(now_ms);
                let q = query(&format!("N{n}.Example."), RecordType::A);
                let key = Key::of(&q).expect("key");
                if look {
                    if let Some(b) = c.get(&key, now) {
                        let (ttl, at_ms) = stored[&key];
                        let spent = (now_ms - at_ms) / 1000;
                        prop_assert!(u64::from(ttl) > spent, "a hit after expiry");
                        let m = Message::from_vec(&b).expect("parses");
                        prop_assert_eq!(u64::from(m.answers[0].ttl), u64::from(ttl) - spent);
                    }
                } else {
                    let bytes = answer(&q, |m| {
                m.add_answer(a(&format!("n{n}.example."), ttl, 1));
            });
                    let r = c.insert(key.clone(), &bytes, now);
                    prop_assert_eq!(r.is_ok(), ttl > 0);
                    if r.is_ok() {
                        stored.insert(key, (ttl, now_ms));
                    }
                }
                prop_assert!(c.len() <= entries);
                prop_assert!(c.bytes() <= 2_000);
                prop_assert_eq!(c.order().len(), c.len());
                let sum: usize = c.slab.iter().flatten().map(|n| n.entry.size(&n.key)).sum();
                prop_assert_eq!(sum, c.bytes());
            }
        }

        /// Random bytes never panic the wire reader; whatever it reads decodes to the same key.
        #[test]
        fn wire_keys_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Some(w) = Key::of_wire(&bytes)
                && let Ok(m) = Message::from_vec(&bytes)
            {
                prop_assert_eq!(Some(w.key), Key::of(&m));
            }
        }

        /// Random bytes never panic the reader, and whatever it accepts has its TTL offsets
        /// inside the message.
        #[test]
        fn analyse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(c) = analyse(&bytes, &cfg()) {
                prop_assert!(c.ttl > 0);
                for at in c.ttl_at {
                    prop_assert!(usize::from(at) + 4 <= bytes.len());
                }
            }
        }
    }
}
