//! The JSON shape of `GET /v1/vips` (DC/OS-compatible, with extra fields), both ways: the
//! controller and agent serialise it, an agent following a controller parses it back.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::status::Plane;
use super::{AppTasks, Backend, BackendState, Protocol, Vip, VipKey, VipName, VipTable};

/// Table version header of `/v1/vips` answers (also the blocking-query index).
pub const INDEX_HEADER: &str = "x-l4lb-index";
/// When the change behind a table was first seen at the source (Unix ms).
pub const CHANGED_AT_HEADER: &str = "x-l4lb-changed-at";

/// A duration as flags and the `wait=` query parameter spell it: `500ms`, `30s`, `2m`, `1h`,
/// `1h30m` (humantime), or bare seconds (`30`, Consul's convention).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (use e.g. 500ms, 30s, 2m): {e}"))
}

/// One VIP as it appears in the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipJson {
    pub vip: String,
    pub protocol: Protocol,
    /// Fully qualified name for named VIPs, null for IP VIPs.
    pub name: Option<String>,
    /// Mangled label of a named VIP (extra field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Framework of a named VIP (extra field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<String>,
    pub ip: IpAddr,
    /// Read, never written: controllers before l4lb listed a dual-stack name once, its IPv6
    /// address here and both families' backends together. Now each address is its own
    /// entry with its own family's backends; an entry with `ip6` is read as those two.
    #[serde(default, skip_serializing)]
    pub ip6: Option<IpAddr>,
    pub port: u16,
    /// Agent only: `bpf` when the kernel path translates this VIP, `proxy` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_plane: Option<Plane>,
    /// Agent only, with `data_plane` `proxy`: why the kernel path does not serve this VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_plane_reason: Option<String>,
    pub backend: Vec<BackendJson>,
    /// Agent only: client connections forwarded to a backend, in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_ok: Option<u64>,
    /// Agent only: client connections no backend could take (all tried failed, or none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_failed: Option<u64>,
}

/// One backend as it appears in the API. `connections` and `bytes` are filled by agents only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendJson {
    pub ip: IpAddr,
    pub port: u16,
    pub state: BackendState,
    #[serde(default)]
    pub app: String,
    #[serde(default)]
    pub task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Agent only: the backend is ejected by passive health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected: Option<bool>,
    /// Agent with the kernel path only: connections it sent to this backend (opened, not open:
    /// the kernel path does not see them close).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_connections: Option<u64>,
    /// Agent only: successful connects to this backend, in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connects: Option<u64>,
    /// Agent only: failed or timed-out connects to this backend address, in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_failures: Option<u64>,
    /// Agent only: connect latency quantiles (seconds), absent before the first connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_p50_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_p99_seconds: Option<f64>,
}

impl VipJson {
    pub fn from_vip(v: &Vip) -> Self {
        VipJson {
            vip: v.vip_string(),
            protocol: v.key.protocol,
            name: v.name.as_ref().map(VipName::fqdn),
            label: v.name.as_ref().map(|n| n.label.clone()),
            framework: v.name.as_ref().map(|n| n.framework.clone()),
            ip: v.key.ip,
            ip6: None,
            port: v.key.port,
            data_plane: None,
            data_plane_reason: None,
            backend: v
                .backends
                .iter()
                .map(|b| BackendJson {
                    ip: b.addr.ip(),
                    port: b.addr.port(),
                    state: b.state,
                    app: b.app.to_string(),
                    task: b.task.to_string(),
                    connections: None,
                    bytes: None,
                    ejected: None,
                    kernel_connections: None,
                    connects: None,
                    connect_failures: None,
                    connect_p50_seconds: None,
                    connect_p99_seconds: None,
                })
                .collect(),
            connections_ok: None,
            connections_failed: None,
        }
    }

    /// Back to a [`Vip`]. A named VIP without `label`/`framework` (a plain DC/OS payload)
    /// recovers them from `name`.
    pub fn into_vip(self) -> Vip {
        let name = match (self.label, self.framework, self.name) {
            (Some(label), Some(framework), _) => Some(VipName { label, framework }),
            (_, _, Some(fqdn)) => split_fqdn(&fqdn),
            _ => None,
        };
        let backends = self
            .backend
            .into_iter()
            .map(|b| Backend {
                addr: SocketAddr::new(b.ip, b.port),
                state: b.state,
                app: b.app.into(),
                task: b.task.into(),
            })
            .collect();
        Vip::normalized((self.ip, self.port, self.protocol), name, backends)
    }

