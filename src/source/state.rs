//! The controller's memory between source reads: each app's, pod's or Mesos task's
//! contribution, the sticky allocator, and the last published table. Pure apart from the clock
//! value passed in: a snapshot replaces every contribution, an event replaces one, and [`TableState::rebuild`] publishes a
//! new version only when the VIPs actually changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};

use super::entries::{
    Contribution, Rejection, TOO_MANY_BACKENDS, all_tasks_of, app_tasks, assemble, limit_backends,
    name_families, of_family,
};
use crate::labels::{IpPolicy, VipLabel};
use crate::model::{Backend, Protocol, Vip, VipKey, VipName, VipTable};
use crate::vip_alloc::{Family, VipAllocator};

/// Settings that shape the table.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    pub framework: String,
    pub policy: IpPolicy,
    pub vip_cidr: Ipv4Net,
    pub vip_cidr6: Ipv6Net,
    /// A VIP with more backends than this is left out and its labels rejected
    /// (`--max-backends-per-vip`).
    pub max_backends_per_vip: usize,
}

/// `--max-backends-per-vip` by default: far above any real service, far below what would
/// let one label take an agent's memory or the kernel path's backend map (262,144 slots).
pub const DEFAULT_MAX_BACKENDS_PER_VIP: usize = 10_000;

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            framework: "marathon".into(),
            policy: IpPolicy::default(),
            vip_cidr: Ipv4Net::new(std::net::Ipv4Addr::new(11, 0, 0, 0), 8).unwrap_or_default(),
            vip_cidr6: Ipv6Net::new(std::net::Ipv6Addr::new(0xfd01, 0xc, 0, 0, 0, 0, 0, 0), 64)
                .unwrap_or_default(),
            max_backends_per_vip: DEFAULT_MAX_BACKENDS_PER_VIP,
        }
    }
}

/// What a rebuild produced.
#[derive(Debug)]
pub struct Rebuilt {
    /// The new table, when its VIPs differ from the last published one.
    pub table: Option<Arc<VipTable>>,
    /// Rejections not seen in the previous build (to log and count once).
    pub new_rejections: Vec<Rejection>,
}

/// The indices the incremental path needs, rebuilt by every full build.
#[derive(Debug, Default)]
struct Index {
    /// Name (label and framework) → apps that claim it.
    label_apps: HashMap<VipName, BTreeSet<String>>,
    /// Name → its VIP keys in the current table.
    label_keys: HashMap<VipName, Vec<VipKey>>,
    /// Apps with at least one IP-VIP label.
    ip_apps: BTreeSet<String>,
    /// Task hosts and backend addresses, with the number of apps using each.
    cluster: HashMap<IpAddr, u32>,
    /// Addresses of accepted IP VIPs (kept out of named-VIP allocation).
    reserved: HashSet<IpAddr>,
}

/// Changes since the last rebuild.
#[derive(Debug)]
enum Pending {
    /// Every app may have changed (a snapshot, or the first build).
    Full,
    /// These apps changed: (old contribution, new contribution).
    Apps(Vec<(Option<Contribution>, Option<Contribution>)>),
}

#[derive(Debug)]
pub struct TableState {
    cfg: BuildConfig,
    alloc: VipAllocator,
    apps: BTreeMap<String, Contribution>,
    current: Arc<VipTable>,
    rejections: BTreeSet<Rejection>,
    next_version: u64,
    index: Index,
    pending: Pending,
}

impl TableState {
    /// `first_version` should grow across restarts (the caller passes the start time in ms),
    /// so agents watching with an old index never wait on a restarted controller.
    pub fn new(cfg: BuildConfig, first_version: u64) -> Self {
        let alloc = VipAllocator::new(cfg.vip_cidr, cfg.vip_cidr6);
        TableState {
            cfg,
            alloc,
            apps: BTreeMap::new(),
            current: Arc::new(VipTable::default()),
            rejections: BTreeSet::new(),
            next_version: first_version.max(1),
            index: Index::default(),
            pending: Pending::Full,
        }
    }

