//! Pure data shared by every part of l4lb: VIPs, backends, the versioned immutable
//! [`VipTable`] and the pure [`diff`] between two tables.
//!
//! Nothing here does I/O. `source`, `agent` and `api` depend on this module; it depends on
//! none of them.

pub mod delta_in;
mod diff;
mod secret;
pub mod status;
pub mod wire;

pub use diff::{TableDiff, VipChange, diff};
pub use secret::Secret;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// FNV-1a, 64 bit: small, fixed across processes and versions (names hash to the same VIP
/// address on every controller), and well distributed enough for spreading names over a CIDR.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The DNS zone every named VIP lives in (DC/OS compatible).
pub const DEFAULT_ZONE: &str = "l4lb.thisdcos.directory";

/// A VIP's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Whether a backend may take new flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Healthy and running: eligible for new connections.
    Active,
    /// Running but unhealthy, unchecked or being killed: existing flows continue, no new ones.
    Draining,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
        }
    }
}

/// One instance behind a VIP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: SocketAddr,
    pub state: BackendState,
    /// Marathon app id, e.g. `/web` (shared: cloning a backend allocates nothing).
    pub app: Arc<str>,
    /// Marathon task id.
    pub task: Arc<str>,
}

/// What a VIP listens on: address, port and protocol. The identity of a VIP in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl VipKey {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl fmt::Display for VipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.socket_addr(), self.protocol)
    }
}

/// The name part of a named VIP: `<label>.<framework>.<zone>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipName {
    /// Mangled label; may hold dots (`api.hello-world`).
    pub label: String,
    /// Mesos framework name, `marathon` by default.
    pub framework: String,
}

impl VipName {
    /// The name `label` in `framework`.
    pub fn new(label: impl Into<String>, framework: impl Into<String>) -> VipName {
        VipName {
            label: label.into(),
            framework: framework.into(),
        }
    }

    /// The fully qualified name in `zone`, without a trailing dot.
    pub fn fqdn_in(&self, zone: &str) -> String {
        format!("{}.{}.{}", self.label, self.framework, zone)
    }

    /// The fully qualified name in the default zone.
    pub fn fqdn(&self) -> String {
        self.fqdn_in(DEFAULT_ZONE)
    }
}

/// A virtual IP: what it listens on, its name if it is a named VIP, and its backends
/// (sorted by address, unique by address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub key: VipKey,
    pub name: Option<VipName>,
    pub backends: Vec<Backend>,
}

impl Vip {
    /// A VIP read from the wire: its key's parts, name and backends, normalized.
    pub fn normalized(
        (ip, port, protocol): (IpAddr, u16, Protocol),
        name: Option<VipName>,
        backends: Vec<Backend>,
    ) -> Vip {
        let mut v = Vip {
            key: VipKey { ip, port, protocol },
            name,
            backends,
        };
        v.normalize();
        v
    }

    /// The DC/OS `vip` string: `<name>:<port>` for named VIPs, `<ip>:<port>` (or `[v6]:port`)
    /// for IP VIPs.
    pub fn vip_string(&self) -> String {
        match &self.name {
            Some(n) => format!("{}:{}", n.fqdn(), self.key.port),
            None => self.key.socket_addr().to_string(),
        }
    }

    /// Backends eligible for new flows.
    pub fn active_backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
    }

    /// Sort backends by address and keep one entry per address (an active entry wins over a
    /// draining one).
    pub fn normalize(&mut self) {
        self.backends
            .sort_by(|a, b| a.addr.cmp(&b.addr).then(a.state.cmp(&b.state)));
        self.backends
            .dedup_by(|later, earlier| later.addr == earlier.addr);
    }
}

/// A port of a running task, for SRV task names: reachable at the task's host address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskPort {
    pub port: u16,
    pub protocol: Protocol,
    /// The port's name in the app definition, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One running task, for task names (the Mesos-DNS job). Source-neutral: a Marathon app's
/// task or a Mesos task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    /// The agent's address (`None` when its host name did not resolve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<IpAddr>,
    /// The task's own addresses (container networking), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container: Vec<IpAddr>,
    /// Host ports, in the app's port order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<TaskPort>,
}