    /// Back to its VIPs: one, or two for an entry with `ip6`, each with the backends of its
    /// own family.
    pub fn into_vips(mut self) -> Vec<Vip> {
        match self.ip6.take() {
            None => vec![self.into_vip()],
            Some(ip6) => {
                let mut six = self.clone();
                six.ip = ip6;
                let v4 = self.ip.to_canonical().is_ipv4();
                self.backend.retain(|b| b.ip.to_canonical().is_ipv4() == v4);
                six.backend.retain(|b| b.ip.to_canonical().is_ipv4() != v4);
                vec![self.into_vip(), six.into_vip()]
            }
        }
    }
}

pub(super) fn split_fqdn(fqdn: &str) -> Option<VipName> {
    let rest = fqdn.strip_suffix(super::DEFAULT_ZONE)?.strip_suffix('.')?;
    let (label, framework) = rest.rsplit_once('.')?;
    Some(VipName {
        label: label.to_string(),
        framework: framework.to_string(),
    })
}

/// The whole table in API order: one entry per VIP address, so a dual-stack name is two
/// entries with the same `vip`, each with its own family's backends.
pub fn table_to_json(t: &VipTable) -> Vec<VipJson> {
    t.sorted_for_api()
        .into_iter()
        .map(|v| VipJson::from_vip(v))
        .collect()
}

/// Parse an API body back into a table with the given version.
pub fn table_from_json(version: u64, vips: Vec<VipJson>) -> VipTable {
    VipTable::new(version, vips.into_iter().flat_map(VipJson::into_vips))
}

/// A VIP's identity on the wire (for removals in a delta).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KeyJson {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl KeyJson {
    pub fn key(self) -> VipKey {
        VipKey {
            ip: self.ip,
            port: self.port,
            protocol: self.protocol,
        }
    }
}

/// What turns version `from` into version `to` (`GET /v1/vips/delta`). With `full`, `upsert`
/// is the whole table and `remove` is empty (the server no longer had `from`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaJson {
    pub from: u64,
    pub to: u64,
    pub full: bool,
    pub upsert: Vec<VipJson>,
    pub remove: Vec<KeyJson>,
    /// Apps whose running tasks changed (all of them when `full`), for task names. Absent
    /// when empty, so a delta without task changes reads as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert_apps: Vec<AppTasksJson>,
    /// Apps gone (no running task left, or removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_apps: Vec<String>,
}

/// `DeltaJson::between(None, table)` as it serialises, written from the table one VIP at a
/// time: no `Vec<VipJson>` or copy of every app's tasks (an agent saving a 20 MiB table once
/// held 70 MiB more for it).
#[derive(Debug, Clone, Copy)]
pub struct FullDelta<'a>(pub &'a VipTable);

impl Serialize for FullDelta<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Upsert<'a>(&'a VipTable);
        impl Serialize for Upsert<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(
                    self.0
                        .sorted_for_api()
                        .into_iter()
                        .map(|v| VipJson::from_vip(v)),
                )
            }
        }
        #[derive(Serialize)]
        struct AppRef<'a> {
            app: &'a str,
            #[serde(flatten)]
            tasks: &'a AppTasks,
        }
        struct Apps<'a>(&'a VipTable);
        impl Serialize for Apps<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.apps.iter().map(|(app, tasks)| AppRef { app, tasks }))
            }
        }
        let t = self.0;
        let mut m = s.serialize_struct("DeltaJson", 6)?;
        m.serialize_field("from", &0u64)?;
        m.serialize_field("to", &t.version)?;
        m.serialize_field("full", &true)?;
        m.serialize_field("upsert", &Upsert(t))?;
        m.serialize_field("remove", &[] as &[KeyJson])?;
        if !t.apps.is_empty() {
            m.serialize_field("upsert_apps", &Apps(t))?;
        }
        m.end()
    }
}

/// One app's running tasks on the wire: its id beside the model's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppTasksJson {
    pub app: String,
    #[serde(flatten)]
    pub tasks: AppTasks,
}

