//! Task names (the Mesos-DNS job), pure: the running tasks of every app (from the table) →
//! name nodes in the task zones.
//!
//! - `mesos`: `<app>.<framework>` A/AAAA, one per running task (its container address if it
//!   has one, else its host, as Mesos-DNS's default IP sources); `_<app>._tcp|_udp.<framework>`
//!   SRV, one per task and host port of that protocol, targeting `<task>.<app>.<framework>`
//!   (the task's host).
//! - `autoip.dcos.thisdcos.directory`: as the `mesos` A/AAAA; `agentip.…`: the tasks' hosts;
//!   `containerip.…`: their container addresses only (DC/OS).
//!
//! `<app>` is the task name as Mesos knows it, mangled into one label as Mesos-DNS does
//! ([`label`]): Marathon's `/a/b/web` runs tasks named `web.b.a`, so `web-b-a.marathon.mesos`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::Name;

use super::records::{Node, SrvTarget, key_of, split};
use crate::model::{AppTasks, Protocol};

/// Node-key prefixes: which zone family a key belongs to.
pub(crate) const GROUP_VIP: u8 = 0;
pub(crate) const GROUP_MESOS: u8 = 1;
pub(crate) const GROUP_AUTOIP: u8 = 2;
pub(crate) const GROUP_AGENTIP: u8 = 3;
pub(crate) const GROUP_CONTAINERIP: u8 = 4;

/// The Mesos-DNS zone.
pub const MESOS_ZONE: &str = "mesos";
/// The DC/OS task zones, always served.
pub(crate) const DCOS_TASK_ZONES: [(&str, u8); 3] = [
    ("autoip.dcos.thisdcos.directory", GROUP_AUTOIP),
    ("agentip.dcos.thisdcos.directory", GROUP_AGENTIP),
    ("containerip.dcos.thisdcos.directory", GROUP_CONTAINERIP),
];

/// Longest DNS label.
const MAX_LABEL: usize = 63;

/// Mesos-DNS's RFC 1123 label of a whole task or app name (`.` becomes `-` too, so
/// `web.b.a` is `web-b-a`): [`labels::rfc1123`](crate::labels::rfc1123), as VIP names get it.
pub fn label(name: &str) -> String {
    crate::labels::rfc1123(name)
}

/// [`label`] without the length limit.
fn mangle(name: &str) -> String {
    crate::labels::rfc1123_chars(name)
        .trim_matches('-')
        .to_string()
}

/// The label of a task id in SRV targets: [`label`], keeping the end when too long (a
/// Marathon task id ends in its unique UUID).
fn task_label(id: &str) -> String {
    let whole = mangle(id);
    if whole.len() <= MAX_LABEL {
        return whole;
    }
    whole[whole.len() - MAX_LABEL..]
        .trim_start_matches('-')
        .to_string()
}

/// Addresses and SRV targets being gathered per node key, in flat lists sorted and grouped
/// at the end. A `BTreeSet` per name (every task's SRV target has one, twice) was a 200-byte
/// tree leaf for one address: the peak of publishing 80,000 tasks was 1.2 KB per task.
#[derive(Default)]
struct Acc {
    hosts: HashMap<Vec<u8>, Vec<IpAddr>>,
    /// SRV key → (target name, port, one of the target's addresses).
    srvs: HashMap<Vec<u8>, Vec<(Name, u16, IpAddr)>>,
}

impl Acc {
    fn host(&mut self, group: u8, name: &Name, ips: impl IntoIterator<Item = IpAddr>) {
        self.hosts.entry(key(group, name)).or_default().extend(ips);
    }
}

/// A node key of exactly its length: grown by pushes, a 70-byte task name's key held 128.
fn key(group: u8, name: &Name) -> Vec<u8> {
    let mut k = Vec::new();
    key_of(name.iter(), &mut k);
    k.insert(0, group);
    k.shrink_to_fit();
    k
}