    /// Replace every app (a full snapshot). Apps that contribute nothing (no VIP label, no
    /// rejection, no task, no address) are not kept: most apps of a large cluster are such,
    /// and they would cost memory per app for no effect on the table.
    pub fn replace_all(&mut self, apps: impl IntoIterator<Item = Contribution>) {
        self.apps = apps
            .into_iter()
            .filter(|a| !a.is_empty())
            .map(|a| (a.app.clone(), a))
            .collect();
        self.pending = Pending::Full;
    }

    /// Replace or add one app (an app that now contributes nothing is forgotten).
    pub fn upsert(&mut self, app: Contribution) {
        if app.is_empty() {
            return self.remove(&app.app);
        }
        let old = self.apps.insert(app.app.clone(), app.clone());
        if old.as_ref() == Some(&app) {
            return;
        }
        self.note(old, Some(app));
    }

    /// Whether the current state holds a contribution by `app_id`.
    pub fn holds(&self, app_id: &str) -> bool {
        self.apps.contains_key(app_id)
    }

    /// Forget one contribution (an app deleted in Marathon, a task gone in Mesos).
    pub fn remove(&mut self, app_id: &str) {
        if let Some(old) = self.apps.remove(app_id) {
            self.note(Some(old), None);
        }
    }

    /// Replace (`Some`) or remove (`None`) the contributions named.
    pub fn update(&mut self, changes: impl IntoIterator<Item = (String, Option<Contribution>)>) {
        for (id, c) in changes {
            match c {
                Some(c) => self.upsert(c),
                None => self.remove(&id),
            }
        }
    }

    fn note(&mut self, old: Option<Contribution>, new: Option<Contribution>) {
        if let Pending::Apps(changes) = &mut self.pending {
            changes.push((old, new));
        }
    }

    pub fn current(&self) -> &Arc<VipTable> {
        &self.current
    }