fn apps_json<'a>(
    apps: impl Iterator<Item = (&'a String, &'a std::sync::Arc<AppTasks>)>,
) -> Vec<AppTasksJson> {
    apps.map(|(app, t)| AppTasksJson {
        app: app.clone(),
        tasks: (**t).clone(),
    })
    .collect()
}

impl DeltaJson {
    /// The delta from `old` to `new` (a full one when `old` is `None`).
    pub fn between(old: Option<&VipTable>, new: &VipTable) -> Self {
        let Some(old) = old else {
            return DeltaJson {
                from: 0,
                to: new.version,
                full: true,
                upsert: table_to_json(new),
                remove: Vec::new(),
                upsert_apps: apps_json(new.apps.iter()),
                remove_apps: Vec::new(),
            };
        };
        let d = super::diff(old, new);
        let upsert = d
            .added
            .iter()
            .chain(d.changed.iter().map(|c| &c.key))
            .filter_map(|k| new.vips.get(k))
            .map(|v| VipJson::from_vip(v))
            .collect();
        let remove = d
            .removed
            .iter()
            .map(|k| KeyJson {
                ip: k.ip,
                port: k.port,
                protocol: k.protocol,
            })
            .collect();
        let upsert_apps = apps_json(
            new.apps
                .iter()
                .filter(|(app, t)| old.apps.get(*app) != Some(*t)),
        );
        let remove_apps = old
            .apps
            .keys()
            .filter(|app| !new.apps.contains_key(*app))
            .cloned()
            .collect();
        DeltaJson {
            from: old.version,
            to: new.version,
            full: false,
            upsert,
            remove,
            upsert_apps,
            remove_apps,
        }
    }

    /// Apply to `base` (which must be version `from` unless `full`), giving version `to`.
    pub fn apply(self, base: &VipTable) -> VipTable {
        let apps = self
            .upsert_apps
            .into_iter()
            .map(|a| (a.app, std::sync::Arc::new(a.tasks)));
        if self.full {
            return table_from_json(self.to, self.upsert).with_apps(apps);
        }
        let remove = self.remove.into_iter().map(KeyJson::key);
        let upsert = self.upsert.into_iter().flat_map(VipJson::into_vips);
        base.patched(self.to, remove, upsert, self.remove_apps, apps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::*;
    use crate::model::{TaskPort, TaskRecord};
    use std::sync::Arc;

    /// One name, `db.cassandra`, on an IPv4 and an IPv6 VIP, each with its family's backend.
    fn dual_stack_db() -> (Vip, Vip) {
        let name = Some(VipName {
            label: "db".into(),
            framework: "cassandra".into(),
        });
        let mut v4 = vip("11.1.2.3", 9042, &["198.18.1.2:9042"]);
        let mut v6 = vip("fd01:c::7", 9042, &["[fd00::2]:9042"]);
        v4.name = name.clone();
        v6.name = name;
        (v4, v6)
    }

    #[test]
    fn a_dual_stack_name_is_listed_once_per_address_with_its_family_backends() {
        let (v4, v6) = dual_stack_db();
        let t = VipTable::new(7, [v6, v4, vip("198.18.5.5", 80, &["198.18.1.3:31002"])]);
        let json = table_to_json(&t);
        let entries: Vec<String> = json
            .iter()
            .map(|j| {
                let backends: Vec<String> = j
                    .backend
                    .iter()
                    .map(|b| SocketAddr::new(b.ip, b.port).to_string())
                    .collect();
                format!("{} {} {}", j.vip, j.ip, backends.join(","))
            })
            .collect();
        assert_eq!(
            entries,
            [
                "198.18.5.5:80 198.18.5.5 198.18.1.3:31002",
                "db.cassandra.l4lb.thisdcos.directory:9042 11.1.2.3 198.18.1.2:9042",
                "db.cassandra.l4lb.thisdcos.directory:9042 fd01:c::7 [fd00::2]:9042",
            ]
        );
        let text = serde_json::to_string(&json).unwrap();
        assert!(!text.contains("ip6"), "{text}");
        // An agent or a full delta reads both VIPs back.
        let back = table_from_json(7, json);
        assert!(back.same_content(&t));
        let full = DeltaJson::between(None, &t).apply(&VipTable::default());
        assert!(full.same_content(&t));
    }

    #[test]
    fn an_old_merged_entry_is_read_as_one_vip_per_family() {
        // What controllers wrote before: one entry, `ip6` beside `ip`, both families' backends.
        let body = r#"[{"vip":"db.cassandra.l4lb.thisdcos.directory:9042","protocol":"tcp",
            "name":"db.cassandra.l4lb.thisdcos.directory","ip":"11.1.2.3","ip6":"fd01:c::7",
            "port":9042,"backend":[{"ip":"198.18.1.2","port":9042,"state":"active"},
            {"ip":"fd00::2","port":9042,"state":"active"}]}]"#;
        let vips: Vec<VipJson> = serde_json::from_str(body).unwrap();
        let t = table_from_json(1, vips);
        let got: Vec<(String, Vec<String>)> = t
            .vips
            .values()
            .map(|v| {
                let b = v.backends.iter().map(|b| b.addr.to_string()).collect();
                (v.key.ip.to_string(), b)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("11.1.2.3".to_string(), vec!["198.18.1.2:9042".to_string()]),
                ("fd01:c::7".to_string(), vec!["[fd00::2]:9042".to_string()]),
            ]
        );
    }

