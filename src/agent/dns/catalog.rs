//! The name map the DNS answers from: an immutable [`Snapshot`] built at publish time and
//! swapped atomically (arc-swap) into a [`DnsCatalog`]. Queries do one `load()` and one hash
//! lookup; no locks on the query path. Depends on `model` and hickory-proto only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use hickory_proto::rr::rdata::{NS, SOA};
use hickory_proto::rr::{Name, RData, Record};

use super::DnsConfig;
use super::fast::FastTable;
use super::records::{NEGATIVE_TTL, NS_TTL, Node, SrvTarget, key_of, ns_key, split};
use super::tasks::{self, DCOS_TASK_ZONES, GROUP_MESOS, GROUP_VIP, MESOS_ZONE};
use crate::model::{AppTasks, DEFAULT_ZONE, Protocol, Vip};

/// Zones answered besides `DnsConfig::zone` (DC/OS compatible aliases).
pub const ZONE_ALIASES: [&str; 3] = [
    "dclb.thisdcos.directory",
    "l4lb.thisdcos.global",
    "dclb.thisdcos.global",
];

/// One zone we are authoritative for, with its prepared apex records.
#[derive(Debug)]
pub(crate) struct Zone {
    /// Lowercase, fully qualified apex.
    pub(crate) apex: Name,
    /// Which names live here: the first byte of their node keys (`tasks::GROUP_*`).
    pub(crate) group: u8,
    /// Apex labels, lowercase, in wire order.
    labels: Vec<Box<[u8]>>,
    pub(crate) soa: Record,
    pub(crate) ns: Record,
}

/// The immutable name map served between two publishes.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// Longest apex first, so nested zones match the most specific one.
    pub(crate) zones: Vec<Zone>,
    /// Key: the zone's group byte, then the name relative to the zone, lowercase, as
    /// length-prefixed labels (see [`key_of`]). The VIP zone and its aliases share group 0;
    /// each task zone has its own. Only the names added here (apexes, `ns` names, empty
    /// non-terminals): those of VIPs and tasks are looked up in the two bases, not copied
    /// (a copy doubled an agent's memory for 80,000 tasks' names).
    nodes: HashMap<Vec<u8>, Node>,
    pub(crate) ttl: u32,
    pub(crate) serial: u32,
    /// The VIP names published (hosts and SRV names, before `ns` names and ancestors), kept
    /// so publishing tasks or nameservers rebuilds without the VIPs, and the other way round.
    vip_base: Arc<HashMap<Vec<u8>, Node>>,
    /// The task names published (see `tasks::collect`).
    task_base: Arc<HashMap<Vec<u8>, Node>>,
    /// Pre-encoded answers for plain A/AAAA/SRV queries of every name under every zone.
    pub(crate) fast: FastTable,
}