/// The nodes of every task zone for `apps` (keys prefixed with their group). `mesos`: serve
/// the `mesos` zone too. `room`: the longest relative name (wire length) that fits under
/// every task zone.
pub(crate) fn collect(
    apps: &BTreeMap<String, Arc<AppTasks>>,
    mesos: bool,
    room: usize,
) -> HashMap<Vec<u8>, Node> {
    let mut acc = Acc::default();
    let fits = |n: &Name| n.len() <= room;
    for app in apps.values() {
        let (l, fw) = (label(&app.name), label(&app.framework));
        if l.is_empty() || fw.is_empty() {
            continue;
        }
        let Ok(name) = Name::from_ascii(format!("{l}.{fw}")) else {
            continue;
        };
        if !fits(&name) {
            tracing::debug!(app = %app.name, "task name too long for DNS; not served");
            continue;
        }
        for t in &app.tasks {
            let auto: Vec<IpAddr> = if t.container.is_empty() {
                t.host.into_iter().collect()
            } else {
                t.container.clone()
            };
            acc.host(GROUP_AUTOIP, &name, auto.iter().copied());
            acc.host(GROUP_AGENTIP, &name, t.host);
            if !t.container.is_empty() {
                acc.host(GROUP_CONTAINERIP, &name, t.container.iter().copied());
            }
            if !mesos {
                continue;
            }
            acc.host(GROUP_MESOS, &name, auto);
            let Some(host) = t.host else { continue };
            let tl = task_label(&t.id);
            let Ok(target) = Name::from_ascii(format!("{tl}.{l}.{fw}")) else {
                continue;
            };
            if tl.is_empty() || !fits(&target) || t.ports.is_empty() {
                continue;
            }
            acc.host(GROUP_MESOS, &target, [host]);
            for p in &t.ports {
                let proto = match p.protocol {
                    Protocol::Tcp => "_tcp",
                    Protocol::Udp => "_udp",
                };
                let Ok(srv) = Name::from_ascii(format!("_{l}.{proto}.{fw}")) else {
                    continue;
                };
                if !fits(&srv) {
                    continue;
                }
                acc.srvs.entry(key(GROUP_MESOS, &srv)).or_default().push((
                    target.clone(),
                    p.port,
                    host,
                ));
            }
        }
    }
    let mut nodes: HashMap<Vec<u8>, Node> = HashMap::new();
    for (k, mut ips) in acc.hosts {
        if ips.is_empty() {
            continue;
        }
        ips.sort_unstable();
        ips.dedup();
        let (v4, v6) = split(&ips);
        nodes.insert(k, Node::Host { v4, v6 });
    }
    for (k, mut entries) in acc.srvs {
        // Ordered by target and port, as the map of targets they replace was.
        entries.sort_unstable();
        entries.dedup();
        let mut targets = Vec::new();
        for group in entries.chunk_by(|a, b| (&a.0, a.1) == (&b.0, b.1)) {
            let (host, port, _) = &group[0];
            let (v4, v6) = split(group.iter().map(|(_, _, ip)| ip));
            targets.push(SrvTarget {
                port: *port,
                host: host.clone(),
                v4,
                v6,
            });
        }
        targets.shrink_to_fit();
        nodes.insert(k, Node::Srv(targets));
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_as_mesos_dns_mangles_them() {
        for (name, want) in [
            ("web.b.a", "web-b-a"),
            ("My_App", "my-app"),
            ("--x--", "x"),
            ("a b!c", "abc"),
            ("9lives", "9lives"),
            ("", ""),
            ("ünïcode", "ncode"),
        ] {
            assert_eq!(label(name), want, "{name}");
        }
        let long = format!("{}.tail", "x".repeat(70));
        assert_eq!(label(&long), "x".repeat(63));
        // Mesos-DNS's trimCut: a dash at the cut is dropped and the label fills from the rest.
        assert_eq!(
            label(&format!("{}-y", "x".repeat(62))),
            format!("{}y", "x".repeat(62))
        );
        let id = format!("{}.e4d2a1f0-1f2e-11ef-9a3b-0242ac110002", "g_".repeat(30));
        let tl = task_label(&id);
        assert!(tl.len() <= 63 && tl.ends_with("0242ac110002") && !tl.starts_with('-'));
    }

    fn key_str(group: u8, s: &str) -> Vec<u8> {
        key(group, &Name::from_ascii(s).expect("name"))
    }

    #[test]
    fn nodes_per_zone() {
        let t = crate::model::test_util::task_record;
        let apps: BTreeMap<String, Arc<AppTasks>> = [
            (
                "/a/web".to_string(),
                Arc::new(AppTasks {
                    name: "web.a".into(),
                    framework: "marathon".into(),
                    tasks: vec![
                        t("a_web.1", "198.18.1.1", &[], &[(31000, Protocol::Tcp)]),
                        t(
                            "a_web.2",
                            "198.18.1.2",
                            &[],
                            &[(31001, Protocol::Tcp), (31001, Protocol::Udp)],
                        ),
                    ],
                }),
            ),
            (
                "/db".to_string(),
                Arc::new(AppTasks {
                    name: "db".into(),
                    framework: "marathon".into(),
                    tasks: vec![t("db.1", "198.18.1.3", &["9.0.0.7", "fd00::7"], &[])],
                }),
            ),
        ]
        .into();
        let nodes = collect(&apps, true, 200);
        let host = |v4: &[&str], v6: &[&str]| Node::Host {
            v4: v4.iter().map(|a| a.parse().expect("ip")).collect(),
            v6: v6.iter().map(|a| a.parse().expect("ip")).collect(),
        };
        let web = host(&["198.18.1.1", "198.18.1.2"], &[]);
        for g in [GROUP_MESOS, GROUP_AUTOIP, GROUP_AGENTIP] {
            assert_eq!(nodes.get(&key_str(g, "web-a.marathon")), Some(&web), "{g}");
        }
        assert_eq!(
            nodes.get(&key_str(GROUP_CONTAINERIP, "web-a.marathon")),
            None
        );
        let db_c = host(&["9.0.0.7"], &["fd00::7"]);
        assert_eq!(nodes.get(&key_str(GROUP_MESOS, "db.marathon")), Some(&db_c));
        assert_eq!(
            nodes.get(&key_str(GROUP_AUTOIP, "db.marathon")),
            Some(&db_c)
        );
        assert_eq!(
            nodes.get(&key_str(GROUP_CONTAINERIP, "db.marathon")),
            Some(&db_c)
        );
        assert_eq!(
            nodes.get(&key_str(GROUP_AGENTIP, "db.marathon")),
            Some(&host(&["198.18.1.3"], &[]))
        );
        let Some(Node::Srv(tcp)) = nodes.get(&key_str(GROUP_MESOS, "_web-a._tcp.marathon")) else {
            panic!("no tcp SRV")
        };
        assert_eq!(
            tcp.iter()
                .map(|t| (t.host.to_string(), t.port, t.v4.to_vec()))
                .collect::<Vec<_>>(),
            vec![
                (
                    "a-web-1.web-a.marathon".to_string(),
                    31000,
                    vec!["198.18.1.1".parse().expect("ip")]
                ),
                (
                    "a-web-2.web-a.marathon".to_string(),
                    31001,
                    vec!["198.18.1.2".parse().expect("ip")]
                ),
            ]
        );
        let Some(Node::Srv(udp)) = nodes.get(&key_str(GROUP_MESOS, "_web-a._udp.marathon")) else {
            panic!("no udp SRV")
        };
        assert_eq!(udp.len(), 1);
        assert_eq!(
            nodes.get(&key_str(GROUP_MESOS, "a-web-2.web-a.marathon")),
            Some(&host(&["198.18.1.2"], &[]))
        );
        // A task without ports has no SRV and no target name.
        assert!(!nodes.contains_key(&key_str(GROUP_MESOS, "db-1.db.marathon")));
        // Without the mesos zone, only the DC/OS zones.
        let dcos = collect(&apps, false, 200);
        assert!(dcos.keys().all(|k| k[0] != GROUP_MESOS));
        assert_eq!(
            dcos.get(&key_str(GROUP_AUTOIP, "web-a.marathon")),
            Some(&web)
        );
        // Names that do not fit are left out.
        assert!(collect(&apps, true, 10).is_empty());
    }
}
