//! The embedded DNS (as the original specification's DNS section asks): authoritative for
//! the VIP zone and its aliases, answering A/AAAA/SRV/SOA/NS for live named VIPs from a map
//! swapped atomically with each table, and forwarding everything else to upstream resolvers
//! (or refusing it).
//!
//! - `catalog`: the name map ([`DnsCatalog`], published by the agent).
//! - `answer`: pure: parsed query + catalog snapshot → response (the reference path).
//! - `cache`: pure: the cache of forwarded answers (key, TTLs, LRU bounds).
//! - `fast`: answers pre-encoded at publish time for plain A/AAAA/SRV queries over UDP.
//! - `upstream`: forwarding to the upstream resolvers (two at once, TCP retry on truncation;
//!   `UpstreamForwarder`), over pooled UDP sockets to each upstream (`upstream::pool`).
//! - `resolv`: the host's resolv.conf: default upstreams, and managing it to point at l4lb.
//! - `server`: the UDP/TCP I/O shells ([`serve`]).
//! - `tasks`: task names (the Mesos-DNS job) from the running tasks in the table.
//! - `listen`: start-up on a node ([`listen::listen`]): listen addresses kept on the VIP link,
//!   sockets bound, the resolv.conf policy.
//!
//! Depends on `model` only, but for `listen`, which also uses `netif`; knows nothing of
//! `source` or the data plane (`agent::forward`).

mod answer;
mod cache;
mod catalog;
mod fast;
pub mod listen;
mod records;
pub mod resolv;
mod server;
pub mod tasks;
mod upstream;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use cache::CacheConfig;
pub use catalog::{DnsCatalog, ZONE_ALIASES};
pub use server::{ServerLimits, serve};

/// DNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// The primary zone, default `l4lb.thisdcos.directory`; [`ZONE_ALIASES`] are served too.
    pub zone: String,
    /// TTL of every record served (and the negative-caching TTL), seconds.
    pub ttl: u32,
    /// Resolvers for names outside the zones; empty: such queries get REFUSED.
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for an upstream answer before answering SERVFAIL.
    pub upstream_timeout: Duration,
    /// Answer task names in the `mesos` zone (Mesos-DNS's names); off: `.mesos` is forwarded
    /// like any other name, to an existing Mesos-DNS. The DC/OS task zones are always served.
    pub mesos: bool,
    /// The cache of forwarded answers.
    pub cache: CacheConfig,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            zone: crate::model::DEFAULT_ZONE.to_string(),
            ttl: 5,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            mesos: true,
            cache: CacheConfig::default(),
        }
    }
}

/// The DNS listen addresses l4lb must install before binding them: specific addresses that
/// are not loopback and not already on one of the host's interfaces (`host`), e.g. the
/// DC/OS resolver addresses 198.51.100.1-3. Sorted, unique.
pub fn addresses_to_install(listen: &[SocketAddr], host: &BTreeSet<IpAddr>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = listen
        .iter()
        .map(|a| a.ip().to_canonical())
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback() && !host.contains(ip))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Answer one query packet from the catalog alone, as the server would with no upstreams
/// (names outside the zones get REFUSED), within the UDP (`udp`) or TCP size limit. `None`:
/// the packet is dropped (a response, or shorter than a header). The server's pure core,
/// exposed for benchmarks and embedding.
pub fn answer_packet(catalog: &DnsCatalog, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
    let transport = if udp {
        answer::Transport::Udp
    } else {
        answer::Transport::Tcp
    };
    let snap = catalog.load();
    if udp {
        let mut out = Vec::with_capacity(512);
        if snap.fast.answer(bytes, false, &mut out).is_some() {
            return Some(out);
        }
    }
    match answer::handle(&snap, bytes, false, transport) {
        (answer::Outcome::Reply(resp), limit) => answer::encode(&resp, limit),
        _ => None,
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    r#type: &'static str,
    rcode: &'static str,
}

/// The `type` labels of `l4lb_dns_queries_total` (bounded: see `answer::type_label`).
const TYPE_LABELS: [&str; 13] = [
    "none", "A", "AAAA", "SRV", "SOA", "NS", "ANY", "PTR", "MX", "TXT", "CNAME", "HTTPS", "other",
];
const TYPE_A_IDX: u8 = 1;
const TYPE_AAAA_IDX: u8 = 2;
const TYPE_SRV_IDX: u8 = 3;
/// The `rcode` labels (see `answer::rcode_label`).
const RCODE_LABELS: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];
const RCODE_NOERROR_IDX: u8 = 0;
const SLOTS: usize = TYPE_LABELS.len() * RCODE_LABELS.len();