impl Snapshot {
    /// Which zone `name` is in (index into `zones`) and its key relative to that zone, written
    /// into `key`. `None` outside every zone.
    pub(crate) fn locate(&self, name: &Name, key: &mut Vec<u8>) -> Option<usize> {
        let n = name.num_labels() as usize;
        for (i, zone) in self.zones.iter().enumerate() {
            let k = zone.labels.len();
            if n < k {
                continue;
            }
            let tail_matches = name
                .iter()
                .skip(n - k)
                .zip(zone.labels.iter())
                .all(|(a, b)| a.eq_ignore_ascii_case(b));
            if tail_matches {
                key_of(name.iter().take(n - k), key);
                key.insert(0, zone.group);
                return Some(i);
            }
        }
        None
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Node> {
        lookup(&self.nodes, &self.vip_base, &self.task_base, key)
    }

    /// Every name served, each once.
    pub(crate) fn all_nodes(&self) -> impl Iterator<Item = (&Vec<u8>, &Node)> {
        every(&self.nodes, &self.vip_base, &self.task_base)
    }

    /// The host and SRV nodes of `vips` (group-0 keys), before `ns` names and ancestors.
    /// `zone_names`: the VIP zone and its aliases.
    fn collect(zone_names: &[Name], vips: &[&Vip]) -> HashMap<Vec<u8>, Node> {
        let mut hosts: HashMap<Vec<u8>, (Name, BTreeSet<IpAddr>)> = HashMap::new();
        // (srv key) -> (host key, port)
        let mut srvs: HashMap<Vec<u8>, BTreeSet<(Vec<u8>, u16)>> = HashMap::new();
        let mut key = Vec::new();
        for vip in vips {
            let Some(vn) = &vip.name else { continue };
            let Ok(host) = Name::from_ascii(format!("{}.{}", vn.label, vn.framework)) else {
                tracing::warn!(label = %vn.label, framework = %vn.framework, "VIP name is not a valid DNS name; not served");
                continue;
            };
            let proto = match vip.key.protocol {
                Protocol::Tcp => "_tcp",
                Protocol::Udp => "_udp",
            };
            let Ok(srv) = Name::from_ascii(format!("_{}.{proto}.{}", vn.label, vn.framework))
            else {
                tracing::warn!(label = %vn.label, "SRV name is not a valid DNS name; not served");
                continue;
            };
            // Both must fit inside every zone: check against the longest apex.
            let longest = zone_names.iter().map(Name::len).max().unwrap_or(0);
            if srv.len().max(host.len()) + longest > 254 {
                tracing::warn!(label = %vn.label, "VIP name too long for DNS; not served");
                continue;
            }
            key_of(host.iter(), &mut key);
            let host_key = key.clone();
            hosts
                .entry(host_key.clone())
                .or_insert_with(|| (host.clone(), BTreeSet::new()))
                .1
                .insert(vip.key.ip);
            key_of(srv.iter(), &mut key);
            srvs.entry(key.clone())
                .or_default()
                .insert((host_key, vip.key.port));
        }

        let mut nodes: HashMap<Vec<u8>, Node> = HashMap::new();
        for (key, targets) in &srvs {
            let targets = targets
                .iter()
                .filter_map(|(host_key, port)| {
                    let (host, ips) = hosts.get(host_key)?;
                    let (v4, v6) = split(ips);
                    Some(SrvTarget {
                        port: *port,
                        host: host.clone(),
                        v4,
                        v6,
                    })
                })
                .collect();
            nodes.insert(key.clone(), Node::Srv(targets));
        }
        for (key, (_, ips)) in &hosts {
            let (v4, v6) = split(ips);
            nodes.insert(key.clone(), Node::Host { v4, v6 });
        }
        nodes
            .into_iter()
            .map(|(mut k, n)| {
                k.insert(0, GROUP_VIP);
                (k, n)
            })
            .collect()
    }

    /// The snapshot of the VIP and task names with, in every zone, the apex, the `ns` name
    /// answering `nameservers`, every empty non-terminal, and the fast path's answers.
    fn build(
        zone_names: &[(Name, u8)],
        ttl: u32,
        serial: u32,
        vip_base: Arc<HashMap<Vec<u8>, Node>>,
        task_base: Arc<HashMap<Vec<u8>, Node>>,
        nameservers: &[IpAddr],
    ) -> Snapshot {
        let zones: Vec<Zone> = zone_names
            .iter()
            .map(|(apex, group)| make_zone(apex, *group, ttl, serial))
            .collect();
        let mut nodes = HashMap::new();
        // `ns.<zone>`, the target of the zone's NS and SOA records: stock resolvers that prime
        // the zone (BIND stub zones, unbound's stub-prime) need its address.
        let mut ns = BTreeSet::new();
        ns.extend(nameservers.iter().copied());
        let (v4, v6) = split(&ns);
        for zone in &zones {
            nodes.insert(vec![zone.group], Node::Apex);
            nodes.insert(
                ns_key(zone.group).to_vec(),
                Node::Host {
                    v4: v4.clone(),
                    v6: v6.clone(),
                },
            );
        }
        // Every proper ancestor of a name is an empty non-terminal unless it holds records.
        let mut empty: HashMap<Vec<u8>, Node> = HashMap::new();
        let mut ancestor = Vec::with_capacity(256);
        for k in every(&nodes, &vip_base, &task_base).map(|(k, _)| k) {
            let Some((&group, mut rest)) = k.split_first() else {
                continue;
            };
            while let Some((&len, tail)) = rest.split_first() {
                rest = tail.get(len as usize..).unwrap_or(&[]);
                ancestor.clear();
                ancestor.push(group);
                ancestor.extend_from_slice(rest);
                if lookup(&nodes, &vip_base, &task_base, &ancestor).is_none()
                    && !empty.contains_key(&ancestor)
                {
                    empty.insert(ancestor.clone(), Node::Empty);
                }
            }
        }
        nodes.extend(empty);
        let mut fast = FastTable::default();
        for zone in &zones {
            for (key, node) in every(&nodes, &vip_base, &task_base) {
                if let Some((&group, rel)) = key.split_first()
                    && group == zone.group
                {
                    fast.add(rel, &zone.labels, ttl, node);
                }
            }
        }
        Snapshot {
            zones,
            nodes,
            ttl,
            serial,
            vip_base,
            task_base,
            fast,
        }
    }
}

/// The node at `key`: a name added by the snapshot first (as it overrides), then a VIP's, then
/// a task's.
fn lookup<'a>(
    own: &'a HashMap<Vec<u8>, Node>,
    vips: &'a HashMap<Vec<u8>, Node>,
    tasks: &'a HashMap<Vec<u8>, Node>,
    key: &[u8],
) -> Option<&'a Node> {
    own.get(key)
        .or_else(|| vips.get(key))
        .or_else(|| tasks.get(key))
}

