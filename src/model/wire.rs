//! The JSON shape of `GET /v1/vips` (DC/OS-compatible, with extra fields), both ways: the
//! controller and agent serialise it, an agent following a controller parses it back.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Backend, BackendState, Protocol, Vip, VipKey, VipName, VipTable};

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
    pub port: u16,
    pub backend: Vec<BackendJson>,
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
            port: v.key.port,
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
                })
                .collect(),
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
        let mut v = Vip {
            key: VipKey {
                ip: self.ip,
                port: self.port,
                protocol: self.protocol,
            },
            name,
            backends: self
                .backend
                .into_iter()
                .map(|b| Backend {
                    addr: SocketAddr::new(b.ip, b.port),
                    state: b.state,
                    app: b.app.into(),
                    task: b.task.into(),
                })
                .collect(),
        };
        v.normalize();
        v
    }
}

fn split_fqdn(fqdn: &str) -> Option<VipName> {
    let rest = fqdn.strip_suffix(super::DEFAULT_ZONE)?.strip_suffix('.')?;
    let (label, framework) = rest.rsplit_once('.')?;
    Some(VipName {
        label: label.to_string(),
        framework: framework.to_string(),
    })
}

/// The whole table in API order.
pub fn table_to_json(t: &VipTable) -> Vec<VipJson> {
    t.sorted_for_api()
        .into_iter()
        .map(|v| VipJson::from_vip(v))
        .collect()
}

/// Parse an API body back into a table with the given version.
pub fn table_from_json(version: u64, vips: Vec<VipJson>) -> VipTable {
    VipTable::new(version, vips.into_iter().map(VipJson::into_vip))
}

/// A VIP's identity on the wire (for removals in a delta).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KeyJson {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
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
        DeltaJson {
            from: old.version,
            to: new.version,
            full: false,
            upsert,
            remove,
        }
    }

    /// Apply to `base` (which must be version `from` unless `full`), giving version `to`.
    pub fn apply(self, base: &VipTable) -> VipTable {
        if self.full {
            return table_from_json(self.to, self.upsert);
        }
        let mut t = base.clone();
        t.version = self.to;
        for k in self.remove {
            t.vips.remove(&VipKey {
                ip: k.ip,
                port: k.port,
                protocol: k.protocol,
            });
        }
        for v in self.upsert {
            let v = v.into_vip();
            t.vips.insert(v.key, std::sync::Arc::new(v));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::*;

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
    }
}