/// DNS metrics: `l4lb_dns_queries_total{type,rcode}`, `l4lb_dns_forwarded_total`,
/// `l4lb_dns_upstream_failures_total`, and the cache's `l4lb_dns_cache_hits_total`,
/// `l4lb_dns_cache_misses_total`, `l4lb_dns_cache_entries` and
/// `l4lb_dns_forward_coalesced_total`. Cheap to clone (shared counters).
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    /// A handle on the family's counter for each known (type, rcode), taken on first use so
    /// the query path skips the family's lock and hash (and unused series stay unexported).
    slots: Arc<[OnceLock<Counter>; SLOTS]>,
    forwarded: Counter,
    upstream_failures: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_entries: Gauge,
    coalesced: Counter,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            queries: Family::default(),
            slots: Arc::new([const { OnceLock::new() }; SLOTS]),
            forwarded: Counter::default(),
            upstream_failures: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_entries: Gauge::default(),
            coalesced: Counter::default(),
        }
    }
}

impl DnsMetrics {
    /// Create the metrics and register them (the registry adds the `l4lb_` prefix only if it
    /// was made with one, so the names here carry it).
    pub fn new(registry: &mut Registry) -> Self {
        let m = DnsMetrics::default();
        registry.register(
            "dns_queries",
            "DNS queries answered, by query type and response code",
            m.queries.clone(),
        );
        registry.register(
            "dns_forwarded",
            "DNS queries forwarded to upstream resolvers",
            m.forwarded.clone(),
        );
        registry.register(
            "dns_upstream_failures",
            "Forwarded DNS queries that got no usable upstream answer (answered SERVFAIL)",
            m.upstream_failures.clone(),
        );
        registry.register(
            "dns_cache_hits",
            "Forwarded-name queries answered from the cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "dns_cache_misses",
            "Forwarded-name queries the cache could not answer",
            m.cache_misses.clone(),
        );
        registry.register(
            "dns_cache_entries",
            "Answers in the cache of forwarded names",
            m.cache_entries.clone(),
        );
        registry.register(
            "dns_forward_coalesced",
            "Queries that waited for an identical query already upstream instead of forwarding",
            m.coalesced.clone(),
        );
        m
    }

    pub(crate) fn query(&self, qtype: &'static str, rcode: &'static str) {
        let t = TYPE_LABELS.iter().position(|l| *l == qtype);
        let r = RCODE_LABELS.iter().position(|l| *l == rcode);
        match (t, r) {
            (Some(t), Some(r)) => self.query_slot(t as u8, r as u8),
            _ => {
                self.queries
                    .get_or_create(&QueryLabels {
                        r#type: qtype,
                        rcode,
                    })
                    .inc();
            }
        }
    }

    /// Count a query by label indices (into [`TYPE_LABELS`] and [`RCODE_LABELS`]).
    fn query_slot(&self, t: u8, r: u8) {
        let (t, r) = (t as usize, r as usize);
        let Some(slot) = self.slots.get(t * RCODE_LABELS.len() + r) else {
            return;
        };
        slot.get_or_init(|| {
            self.queries
                .get_or_create(&QueryLabels {
                    r#type: TYPE_LABELS[t],
                    rcode: RCODE_LABELS[r],
                })
                .clone()
        })
        .inc();
    }