/// Every (key, node) of the three maps, each key once, as [`lookup`] resolves it.
fn every<'a>(
    own: &'a HashMap<Vec<u8>, Node>,
    vips: &'a HashMap<Vec<u8>, Node>,
    tasks: &'a HashMap<Vec<u8>, Node>,
) -> impl Iterator<Item = (&'a Vec<u8>, &'a Node)> {
    own.iter()
        .chain(vips.iter().filter(move |(k, _)| !own.contains_key(*k)))
        .chain(
            tasks
                .iter()
                .filter(move |(k, _)| !own.contains_key(*k) && !vips.contains_key(*k)),
        )
}

fn make_zone(apex: &Name, group: u8, ttl: u32, serial: u32) -> Zone {
    let ns_name = apex
        .clone()
        .prepend_label("ns")
        .unwrap_or_else(|_| apex.clone());
    let rname = apex
        .clone()
        .prepend_label("hostmaster")
        .unwrap_or_else(|_| apex.clone());
    // Refresh/retry/expire are for secondaries and stub zones (which re-prime every refresh).
    let soa = SOA::new(ns_name.clone(), rname, serial, 60, 30, 86_400, NEGATIVE_TTL);
    Zone {
        apex: apex.clone(),
        group,
        labels: apex.iter().map(|l| l.to_ascii_lowercase().into()).collect(),
        soa: Record::from_rdata(apex.clone(), ttl, RData::SOA(soa)),
        ns: Record::from_rdata(apex.clone(), NS_TTL, RData::NS(NS(ns_name))),
    }
}

impl Zone {
    /// `ns.<apex>`, the zone's nameserver.
    pub(crate) fn ns_name(&self) -> Name {
        match &self.ns.data {
            RData::NS(NS(name)) => name.clone(),
            _ => self.apex.clone(),
        }
    }
}

/// Parse a zone name; `None` if it is not a valid domain name.
fn parse_zone(s: &str) -> Option<Name> {
    let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
    if s.is_empty() {
        return None;
    }
    let mut name = Name::from_ascii(&s).ok()?;
    name.set_fqdn(true);
    Some(name)
}

struct Inner {
    current: ArcSwap<Snapshot>,
    /// Every zone served with its group, longest apex first.
    zone_names: Vec<(Name, u8)>,
    /// The VIP zone and its aliases.
    vip_zones: Vec<Name>,
    /// Serve the `mesos` task zone.
    mesos: bool,
    /// The longest relative task name that fits under every task zone.
    task_room: usize,
    ttl: u32,
    serial: AtomicU32,
    /// Serialises publishers so serials and snapshots go out in the same order, and holds the
    /// addresses `ns.<zone>` answers. Never taken on the query path.
    publish: Mutex<Vec<IpAddr>>,
}

/// The names served, swapped atomically with each table. Clone + Send + Sync; clones share
/// the same map.
#[derive(Clone)]
pub struct DnsCatalog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DnsCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snap = self.inner.current.load();
        f.debug_struct("DnsCatalog")
            .field("zones", &self.inner.zone_names)
            .field("names", &snap.all_nodes().count())
            .field("fast_answers", &snap.fast.len())
            .field("serial", &snap.serial)
            .finish()
    }
}