    #[test]
    fn a_full_delta_streams_as_it_serialises() {
        let (v4, v6) = dual_stack_db();
        let mut udp = v4.clone();
        udp.key.protocol = crate::model::Protocol::Udp;
        let apps = [(
            "/db".to_string(),
            Arc::new(AppTasks {
                name: "db".into(),
                framework: "marathon".into(),
                tasks: vec![TaskRecord {
                    id: "db.1".into(),
                    host: Some([198, 18, 1, 2].into()),
                    container: vec![],
                    ports: vec![TaskPort {
                        port: 9042,
                        protocol: crate::model::Protocol::Tcp,
                        name: None,
                    }],
                }],
            }),
        )];
        for t in [
            VipTable::default(),
            VipTable::new(3, [vip("198.18.5.5", 80, &["198.18.1.3:1"])]),
            VipTable::new(7, [v4, v6, udp, vip("198.18.5.5", 80, &["198.18.1.3:1"])])
                .with_apps(apps),
        ] {
            assert_eq!(
                serde_json::to_string(&FullDelta(&t)).unwrap(),
                serde_json::to_string(&DeltaJson::between(None, &t)).unwrap()
            );
        }
    }

    #[test]
    fn roundtrip_named_and_ip() {
        let mut named = vip("11.1.2.3", 80, &["198.18.1.2:31001"]);
        named.name = Some(VipName {
            label: "api.hello-world".into(),
            framework: "marathon".into(),
        });
        let t = VipTable::new(7, [named, vip("198.18.5.5", 80, &["198.18.1.3:31002"])]);
        let json = serde_json::to_string(&table_to_json(&t)).unwrap();
        assert!(json.contains(r#""vip":"api.hello-world.marathon.l4lb.thisdcos.directory:80""#));
        assert!(json.contains(r#""name":null"#));
        let back: Vec<VipJson> = serde_json::from_str(&json).unwrap();
        let t2 = table_from_json(7, back);
        assert!(t.same_content(&t2));
    }

    #[test]
    fn dcos_payload_without_extra_fields() {
        let body = r#"[{"vip":"web.marathon.l4lb.thisdcos.directory:80","protocol":"tcp",
            "name":"web.marathon.l4lb.thisdcos.directory","ip":"11.23.4.5","port":80,
            "backend":[{"ip":"198.18.1.2","port":31001,"state":"active"}]}]"#;
        let vips: Vec<VipJson> = serde_json::from_str(body).unwrap();
        let t = table_from_json(1, vips);
        let v = t.vips.values().next().unwrap();
        assert_eq!(v.name.as_ref().unwrap().label, "web");
        assert_eq!(v.name.as_ref().unwrap().framework, "marathon");
    }

    #[test]
    fn deltas_rebuild_the_new_table() {
        let a = VipTable::new(
            1,
            [
                vip("11.0.0.1", 80, &["1.1.1.1:1"]),
                vip("11.0.0.2", 80, &["2.2.2.2:2"]),
            ],
        );
        let b = VipTable::new(
            2,
            [
                vip("11.0.0.2", 80, &["2.2.2.2:2", "3.3.3.3:3"]),
                vip("11.0.0.3", 80, &[]),
            ],
        );
        let d = DeltaJson::between(Some(&a), &b);
        assert_eq!(
            (d.from, d.to, d.full, d.upsert.len(), d.remove.len()),
            (1, 2, false, 2, 1)
        );
        let json = serde_json::to_string(&d).unwrap();
        let back: DeltaJson = serde_json::from_str(&json).unwrap();
        let c = back.apply(&a);
        assert!(c.same_content(&b));
        assert_eq!(c.version, 2);
        let full = DeltaJson::between(None, &b);
        assert!(full.full);
        assert!(full.apply(&VipTable::default()).same_content(&b));
        // Without task changes the delta has no task fields: old agents read it unchanged.
        assert!(!json.contains("apps"), "{json}");
    }

    fn app_tasks(name: &str, hosts: &[&str]) -> Arc<AppTasks> {
        Arc::new(AppTasks {
            name: name.into(),
            framework: "marathon".into(),
            tasks: hosts
                .iter()
                .enumerate()
                .map(|(i, h)| TaskRecord {
                    id: format!("{name}.{i}"),
                    host: Some(h.parse().unwrap()),
                    container: vec![],
                    ports: vec![TaskPort {
                        port: 31000 + i as u16,
                        protocol: Protocol::Tcp,
                        name: Some("http".into()),
                    }],
                })
                .collect(),
        })
    }

    #[test]
    fn deltas_carry_task_changes() {
        let web = app_tasks("web", &["198.18.1.1", "198.18.1.2"]);
        let a = VipTable::new(1, [vip("11.0.0.1", 80, &[])]).with_apps([
            ("/web".to_string(), web.clone()),
            ("/db".to_string(), app_tasks("db", &["198.18.1.3"])),
        ]);
        // Same VIPs; /web unchanged, /db gone, /cache new.
        let b = VipTable::new(2, [vip("11.0.0.1", 80, &[])]).with_apps([
            ("/web".to_string(), web),
            (
                "/cache".to_string(),
                app_tasks("cache.group", &["198.18.1.4"]),
            ),
        ]);
        assert!(!a.same_content(&b), "task changes are content");
        let d = DeltaJson::between(Some(&a), &b);
        assert!(d.upsert.is_empty() && d.remove.is_empty());
        assert_eq!(d.remove_apps, vec!["/db".to_string()]);
        assert_eq!(
            d.upsert_apps
                .iter()
                .map(|a| a.app.as_str())
                .collect::<Vec<_>>(),
            vec!["/cache"]
        );
        let json = serde_json::to_string(&d).unwrap();
        assert!(
            json.contains(r#""app":"/cache","name":"cache.group","framework":"marathon""#),
            "{json}"
        );
        let back: DeltaJson = serde_json::from_str(&json).unwrap();
        assert!(back.apply(&a).same_content(&b));
        let full: DeltaJson =
            serde_json::from_str(&serde_json::to_string(&DeltaJson::between(None, &b)).unwrap())
                .unwrap();
        assert!(full.apply(&VipTable::default()).same_content(&b));
    }

    /// What task records add to the table an agent receives: 10,000 apps x 3 tasks with one
    /// port each, as the full delta's JSON.
    #[test]
    fn task_records_size_for_10k_apps() {
        let apps = (0..10_000u32).map(|i| {
            let name = format!("app-{i:05}.group");
            let t = Arc::new(AppTasks {
                name: name.clone(),
                framework: "marathon".into(),
                tasks: (0..3u32)
                    .map(|j| TaskRecord {
                        id: format!(
                            "group_app-{i:05}.{:08x}-1f2e-11ef-9a3b-0242ac110002",
                            i * 3 + j
                        ),
                        host: Some(std::net::IpAddr::from([
                            198,
                            18,
                            (j + 1) as u8,
                            (i % 250) as u8,
                        ])),
                        container: vec![],
                        ports: vec![TaskPort {
                            port: 31000 + (i % 1000) as u16,
                            protocol: Protocol::Tcp,
                            name: None,
                        }],
                    })
                    .collect(),
            });
            (format!("/group/app-{i:05}"), t)
        });
        let t = VipTable::default().with_apps(apps);
        let bytes = serde_json::to_vec(&DeltaJson::between(None, &t))
            .unwrap()
            .len();
        // Measured: 4,616,869 bytes (154 a task), sent once in full, then only changed apps.
        assert!((4_000_000..6_500_000).contains(&bytes), "{bytes}");
        eprintln!("task records, 10,000 apps x 3 tasks: {bytes} bytes of JSON");
    }
}