    /// Count a query answered NOERROR by the fast path (`type_idx` into [`TYPE_LABELS`]).
    pub(crate) fn answered_fast(&self, type_idx: u8) {
        self.query_slot(type_idx, RCODE_NOERROR_IDX);
    }

    pub(crate) fn forwarded(&self) {
        self.forwarded.inc();
    }

    pub(crate) fn upstream_failure(&self) {
        self.upstream_failures.inc();
    }

    pub(crate) fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    pub(crate) fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    pub(crate) fn cache_entries(&self, n: usize) {
        self.cache_entries.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn coalesced(&self) {
        self.coalesced.inc();
    }

    /// Cache hits, misses and entries now (for tests and the API).
    pub fn cache_counts(&self) -> (u64, u64, i64) {
        (
            self.cache_hits.get(),
            self.cache_misses.get(),
            self.cache_entries.get(),
        )
    }

    /// Queries that joined an identical one in flight.
    pub fn coalesced_count(&self) -> u64 {
        self.coalesced.get()
    }

    /// Queries counted so far with this type and rcode label (for tests and the API).
    pub fn queries_with(&self, qtype: &'static str, rcode: &'static str) -> u64 {
        self.queries
            .get_or_create(&QueryLabels {
                r#type: qtype,
                rcode,
            })
            .get()
    }

    /// Queries forwarded so far.
    pub fn forwarded_count(&self) -> u64 {
        self.forwarded.get()
    }

    /// Upstream failures so far.
    pub fn upstream_failure_count(&self) -> u64 {
        self.upstream_failures.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_registered_with_their_names() {
        let mut registry = Registry::with_prefix("l4lb");
        let m = DnsMetrics::new(&mut registry);
        m.query("A", "NOERROR");
        m.query("A", "NOERROR");
        m.forwarded();
        m.upstream_failure();
        m.cache_hit();
        m.cache_miss();
        m.cache_miss();
        m.cache_entries(3);
        m.coalesced();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for want in [
            "l4lb_dns_queries_total{type=\"A\",rcode=\"NOERROR\"} 2",
            "l4lb_dns_forwarded_total 1",
            "l4lb_dns_upstream_failures_total 1",
            "l4lb_dns_cache_hits_total 1",
            "l4lb_dns_cache_misses_total 2",
            "l4lb_dns_cache_entries 3",
            "l4lb_dns_forward_coalesced_total 1",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert_eq!(m.queries_with("A", "NOERROR"), 2);
    }

    #[test]
    fn only_foreign_specific_listen_addresses_are_installed() {
        let sa = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let host: BTreeSet<IpAddr> = ["198.18.0.5".parse().expect("ip")].into();
        let listen = [
            sa("198.51.100.2:53"),
            sa("198.51.100.1:53"),
            sa("198.51.100.1:5454"),
            sa("127.0.0.1:53"),
            sa("0.0.0.0:53"),
            sa("[::]:53"),
            sa("[::1]:53"),
            sa("198.18.0.5:53"),
            sa("[fd00::53]:53"),
        ];
        assert_eq!(
            addresses_to_install(&listen, &host),
            ["198.51.100.1", "198.51.100.2", "fd00::53"].map(|s| s.parse::<IpAddr>().expect("ip"))
        );
        assert!(addresses_to_install(&[], &host).is_empty());
    }

    #[test]
    fn answer_packet_answers_and_drops() {
        use hickory_proto::op::{Message, Query, ResponseCode};
        use hickory_proto::rr::{Name, RecordType};
        let cat = DnsCatalog::new(&DnsConfig::default());
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("l4lb.thisdcos.directory.").expect("name"),
            RecordType::SOA,
        ));
        let bytes = q.to_vec().expect("encode");
        let out = answer_packet(&cat, &bytes, true).expect("an answer");
        let resp = Message::from_vec(&out).expect("parse");
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(resp.answers.len(), 1);
        assert!(answer_packet(&cat, &bytes[..4], true).is_none());
    }
}