impl DnsCatalog {
    /// An empty catalog (only the zone apexes) for `cfg.zone` and its aliases. An invalid
    /// `cfg.zone` is logged and replaced by the default zone.
    pub fn new(cfg: &DnsConfig) -> Self {
        let primary = parse_zone(&cfg.zone).unwrap_or_else(|| {
            tracing::error!(zone = %cfg.zone, "invalid DNS zone; using {DEFAULT_ZONE}");
            parse_zone(DEFAULT_ZONE).unwrap_or_else(Name::root)
        });
        let mut zone_names = vec![primary];
        for alias in ZONE_ALIASES {
            if let Some(z) = parse_zone(alias)
                && !zone_names.contains(&z)
            {
                zone_names.push(z);
            }
        }
        let vip_zones = zone_names.clone();
        let mut task_zones: Vec<(&str, u8)> = DCOS_TASK_ZONES.to_vec();
        if cfg.mesos {
            task_zones.push((MESOS_ZONE, GROUP_MESOS));
        }
        let mut zone_names: Vec<(Name, u8)> = zone_names
            .into_iter()
            .map(|z| (z, GROUP_VIP))
            .chain(
                task_zones
                    .iter()
                    .filter_map(|(z, g)| Some((parse_zone(z)?, *g))),
            )
            .collect();
        let longest_task_zone = zone_names
            .iter()
            .filter(|(_, g)| *g != GROUP_VIP)
            .map(|(z, _)| z.len())
            .max()
            .unwrap_or(0);
        zone_names.sort_by_key(|(z, _)| std::cmp::Reverse(z.num_labels()));
        let serial = 1;
        let snap = Snapshot::build(
            &zone_names,
            cfg.ttl,
            serial,
            Arc::default(),
            Arc::default(),
            &[],
        );
        DnsCatalog {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(snap),
                zone_names,
                vip_zones,
                mesos: cfg.mesos,
                task_room: 254usize.saturating_sub(longest_task_zone),
                ttl: cfg.ttl,
                serial: AtomicU32::new(serial),
                publish: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Replace the served names with exactly these VIPs (the caller passes only VIPs that are
    /// live: address installed and listener bound). IP VIPs (name `None`) are ignored. Bumps
    /// the SOA serial.
    pub fn publish<'a>(&self, live: impl IntoIterator<Item = &'a Vip>) {
        let vips: Vec<&Vip> = live.into_iter().collect();
        let base = Arc::new(Snapshot::collect(&self.inner.vip_zones, &vips));
        self.swap(None, Some(base), None);
    }

    /// Replace the task names with those of these apps' running tasks (see `tasks`). Bumps
    /// the SOA serial.
    pub fn publish_tasks(&self, apps: &BTreeMap<String, Arc<AppTasks>>) {
        let base = Arc::new(tasks::collect(apps, self.inner.mesos, self.inner.task_room));
        self.swap(None, None, Some(base));
    }

    /// Answer `ns.<zone>` (the name the zones' NS and SOA records point at) with these
    /// addresses, e.g. the addresses the server listens on. Bumps the SOA serial.
    pub fn set_nameservers(&self, addrs: &[IpAddr]) {
        self.swap(Some(addrs.to_vec()), None, None);
    }

    /// Build and store the next snapshot, replacing what is given and keeping the rest of the
    /// current one.
    fn swap(
        &self,
        nameservers: Option<Vec<IpAddr>>,
        vip_base: Option<Arc<HashMap<Vec<u8>, Node>>>,
        task_base: Option<Arc<HashMap<Vec<u8>, Node>>>,
    ) {
        let mut ns = self
            .inner
            .publish
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(addrs) = nameservers {
            *ns = addrs;
        }
        let serial = self
            .inner
            .serial
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        let current = self.inner.current.load();
        let vip_base = vip_base.unwrap_or_else(|| current.vip_base.clone());
        let task_base = task_base.unwrap_or_else(|| current.task_base.clone());
        let snap = Snapshot::build(
            &self.inner.zone_names,
            self.inner.ttl,
            serial,
            vip_base,
            task_base,
            &ns,
        );
        self.inner.current.store(Arc::new(snap));
    }

    /// The current snapshot (one atomic load).
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.current.load()
    }

    /// The current SOA serial.
    pub fn serial(&self) -> u32 {
        self.inner.current.load().serial
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::named;

    fn key(s: &str) -> Vec<u8> {
        let mut k = Vec::new();
        if !s.is_empty() {
            key_of(Name::from_ascii(s).expect("name").iter(), &mut k);
        }
        k.insert(0, GROUP_VIP);
        k
    }

    fn vip_nodes(s: &Snapshot) -> usize {
        s.all_nodes().filter(|(k, _)| k[0] == GROUP_VIP).count()
    }

    #[test]
    fn builds_hosts_srv_and_empty_non_terminals() {
        let cat = DnsCatalog::new(&DnsConfig::default());
        let a = named("api.hello-world", "11.0.0.1", 80, Protocol::Tcp);
        let b = named("api.hello-world", "11.0.0.1", 443, Protocol::Tcp);
        let c = named("api.hello-world", "fd01:c::1", 80, Protocol::Tcp);
        let mut ip_vip = a.clone();
        ip_vip.name = None;
        ip_vip.key.ip = "10.9.9.9".parse().expect("ip");
        cat.publish([&a, &b, &c, &ip_vip]);
        let s = cat.load();
        assert_eq!(s.serial, 2);
        assert_eq!(
            s.get(&key("api.hello-world.marathon")),
            Some(&Node::Host {
                v4: vec!["11.0.0.1".parse().expect("ip")].into(),
                v6: vec!["fd01:c::1".parse().expect("ip")].into(),
            })
        );
        let Some(Node::Srv(t)) = s.get(&key("_api.hello-world._tcp.marathon")) else {
            panic!("no srv")
        };
        assert_eq!(t.iter().map(|t| t.port).collect::<Vec<_>>(), vec![80, 443]);
        for ent in ["marathon", "hello-world.marathon", "_tcp.marathon"] {
            assert_eq!(s.get(&key(ent)), Some(&Node::Empty), "{ent}");
        }
        assert_eq!(s.get(&key("")), Some(&Node::Apex));
        assert_eq!(s.get(&key("x.api.hello-world.marathon")), None);
        assert_eq!(s.get(&key("_udp.marathon")), None);
        // The nameserver's name: no addresses until the server sets them.
        assert_eq!(
            s.get(&key("ns")),
            Some(&Node::Host {
                v4: vec![].into(),
                v6: vec![].into()
            })
        );
        // IP VIPs are not served; only names, their ancestors and `ns` are.
        assert_eq!(vip_nodes(&s), 8);
        drop(s);
        cat.set_nameservers(&["198.51.100.2".parse().expect("ip")]);
        let s = cat.load();
        assert_eq!(s.serial, 3);
        assert!(
            s.get(&key("api.hello-world.marathon")).is_some(),
            "VIPs kept"
        );
        assert_eq!(
            s.get(&key("ns")),
            Some(&Node::Host {
                v4: vec!["198.51.100.2".parse().expect("ip")].into(),
                v6: vec![].into()
            })
        );
    }

    #[test]
    fn locate_matches_zone_and_aliases_case_insensitively() {
        let cat = DnsCatalog::new(&DnsConfig::default());
        let s = cat.load();
        let mut k = Vec::new();
        for (name, inside) in [
            ("Web.Marathon.L4LB.thisdcos.directory.", true),
            ("web.marathon.dclb.thisdcos.global.", true),
            ("l4lb.thisdcos.directory.", true),
            ("thisdcos.directory.", false),
            ("example.com.", false),
            (".", false),
        ] {
            let n = Name::from_ascii(name).expect("name");
            assert_eq!(s.locate(&n, &mut k).is_some(), inside, "{name}");
            if name.starts_with("Web") {
                assert_eq!(k, key("web.marathon"));
            }
        }
    }

    #[test]
    fn custom_zone_and_publish_replaces_everything() {
        let cfg = DnsConfig {
            zone: "VIPs.Example.".into(),
            ..DnsConfig::default()
        };
        let cat = DnsCatalog::new(&cfg);
        cat.publish([&named("web", "11.0.0.1", 80, Protocol::Tcp)]);
        let mut k = Vec::new();
        let n = Name::from_ascii("web.marathon.vips.example.").expect("name");
        let s = cat.load();
        assert!(s.locate(&n, &mut k).is_some());
        assert!(s.get(&k).is_some());
        cat.publish([]);
        assert!(cat.load().get(&k).is_none());
        assert_eq!(cat.serial(), 3);
    }

    #[test]
    fn invalid_names_are_skipped_not_fatal() {
        let cat = DnsCatalog::new(&DnsConfig::default());
        let long_label = named(&"x".repeat(64), "11.0.0.1", 80, Protocol::Tcp);
        let long_name = named(
            &vec!["y".repeat(60); 4].join("."),
            "11.0.0.2",
            80,
            Protocol::Tcp,
        );
        let empty = named("", "11.0.0.3", 80, Protocol::Tcp);
        let ok = named("ok", "11.0.0.4", 80, Protocol::Udp);
        cat.publish([&long_label, &long_name, &empty, &ok]);
        let s = cat.load();
        assert!(s.get(&key("ok.marathon")).is_some());
        assert!(s.get(&key("_ok._udp.marathon")).is_some());
        assert!(
            vip_nodes(&s) <= 7,
            "{:?}",
            s.all_nodes().map(|(k, _)| k).collect::<Vec<_>>()
        );
    }

    #[test]
    fn invalid_zone_falls_back_to_default() {
        let cat = DnsCatalog::new(&DnsConfig {
            zone: "..".into(),
            ..DnsConfig::default()
        });
        let mut k = Vec::new();
        let n = Name::from_ascii("l4lb.thisdcos.directory.").expect("name");
        assert!(cat.load().locate(&n, &mut k).is_some());
        // The VIP zone, its 3 aliases, and the 4 task zones.
        assert_eq!(cat.load().zones.len(), 8);
    }
}