/// The running tasks of one app (every app, labelled or not), sorted by id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppTasks {
    /// The task name as Mesos knows it: Marathon names an app `/a/b/web`'s tasks `web.b.a`.
    /// DNS mangles it into one label (`web-b-a`), as Mesos-DNS does.
    pub name: String,
    pub framework: String,
    pub tasks: Vec<TaskRecord>,
}

/// An immutable, versioned VIP table. Cheap to clone (VIPs are shared `Arc`s), so a new table
/// that differs in one VIP shares every other VIP with its predecessor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipTable {
    /// Increases with every published change. 0 means "no table yet".
    pub version: u64,
    /// Wall-clock time (Unix ms) at which the change that produced this version was first
    /// seen at the source; used for the propagation-delay metric. 0 when unknown.
    pub changed_at_ms: u64,
    pub vips: BTreeMap<VipKey, Arc<Vip>>,
    /// Running tasks per app (key: the app's id at its source, `/a/b/web`), for task names.
    pub apps: BTreeMap<String, Arc<AppTasks>>,
}

impl VipTable {
    pub fn new(version: u64, vips: impl IntoIterator<Item = Vip>) -> Self {
        let vips = vips
            .into_iter()
            .map(|mut v| {
                v.normalize();
                (v.key, Arc::new(v))
            })
            .collect();
        VipTable {
            version,
            changed_at_ms: 0,
            vips,
            apps: BTreeMap::new(),
        }
    }

    /// The same table with these apps' tasks.
    pub fn with_apps(mut self, apps: impl IntoIterator<Item = (String, Arc<AppTasks>)>) -> Self {
        self.apps = apps.into_iter().collect();
        self
    }

    /// `self` changed into version `to`: `remove` and `remove_apps` gone, `upsert` and
    /// `upsert_apps` put in (replacing what had their keys). What both readers of a delta
    /// (`wire::DeltaJson`, `delta_in::Delta`) do once they have model types.
    pub fn patched(
        &self,
        to: u64,
        remove: impl IntoIterator<Item = VipKey>,
        upsert: impl IntoIterator<Item = Vip>,
        remove_apps: impl IntoIterator<Item = String>,
        upsert_apps: impl IntoIterator<Item = (String, Arc<AppTasks>)>,
    ) -> VipTable {
        let mut t = self.clone();
        t.version = to;
        for k in remove {
            t.vips.remove(&k);
        }
        for mut v in upsert {
            v.normalize();
            t.vips.insert(v.key, Arc::new(v));
        }
        for app in remove_apps {
            t.apps.remove(&app);
        }
        t.apps.extend(upsert_apps);
        t
    }

    /// Same VIPs as `self` (by value), ignoring version and timestamps.
    pub fn same_content(&self, other: &VipTable) -> bool {
        self.vips.len() == other.vips.len()
            && self
                .vips
                .iter()
                .zip(other.vips.iter())
                .all(|((ka, a), (kb, b))| ka == kb && (Arc::ptr_eq(a, b) || a == b))
            && self.apps == other.apps
    }

    /// Reuse the `Arc` of every VIP that is unchanged from `prev`, so later diffs can skip it
    /// by pointer comparison.
    pub fn share_with(mut self, prev: &VipTable) -> Self {
        for (key, vip) in self.vips.iter_mut() {
            if let Some(old) = prev.vips.get(key)
                && (Arc::ptr_eq(old, vip) || **old == **vip)
            {
                *vip = Arc::clone(old);
            }
        }
        for (app, tasks) in self.apps.iter_mut() {
            if let Some(old) = prev.apps.get(app)
                && (Arc::ptr_eq(old, tasks) || **old == **tasks)
            {
                *tasks = Arc::clone(old);
            }
        }
        self
    }

    /// The VIPs in API order: by `vip` string, then protocol, then address (a dual-stack
    /// name's IPv4 address before its IPv6 one).
    pub fn sorted_for_api(&self) -> Vec<&Arc<Vip>> {
        let mut v: Vec<_> = self.vips.values().collect();
        v.sort_by_cached_key(|vip| (vip.vip_string(), vip.key.protocol, vip.key.ip));
        v
    }

    pub fn backend_count(&self) -> usize {
        self.vips.values().map(|v| v.backends.len()).sum()
    }
}

