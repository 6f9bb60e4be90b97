//! The JSON shape of `GET /v1/vips` (DC/OS-compatible, with extra fields), both ways: the
//! controller and agent serialise it, an agent following a controller parses it back.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{Backend, BackendState, Protocol, Vip, VipKey, VipName, VipTable};

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
}