    /// Every label currently rejected.
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.rejections.iter()
    }

    /// Merge the apps into a table; publish it as a new version if it differs. After single-app
    /// changes only the named VIPs those apps touch are re-merged (cost O(change), not
    /// O(cluster)); snapshots, IP-VIP apps, cluster-address changes that could affect an IP VIP,
    /// and allocation failures take the full path.
    pub fn rebuild(&mut self, changed_at_ms: u64) -> Rebuilt {
        let pending = std::mem::replace(&mut self.pending, Pending::Apps(Vec::new()));
        let incremental = match pending {
            Pending::Apps(changes) if self.current.version != 0 => self.incremental(changes),
            _ => None,
        };
        let (candidate, new_rejections) = match incremental {
            Some(r) => r,
            None => self.full(),
        };
        let table = if self.current.version != 0 && candidate.same_content(&self.current) {
            None
        } else {
            let mut t = candidate.share_with(&self.current);
            t.version = self.next_version;
            t.changed_at_ms = changed_at_ms;
            self.next_version += 1;
            let t = Arc::new(t);
            self.current = Arc::clone(&t);
            Some(t)
        };
        Rebuilt {
            table,
            new_rejections,
        }
    }

    /// Rebuild through the full path whatever changed (tests compare both paths).
    #[cfg(test)]
    fn rebuild_full(&mut self, changed_at_ms: u64) -> Rebuilt {
        self.pending = Pending::Full;
        self.rebuild(changed_at_ms)
    }

    fn full(&mut self) -> (VipTable, Vec<Rejection>) {
        let mut built = assemble(
            self.apps.values(),
            &self.cfg.framework,
            &self.cfg.policy,
            &mut self.alloc,
        );
        limit_backends(
            &mut built,
            self.apps.values(),
            &self.cfg.framework,
            self.cfg.max_backends_per_vip,
        );
        let now: BTreeSet<Rejection> = built.rejections.into_iter().collect();
        let new_rejections = now.difference(&self.rejections).cloned().collect();
        self.rejections = now;
        let table = VipTable::new(0, built.vips)
            .with_apps(app_tasks(self.apps.values(), &self.cfg.framework));
        self.index = self.reindex(&table);
        (table, new_rejections)
    }

    fn reindex(&self, table: &VipTable) -> Index {
        let mut ix = Index::default();
        for a in self.apps.values() {
            for e in &a.entries {
                match &e.target {
                    VipLabel::Named { label, .. } => {
                        ix.label_apps
                            .entry(a.name(label, &self.cfg.framework))
                            .or_default()
                            .insert(a.app.clone());
                    }
                    VipLabel::Ip { .. } => {
                        ix.ip_apps.insert(a.app.clone());
                    }
                }
            }
            for ip in &a.cluster_addrs {
                *ix.cluster.entry(*ip).or_default() += 1;
            }
        }
        for v in table.vips.values() {
            match &v.name {
                Some(n) => ix.label_keys.entry(n.clone()).or_default().push(v.key),
                None => {
                    ix.reserved.insert(v.key.ip);
                }
            }
        }
        ix
    }

    /// Apply single-app changes to the current table; `None` when the full path is needed.
    fn incremental(
        &mut self,
        changes: Vec<(Option<Contribution>, Option<Contribution>)>,
    ) -> Option<(VipTable, Vec<Rejection>)> {
        let has_ip = |a: &Option<Contribution>| {
            a.as_ref().is_some_and(|a| {
                a.entries
                    .iter()
                    .any(|e| matches!(e.target, VipLabel::Ip { .. }))
            })
        };
        // An app whose VIP was left out for its size: whether it fits now is the full
        // path's to judge (it also withdraws the rejection).
        let over_limit = |a: &Option<Contribution>| {
            a.as_ref().is_some_and(|a| {
                self.rejections
                    .iter()
                    .any(|r| r.reason == TOO_MANY_BACKENDS && r.app == a.app)
            })
        };
        let mut labels: BTreeSet<VipName> = BTreeSet::new();
        let mut cluster_moved = false;
        for (old, new) in &changes {
            if has_ip(old) || has_ip(new) || over_limit(old) || over_limit(new) {
                return None;
            }
            for (a, delta) in [(old, -1i64), (new, 1i64)] {
                let Some(a) = a else { continue };
                for ip in &a.cluster_addrs {
                    let n = self.index.cluster.entry(*ip).or_default();
                    let before = *n;
                    *n = (i64::from(*n) + delta).max(0) as u32;
                    cluster_moved |= (before == 0) != (*n == 0);
                    if *n == 0 {
                        self.index.cluster.remove(ip);
                    }
                }
                for e in &a.entries {
                    if let VipLabel::Named { label, .. } = &e.target {
                        let name = a.name(label, &self.cfg.framework);
                        labels.insert(name.clone());
                        let apps = self.index.label_apps.entry(name).or_default();
                        if delta < 0 {
                            apps.remove(&a.app);
                        } else {
                            apps.insert(a.app.clone());
                        }
                    }
                }
            }
        }
        // A host appearing or leaving can accept or refuse an IP VIP: re-check them all.
        if cluster_moved && !self.index.ip_apps.is_empty() {
            return None;
        }
        let mut vips = self.current.vips.clone();
        // First merge every touched name and free the names nobody claims any more, so the
        // allocation below sees the same free addresses the full path would.
        let mut merged = Vec::new();
        for name in &labels {
            let name_key = format!("{}.{}", name.label, name.framework);
            for k in self.index.label_keys.remove(name).unwrap_or_default() {
                vips.remove(&k);
            }
            // (port, protocol) → merged backends of every app claiming this name.
            let mut groups: BTreeMap<(u16, Protocol), Vec<Backend>> = BTreeMap::new();
            for id in self.index.label_apps.get(name).into_iter().flatten() {
                let Some(a) = self.apps.get(id) else { continue };
                for e in &a.entries {
                    if let VipLabel::Named { label: l, port } = &e.target
                        && *l == name.label
                        && a.framework_or(&self.cfg.framework) == name.framework
                    {
                        groups
                            .entry((*port, e.protocol))
                            .or_default()
                            .extend(e.backends.iter().cloned());
                    }
                }
            }
            // Too many backends for one VIP (counted by address, as a VIP keeps them): the
            // full path leaves it out and rejects its labels.
            let max = self.cfg.max_backends_per_vip;
            let too_many = groups.values().any(|b| {
                b.len() > max && {
                    let mut addrs: Vec<_> = b.iter().map(|b| b.addr).collect();
                    addrs.sort_unstable();
                    addrs.dedup();
                    addrs.len() > max
                }
            });
            if too_many {
                return None;
            }
            if groups.is_empty() {
                // The name is gone: both its addresses are free. (While it exists it keeps
                // its address in a family it has no backend of, as on the full path.)
                self.index.label_apps.remove(name);
                self.alloc.release(&name_key, Family::V4);
                self.alloc.release(&name_key, Family::V6);
            } else {
                let families = name_families(groups.values().flatten());
                merged.push((name, name_key, groups, families));
            }
        }
        for (name, name_key, groups, families) in merged {
            let mut ips = Vec::new();
            for fam in families {
                let ip = self
                    .alloc
                    .assign_one(&name_key, fam, &self.index.reserved)
                    .ok()?;
                ips.push((ip, fam));
            }
            let mut keys = Vec::new();
            for (ip, fam) in ips {
                for ((port, protocol), backends) in &groups {
                    let key = VipKey {
                        ip,
                        port: *port,
                        protocol: *protocol,
                    };
                    let mut v = Vip {
                        key,
                        name: Some(name.clone()),
                        backends: of_family(backends, fam).cloned().collect(),
                    };
                    v.normalize();
                    keys.push(key);
                    vips.insert(key, Arc::new(v));
                }
            }
            self.index.label_keys.insert(name.clone(), keys);
        }
        // Task records: only the changed apps are recomputed.
        let mut apps = self.current.apps.clone();
        for (old, new) in &changes {
            if let Some(old) = old {
                for (key, _) in all_tasks_of(old, &self.cfg.framework) {
                    apps.remove(&key);
                }
            }
            if let Some(new) = new {
                apps.extend(all_tasks_of(new, &self.cfg.framework));
            }
        }
        let mut new_rejections = Vec::new();
        for (old, new) in changes {
            // New means not there before, as on the full path: an app that changed but kept
            // a bad label does not log or count it again.
            let before: BTreeSet<&Rejection> = old.iter().flat_map(|a| &a.rejections).collect();
            for r in &before {
                self.rejections.remove(*r);
            }
            for r in new.into_iter().flat_map(|a| a.rejections) {
                if self.rejections.insert(r.clone()) && !before.contains(&r) {
                    new_rejections.push(r);
                }
            }
        }
        Some((
            VipTable {
                version: 0,
                changed_at_ms: 0,
                vips,
                apps,
            },
            new_rejections,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::marathon::apps::app_contribution;
    use crate::source::marathon::types::parse_apps;

    fn contribs(json: &str) -> Vec<Contribution> {
        let (apps, _) = parse_apps(json.as_bytes()).unwrap();
        apps.iter()
            .map(|a| app_contribution(a, &mut |_| None))
            .collect()
    }

    const ONE: &str = r#"{"apps":[{"id":"/web","portDefinitions":[{"port":0,"labels":{"VIP_0":"/web:80","VIP_1":"bad"}}],
        "tasks":[{"id":"w1","host":"198.18.0.1","ports":[31001],"state":"TASK_RUNNING"}]}]}"#;

    #[test]
    fn versions_bump_only_on_change_and_rejections_are_new_once() {
        let mut s = TableState::new(BuildConfig::default(), 100);
        s.replace_all(contribs(ONE));
        let r = s.rebuild(5);
        let t = r.table.unwrap();
        assert_eq!((t.version, t.changed_at_ms, t.vips.len()), (100, 5, 1));
        assert_eq!(r.new_rejections.len(), 1);
        // Same input: no new version, no new rejection.
        s.replace_all(contribs(ONE));
        let r = s.rebuild(6);
        assert!(r.table.is_none() && r.new_rejections.is_empty());
        assert_eq!(s.rejections().count(), 1);
        // The same app changed on the incremental path (a task added), the bad label kept:
        // a new version, and still no new rejection.
        let two_tasks = ONE.replace(
            r#"}]}]}"#,
            r#"},{"id":"w2","host":"198.18.0.2","ports":[31002],"state":"TASK_RUNNING"}]}]}"#,
        );
        for (i, json) in [two_tasks.as_str(), ONE].into_iter().enumerate() {
            s.upsert(contribs(json).remove(0));
            let r = s.rebuild(10 + i as u64);
            assert!(r.table.is_some(), "change {i} makes a new table");
            assert!(
                r.new_rejections.is_empty(),
                "change {i}: {:?}",
                r.new_rejections
            );
            assert_eq!(s.rejections().count(), 1);
        }
        // App removed: empty table, next version.
        s.remove("/web");
        let t = s.rebuild(7).table.unwrap();
        assert_eq!((t.version, t.vips.len()), (103, 0));
        // Back with its bad label: that is new again.
        s.upsert(contribs(ONE).remove(0));
        assert_eq!(s.rebuild(8).new_rejections.len(), 1);
    }

    #[test]
    fn a_name_keeps_its_ipv6_address_while_its_ipv6_backends_come_and_go() {
        let app = |name: &str, hosts: &[&str]| {
            let tasks: Vec<String> = hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    format!(r#"{{"id":"{name}{i}","host":"{h}","ports":[3100{i}],"state":"TASK_RUNNING"}}"#)
                })
                .collect();
            format!(
                r#"{{"apps":[{{"id":"/{name}","portDefinitions":[{{"port":0,"labels":{{"VIP_0":"/{name}:5432"}}}}],"tasks":[{}]}}]}}"#,
                tasks.join(",")
            )
        };
        let v6_of = |t: &VipTable, label: &str| {
            t.vips
                .values()
                .find(|v| v.key.ip.is_ipv6() && v.name.as_ref().is_some_and(|n| n.label == label))
                .map(|v| v.key.ip)
        };
        // Three IPv6 slots, and another name whose hash lands on db's slot.
        let cfg = BuildConfig {
            vip_cidr6: "fd01:c::/126".parse().unwrap(),
            ..BuildConfig::default()
        };
        let slot = |label: &str| crate::vip_alloc::stable_hash(&format!("{label}.marathon")) % 3;
        let other = (0..)
            .map(|i| format!("o{i}"))
            .find(|o| slot(o) == slot("db"))
            .unwrap();
        for full in [false, true] {
            // The incremental path, or the full one.
            let rebuild = |s: &mut TableState, v: u64| {
                let r = if full {
                    s.rebuild_full(v)
                } else {
                    s.rebuild(v)
                };
                r.table.unwrap()
            };
            let mut s = TableState::new(cfg.clone(), 1);
            s.replace_all(contribs(&app("db", &["198.18.0.1", "fd00::1"])));
            let first = v6_of(&s.rebuild(1).table.unwrap(), "db").expect("an AAAA address");
            // The IPv6 backend leaves: no IPv6 VIP, but the address stays the name's, even
            // when another name that hashes to it arrives meanwhile.
            s.upsert(contribs(&app("db", &["198.18.0.1"])).remove(0));
            s.upsert(contribs(&app(&other, &["fd00::9"])).remove(0));
            let t = rebuild(&mut s, 2);
            assert_eq!(v6_of(&t, "db"), None);
            assert_ne!(v6_of(&t, &other), Some(first), "full path: {full}");
            s.upsert(contribs(&app("db", &["198.18.0.1", "fd00::2"])).remove(0));
            let t = rebuild(&mut s, 3);
            assert_eq!(v6_of(&t, "db"), Some(first), "full path: {full}");
        }
    }

    /// A VIP over `--max-backends-per-vip` is left out and every label claiming it is
    /// rejected with its app and the count; the rest of the table stays; once it fits again
    /// it is back and the rejection gone. On the incremental path as on the full one.
    #[test]
    fn a_vip_over_the_backend_limit_is_left_out_and_its_labels_rejected() {
        let app = |id: &str, label: &str, hosts: std::ops::Range<u8>| {
            let tasks: Vec<String> = hosts
                .map(|h| {
                    format!(r#"{{"id":"{id}.{h}","host":"198.18.0.{h}","ports":[31000],"state":"TASK_RUNNING"}}"#)
                })
                .collect();
            let json = format!(
                r#"{{"apps":[{{"id":"/{id}","portDefinitions":[{{"port":0,"labels":{{"VIP_0":"{label}"}}}}],"tasks":[{}]}}]}}"#,
                tasks.join(",")
            );
            contribs(&json).remove(0)
        };
        let over = |s: &TableState| -> Vec<(String, String)> {
            s.rejections()
                .filter(|r| r.reason == TOO_MANY_BACKENDS)
                .map(|r| (r.app.clone(), r.error.clone()))
                .collect()
        };
        let big = "VIP big.marathon.l4lb.thisdcos.directory:80 would have 3 backends, \
                   over --max-backends-per-vip 2";
        let ip = "VIP 198.18.5.5:80 would have 3 backends, over --max-backends-per-vip 2";
        type Case = (
            &'static str,
            Vec<Contribution>,
            Vec<&'static str>,
            Vec<(&'static str, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            (
                "one app's VIP over the limit",
                vec![app("a", "/big:80", 1..4), app("s", "/small:80", 1..2)],
                vec!["small"],
                vec![("/a", big)],
            ),
            (
                "two apps that together pass it",
                vec![
                    app("a", "/big:80", 1..3),
                    app("c", "/big:80", 3..4),
                    app("s", "/small:80", 1..2),
                ],
                vec!["small"],
                vec![("/a", big), ("/c", big)],
            ),
            (
                "the same backend twice counts once",
                vec![app("a", "/big:80", 1..3), app("c", "/big:80", 2..3)],
                vec!["big"],
                vec![],
            ),
            (
                "an IP VIP",
                vec![app("a", "198.18.5.5:80", 1..4), app("s", "/small:80", 1..2)],
                vec!["small"],
                vec![("/a", ip)],
            ),
        ];
        for (what, apps, want_vips, want_over) in cases {
            let cfg = BuildConfig {
                max_backends_per_vip: 2,
                ..BuildConfig::default()
            };
            let mut s = TableState::new(cfg, 1);
            s.replace_all(apps);
            s.rebuild(0);
            let names: Vec<String> = s
                .current()
                .vips
                .values()
                .map(|v| v.name.as_ref().map_or(String::new(), |n| n.label.clone()))
                .collect();
            assert_eq!(names, want_vips, "{what}");
            let want: Vec<(String, String)> = want_over
                .iter()
                .map(|(a, e)| (a.to_string(), e.to_string()))
                .collect();
            assert_eq!(over(&s), want, "{what}");
        }

        // Incremental: a task leaves and the VIP fits, one comes back and it is out again.
        let cfg = BuildConfig {
            max_backends_per_vip: 2,
            ..BuildConfig::default()
        };
        let mut s = TableState::new(cfg, 1);
        s.replace_all([app("a", "/big:80", 1..4), app("s", "/small:80", 1..2)]);
        s.rebuild(0);
        assert_eq!(s.current().vips.len(), 1);
        s.upsert(app("a", "/big:80", 1..3));
        let r = s.rebuild(0);
        assert_eq!(r.table.unwrap().vips.len(), 2);
        assert!(over(&s).is_empty());
        s.upsert(app("a", "/big:80", 1..4));
        let r = s.rebuild(0);
        assert_eq!(r.table.unwrap().vips.len(), 1);
        assert_eq!(r.new_rejections.len(), 1, "counted once as new");
        assert_eq!(over(&s), vec![("/a".to_string(), big.to_string())]);
    }

    #[test]
    fn first_build_publishes_even_when_empty() {
        let mut s = TableState::new(BuildConfig::default(), 1);
        let t = s.rebuild(0).table.unwrap();
        assert_eq!(t.version, 1);
        assert!(t.vips.is_empty());
    }

    use proptest::prelude::*;

    /// One app: a few named labels (from a small pool, so apps share VIPs), maybe an IP VIP,
    /// tasks on a few hosts, some of them IPv6.
    /// (app id, named labels, has an IP VIP, tasks as (host, port, is IPv6)).
    type AppSpec = (u8, Vec<u8>, bool, Vec<(u8, u16, bool)>);

    fn arb_app() -> impl Strategy<Value = AppSpec> {
        (
            0u8..8,
            prop::collection::vec(0u8..6, 0..3),
            prop::bool::weighted(0.1),
            prop::collection::vec((0u8..5, 31000u16..31010, prop::bool::weighted(0.1)), 0..4),
        )
    }

    fn app_json(id: u8, labels: &[u8], ip_vip: bool, tasks: &[(u8, u16, bool)]) -> String {
        let mut l: Vec<String> = labels
            .iter()
            .enumerate()
            .map(|(i, n)| format!("\"VIP_{i}\":\"/svc{n}:80\""))
            .collect();
        if ip_vip {
            l.push("\"VIP_9\":\"198.18.5.5:80\"".into());
        }
        let tasks: Vec<String> = tasks
            .iter()
            .enumerate()
            .map(|(i, (h, p, v6))| {
                let host = if *v6 { format!("fd00::{h}") } else { format!("198.18.0.{h}") };
                format!("{{\"id\":\"t{id}.{i}\",\"host\":\"{host}\",\"ports\":[{p}],\"state\":\"TASK_RUNNING\"}}")
            })
            .collect();
        format!(
            "{{\"apps\":[{{\"id\":\"/app{id}\",\"portDefinitions\":[{{\"port\":0,\"labels\":{{{}}}}}],\"tasks\":[{}]}}]}}",
            l.join(","),
            tasks.join(",")
        )
    }

    proptest! {
        /// After any sequence of single-app changes, the incremental path publishes exactly the
        /// table the full path would.
        #[test]
        fn incremental_equals_full(steps in prop::collection::vec((arb_app(), prop::bool::weighted(0.2)), 1..25)) {
            // A small backend limit, so that shared names pass it and fall back under it.
            let cfg = BuildConfig {
                vip_cidr: "198.18.128.0/26".parse().unwrap(),
                max_backends_per_vip: 4,
                ..BuildConfig::default()
            };
            let mut inc = TableState::new(cfg.clone(), 1);
            let mut full = TableState::new(cfg, 1);
            inc.rebuild(0);
            full.rebuild_full(0);
            for ((id, labels, ip_vip, tasks), remove) in steps {
                if remove {
                    inc.remove(&format!("/app{id}"));
                    full.remove(&format!("/app{id}"));
                } else {
                    let mut c = contribs(&app_json(id, &labels, ip_vip, &tasks)).remove(0);
                    // Some apps are another framework's (as the Mesos source makes them):
                    // the same label there is another name.
                    if id % 3 == 0 {
                        c.framework = Some("other".into());
                    }
                    inc.upsert(c.clone());
                    full.upsert(c);
                }
                inc.rebuild(0);
                full.rebuild_full(0);
                prop_assert!(inc.current().same_content(full.current()),
                    "incremental {:?}\nfull {:?}", inc.current().vips, full.current().vips);
                let ri: Vec<_> = inc.rejections().collect();
                let rf: Vec<_> = full.rejections().collect();
                prop_assert_eq!(ri, rf);
            }
        }
    }
}