/// Current wall-clock time in Unix milliseconds (0 if the clock is before 1970).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// A running task at `host` (and `container` addresses) with unnamed host `ports`.
    pub(crate) fn task_record(
        id: &str,
        host: &str,
        container: &[&str],
        ports: &[(u16, Protocol)],
    ) -> TaskRecord {
        TaskRecord {
            id: id.into(),
            host: Some(host.parse().expect("ip")),
            container: container.iter().map(|c| c.parse().expect("ip")).collect(),
            ports: ports
                .iter()
                .map(|(port, protocol)| TaskPort {
                    port: *port,
                    protocol: *protocol,
                    name: None,
                })
                .collect(),
        }
    }

    pub(crate) fn backend(addr: &str, state: BackendState) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            state,
            app: "/app".into(),
            task: format!("app.{addr}").into(),
        }
    }

    /// A named VIP (framework `marathon`) without backends.
    pub(crate) fn named(label: &str, ip: &str, port: u16, protocol: Protocol) -> Vip {
        let name = VipName::new(label, "marathon");
        Vip::normalized((ip.parse().unwrap(), port, protocol), Some(name), vec![])
    }

    pub(crate) fn vip(ip: &str, port: u16, backends: &[&str]) -> Vip {
        Vip {
            key: VipKey {
                ip: ip.parse().unwrap(),
                port,
                protocol: Protocol::Tcp,
            },
            name: None,
            backends: backends
                .iter()
                .map(|b| backend(b, BackendState::Active))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn normalize_sorts_and_prefers_active_duplicate() {
        let mut v = vip("11.0.0.1", 80, &[]);
        v.backends = vec![
            backend("10.0.0.2:2", BackendState::Active),
            backend("10.0.0.1:1", BackendState::Draining),
            backend("10.0.0.1:1", BackendState::Active),
        ];
        v.normalize();
        assert_eq!(v.backends.len(), 2);
        assert_eq!(v.backends[0].addr, "10.0.0.1:1".parse().unwrap());
        assert_eq!(v.backends[0].state, BackendState::Active);
    }

    #[test]
    fn api_order_is_by_vip_string_then_protocol() {
        let t = VipTable::new(
            1,
            vec![
                named("web", "11.0.0.3", 53, Protocol::Udp),
                vip("11.0.0.9", 80, &[]),
                named("web", "11.0.0.3", 53, Protocol::Tcp),
                vip("11.0.0.10", 80, &[]),
                named("api", "11.0.0.4", 80, Protocol::Tcp),
                vip("fd01::1", 80, &[]),
            ],
        );
        let order: Vec<String> = t
            .sorted_for_api()
            .iter()
            .map(|v| format!("{} {}", v.vip_string(), v.key.protocol))
            .collect();
        // As strings: "11.0.0.10" before "11.0.0.9", "[" after digits, names after both.
        assert_eq!(
            order,
            [
                "11.0.0.10:80 tcp",
                "11.0.0.9:80 tcp",
                "[fd01::1]:80 tcp",
                "api.marathon.l4lb.thisdcos.directory:80 tcp",
                "web.marathon.l4lb.thisdcos.directory:53 tcp",
                "web.marathon.l4lb.thisdcos.directory:53 udp",
            ]
        );
    }

    #[test]
    fn vip_string_named_ip_and_v6() {
        let mut v = vip("11.0.0.1", 80, &[]);
        assert_eq!(v.vip_string(), "11.0.0.1:80");
        v.name = Some(VipName {
            label: "web".into(),
            framework: "marathon".into(),
        });
        assert_eq!(v.vip_string(), "web.marathon.l4lb.thisdcos.directory:80");
        let v6 = vip("fd01::1", 80, &[]);
        assert_eq!(v6.vip_string(), "[fd01::1]:80");
    }

    #[test]
    fn share_with_reuses_unchanged_arcs() {
        let a = VipTable::new(
            1,
            [
                vip("11.0.0.1", 80, &["1.1.1.1:1"]),
                vip("11.0.0.2", 80, &[]),
            ],
        );
        let b = VipTable::new(
            2,
            [
                vip("11.0.0.1", 80, &["1.1.1.1:1"]),
                vip("11.0.0.2", 80, &["2.2.2.2:2"]),
            ],
        )
        .share_with(&a);
        let k1 = *a.vips.keys().next().unwrap();
        assert!(Arc::ptr_eq(&a.vips[&k1], &b.vips[&k1]));
        assert!(!a.same_content(&b));
        assert!(a.same_content(&a.clone()));
    }
}
