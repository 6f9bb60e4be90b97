//! Marathon apps → VIP table (pure). Per app: its labelled ports, their backends by networking
//! mode and task state ([`app_vips`]); across apps: merge VIPs claimed by several apps,
//! allocate named-VIP addresses and apply the IP-VIP safety rules ([`assemble`]).
//!
//! The per-app step is separate so an event about one app re-computes only that app.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_json::Value;

use super::marathon::types::{App, PortMapping, Task};
use crate::labels::{self, IpPolicy, LabelError, VipLabel};
use crate::model::{
    AppTasks, Backend, BackendState, Protocol, TaskPort, TaskRecord, Vip, VipKey, VipName,
};
use crate::vip_alloc::{Family, VipAllocator};

/// A label that did not make it into the table, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rejection {
    pub app: String,
    pub port_index: usize,
    pub key: String,
    pub value: String,
    pub error: String,
    pub reason: &'static str,
}

impl Rejection {
    /// The shared form the API and `l4lb check` show.
    pub fn to_model(&self, since_ms: u64) -> crate::model::status::LabelRejection {
        crate::model::status::LabelRejection {
            app: self.app.clone(),
            port_index: self.port_index,
            key: self.key.clone(),
            value: self.value.clone(),
            reason: self.reason.to_string(),
            error: self.error.clone(),
            since_ms,
        }
    }

    pub(super) fn new(
        app: &str,
        port_index: usize,
        key: &str,
        value: &str,
        e: &LabelError,
    ) -> Self {
        Rejection {
            app: app.to_string(),
            port_index,
            key: key.to_string(),
            value: value.to_string(),
            error: e.to_string(),
            reason: e.reason(),
        }
    }
}

/// One VIP label on one port of one app, with that port's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub target: VipLabel,
    pub protocol: Protocol,
    pub backends: Vec<Backend>,
    pub port_index: usize,
    pub key: String,
    pub value: String,
}

/// Everything one app contributes to the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppVips {
    pub app: String,
    pub entries: Vec<Entry>,
    pub rejections: Vec<Rejection>,
    /// Task hosts and backend addresses: an IP VIP equal to one of these is refused.
    pub cluster_addrs: Vec<IpAddr>,
    /// Task hosts that did not resolve (their tasks are skipped).
    pub unresolved_hosts: Vec<String>,
    /// The framework part of this app's VIP names; `None`: the configured `--framework`
    /// (Marathon). The Mesos source sets each task's framework name, mangled.
    pub framework: Option<String>,
    /// The app's running tasks, labelled ports or not (for task names), sorted by id.
    pub tasks: Vec<TaskRecord>,
    /// The Mesos task name these tasks are served under; `None`: derived from the Marathon
    /// app id ([`task_name`]). The Mesos source sets each task's own name.
    pub task_name: Option<String>,
}

impl AppVips {
    /// One entry of a labelled port per protocol it names, all with the same backends.
    pub fn push_entries(
        &mut self,
        protocols: &[Protocol],
        target: &VipLabel,
        backends: &[Backend],
        port_index: usize,
        key: &str,
        value: &str,
    ) {
        for &protocol in protocols {
            self.entries.push(Entry {
                target: target.clone(),
                protocol,
                backends: backends.to_vec(),
                port_index,
                key: key.to_string(),
                value: value.to_string(),
            });
        }
    }

    /// Contributes nothing to a table: no VIP entry, rejection, task or address.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.rejections.is_empty()
            && self.cluster_addrs.is_empty()
            && self.unresolved_hosts.is_empty()
            && self.tasks.is_empty()
    }

    /// The framework this app's names live under.
    pub fn framework_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.framework.as_deref().unwrap_or(default)
    }

    /// The name `label` of this app is served as.
    pub fn name(&self, label: &str, default_framework: &str) -> VipName {
        VipName {
            label: label.to_string(),
            framework: self.framework_or(default_framework).to_string(),
        }
    }
}

/// The Mesos task name Marathon gives an app's tasks: the id's path reversed, dot-joined
/// (`/a/b/web` → `web.b.a`), which Mesos-DNS turns into the name `web-b-a.marathon.mesos`.
pub fn task_name(app_id: &str) -> String {
    let parts: Vec<&str> = app_id.split('/').filter(|p| !p.is_empty()).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join(".")
}

/// Every app's running tasks, keyed by app id (apps without one left out).
pub fn app_tasks<'a>(
    apps: impl IntoIterator<Item = &'a AppVips>,
    framework: &str,
) -> BTreeMap<String, Arc<AppTasks>> {
    apps.into_iter()
        .filter_map(|a| Some((a.app.clone(), tasks_of(a, framework)?)))
        .collect()
}

/// One app's running tasks; `None` when it has none.
pub fn tasks_of(a: &AppVips, framework: &str) -> Option<Arc<AppTasks>> {
    (!a.tasks.is_empty()).then(|| {
        Arc::new(AppTasks {
            name: a.task_name.clone().unwrap_or_else(|| task_name(&a.app)),
            framework: a.framework_or(framework).to_string(),
            tasks: a.tasks.clone(),
        })
    })
}

/// The running tasks of `app` (TASK_RUNNING, healthy or not: task names list every instance,
/// as Mesos-DNS does) with their host, container addresses and host ports. Container
/// addresses only in container networking: in host and bridge mode `ipAddresses` holds the
/// agent's or a non-routable bridge address (§4), which no other host can reach.
fn running_tasks(
    app: &App,
    mode: Mode,
    ports: &[Port<'_>],
    hosts: &HashMap<&str, Option<IpAddr>>,
) -> Vec<TaskRecord> {
    let mut out: Vec<TaskRecord> = app
        .tasks
        .iter()
        .flatten()
        .filter(|t| t.state.as_deref() == Some("TASK_RUNNING"))
        .map(|t| {
            let host = t
                .host
                .as_deref()
                .and_then(|h| hosts.get(h).copied().flatten());
            let mut container: Vec<IpAddr> = t
                .ip_addresses
                .iter()
                .flatten()
                .filter(|_| mode == Mode::Container)
                .filter_map(|a| a.ip_address.as_deref()?.parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical())
                .collect();
            container.sort();
            container.dedup();
            let task_ports = t.ports.as_deref().unwrap_or_default();
            let mut tp = Vec::new();
            for p in ports {
                let Some(port) = p
                    .host_port_index
                    .and_then(|i| task_ports.get(i))
                    .and_then(|p| u16::try_from(*p).ok())
                    .filter(|p| *p != 0)
                else {
                    continue;
                };
                for protocol in protocols(p.protocol).unwrap_or_default() {
                    tp.push(TaskPort {
                        port,
                        protocol,
                        name: p.name.map(str::to_string),
                    });
                }
            }
            TaskRecord {
                id: t.id.clone(),
                host,
                container,
                ports: tp,
            }
        })
        .filter(|t| t.host.is_some() || !t.container.is_empty())
        .collect();
    out.sort();
    out
}

/// How an app's tasks are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Host,
    Bridge,
    Container,
}

fn mode(app: &App) -> Mode {
    if let Some(first) = app.networks.as_ref().and_then(|n| n.first()) {
        return match first.mode.as_deref() {
            Some("container/bridge") => Mode::Bridge,
            Some("container") => Mode::Container,
            _ => Mode::Host,
        };
    }
    match app
        .container
        .as_ref()
        .and_then(|c| c.docker.as_ref())
        .and_then(|d| d.network.as_deref())
    {
        Some("BRIDGE") => Mode::Bridge,
        Some("USER") => Mode::Container,
        _ => Mode::Host,
    }
}

/// A labelled port, whatever the networking mode.
struct Port<'a> {
    protocol: Option<&'a str>,
    name: Option<&'a str>,
    labels: Option<&'a BTreeMap<String, Value>>,
    mapping: Option<&'a PortMapping>,
    /// Index into `task.ports` of this port's host port, if it has one.
    host_port_index: Option<usize>,
}

fn ports(app: &App, mode: Mode) -> Vec<Port<'_>> {
    if mode == Mode::Host {
        return app
            .port_definitions
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| Port {
                protocol: p.protocol.as_deref(),
                name: p.name.as_deref(),
                labels: p.labels.as_ref(),
                mapping: None,
                host_port_index: Some(i),
            })
            .collect();
    }
    let container = app.container.as_ref();
    let mappings = container
        .and_then(|c| c.port_mappings.as_ref())
        .or_else(|| {
            container
                .and_then(|c| c.docker.as_ref())
                .and_then(|d| d.port_mappings.as_ref())
        })
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut next_host = 0;
    mappings
        .iter()
        .map(|m| {
            // Bridge mappings always get a host port (hostPort absent means 0: dynamic); in
            // container mode only mappings that name a hostPort do, and task.ports lists just
            // those, in order.
            let has_host = mode == Mode::Bridge || m.host_port.is_some();
            let host_port_index = has_host.then(|| {
                next_host += 1;
                next_host - 1
            });
            Port {
                protocol: m.protocol.as_deref(),
                name: m.name.as_deref(),
                labels: m.labels.as_ref(),
                mapping: Some(m),
                host_port_index,
            }
        })
        .collect()
}

/// The port's `protocol` ("tcp", "udp", "udp,tcp"; absent means tcp). Anything else (say
/// "sctp") is refused rather than served as TCP.
pub(super) fn protocols(p: Option<&str>) -> Result<Vec<Protocol>, LabelError> {
    let mut out = Vec::new();
    for part in p.unwrap_or("tcp").split(',') {
        let proto = match part.trim().to_ascii_lowercase().as_str() {
            "udp" => Protocol::Udp,
            "tcp" => Protocol::Tcp,
            _ => return Err(LabelError::BadProtocol(p.unwrap_or_default().to_string())),
        };
        if !out.contains(&proto) {
            out.push(proto);
        }
    }
    Ok(out)
}

fn task_state(app: &App, task: &Task) -> Option<BackendState> {
    match task.state.as_deref() {
        Some("TASK_RUNNING") => {
            let checks = app.health_checks.as_ref().map_or(0, Vec::len);
            if checks == 0 {
                return Some(BackendState::Active);
            }
            // Marathon reports one result per check once it has run: a check with no result
            // yet is "not yet checked".
            let results = task.health_check_results.as_deref().unwrap_or_default();
            if results.len() >= checks && results.iter().all(|r| r.alive) {
                Some(BackendState::Active)
            } else {
                Some(BackendState::Draining)
            }
        }
        Some("TASK_KILLING") => Some(BackendState::Draining),
        _ => None,
    }
}

/// The addresses a task serves labelled port `port` on.
fn task_addrs(
    mode: Mode,
    port: &Port<'_>,
    task: &Task,
    host: Option<IpAddr>,
) -> Result<Vec<SocketAddr>, LabelError> {
    let host_port = |idx: usize| -> Result<SocketAddr, LabelError> {
        let p = task
            .ports
            .as_ref()
            .and_then(|ps| ps.get(idx))
            .and_then(|p| u16::try_from(*p).ok())
            .filter(|p| *p != 0)
            .ok_or(LabelError::NoTaskPort(idx))?;
        // A task without a resolvable host is filtered out before we get here.
        host.map(|h| SocketAddr::new(h, p))
            .ok_or(LabelError::NoTaskPort(idx))
    };
    match (mode, port.host_port_index) {
        (Mode::Host | Mode::Bridge, Some(i)) => Ok(vec![host_port(i)?]),
        (Mode::Container, Some(i)) => Ok(vec![host_port(i)?]),
        (_, None) => {
            let cport = port
                .mapping
                .and_then(|m| m.container_port)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .ok_or(LabelError::NoTaskPort(0))?;
            Ok(task
                .ip_addresses
                .iter()
                .flatten()
                .filter_map(|a| a.ip_address.as_deref()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, cport))
                .collect())
        }
    }
}

/// What one app contributes: its VIP labels with their backends, and its rejected labels.
/// `resolve` maps `task.host` to an address (IP literals never reach it).
pub fn app_vips(app: &App, resolve: &mut dyn FnMut(&str) -> Option<IpAddr>) -> AppVips {
    let mode = mode(app);
    let mut out = AppVips {
        app: app.id.clone(),
        ..AppVips::default()
    };
    let tasks = app.tasks.as_deref().unwrap_or_default();
    let app_id: Arc<str> = app.id.as_str().into();
    let task_ids: Vec<Arc<str>> = tasks.iter().map(|t| t.id.as_str().into()).collect();
    let mut hosts: HashMap<&str, Option<IpAddr>> = HashMap::new();
    for t in tasks {
        if let Some(h) = t.host.as_deref() {
            hosts
                .entry(h)
                .or_insert_with(|| h.parse::<IpAddr>().ok().or_else(|| resolve(h)));
        }
    }
    for (h, ip) in &hosts {
        match ip {
            Some(ip) => out.cluster_addrs.push(*ip),
            None => out.unresolved_hosts.push(h.to_string()),
        }
    }
    // Every task's own addresses (container networking), whatever its state and whether or
    // not a port is labelled: an IP VIP on one of them would take over that task's traffic.
    out.cluster_addrs.extend(
        tasks
            .iter()
            .flat_map(|t| t.ip_addresses.iter().flatten())
            .filter_map(|a| a.ip_address.as_deref()?.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical()),
    );
    let app_ports = ports(app, mode);
    out.tasks = running_tasks(app, mode, &app_ports, &hosts);
    for (idx, port) in app_ports.iter().enumerate() {
        let Some(labels) = port.labels else { continue };
        for (key, value) in labels.iter().filter(|(k, _)| labels::is_vip_key(k)) {
            let Some(value) = value.as_str() else {
                let e = LabelError::NotAString(value.to_string());
                out.rejections
                    .push(Rejection::new(&app.id, idx, key, &value.to_string(), &e));
                continue;
            };
            let parsed =
                protocols(port.protocol).and_then(|ps| Ok((ps, labels::parse_value(value)?)));
            let (protos, target) = match parsed {
                Ok(t) => t,
                Err(e) => {
                    out.rejections
                        .push(Rejection::new(&app.id, idx, key, value, &e));
                    continue;
                }
            };
            let mut backends = Vec::new();
            for (ti, t) in tasks.iter().enumerate() {
                let Some(state) = task_state(app, t) else {
                    continue;
                };
                let host = t
                    .host
                    .as_deref()
                    .and_then(|h| hosts.get(h).copied().flatten());
                if host.is_none() && port.host_port_index.is_some() {
                    continue;
                }
                // A task without the port (still staging, old shape) is not a backend.
                let Ok(addrs) = task_addrs(mode, port, t, host) else {
                    continue;
                };
                for addr in addrs {
                    out.cluster_addrs.push(addr.ip());
                    backends.push(Backend {
                        addr,
                        state,
                        app: Arc::clone(&app_id),
                        task: Arc::clone(&task_ids[ti]),
                    });
                }
            }
            out.push_entries(&protos, &target, &backends, idx, key, value);
        }
    }
    legacy_vips(app, tasks, &task_ids, &hosts, &mut out);
    out.cluster_addrs.sort();
    out.cluster_addrs.dedup();
    out
}

/// App-level legacy labels `VIP_PORT<n>: "tcp://<name-or-ip>:<port>"`: a VIP whose backends
/// are each task's `n`-th host port (`task.ports[n]` on the task's host). A task without an
/// `n`-th port is no backend; a label that does not parse is a rejection, never ignored.
fn legacy_vips(
    app: &App,
    tasks: &[Task],
    task_ids: &[Arc<str>],
    hosts: &HashMap<&str, Option<IpAddr>>,
    out: &mut AppVips,
) {
    let Some(labels) = &app.labels else { return };
    let app_id: Arc<str> = app.id.as_str().into();
    for (key, value) in labels.iter().filter(|(k, _)| labels::is_legacy_key(k)) {
        let parsed = match value.as_str() {
            Some(v) => labels::parse_legacy(key, v),
            None => Err(LabelError::NotAString(value.to_string())),
        };
        let text = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_string);
        let legacy = match parsed {
            Ok(l) => l,
            Err(e) => {
                out.rejections
                    .push(Rejection::new(&app.id, 0, key, &text, &e));
                continue;
            }
        };
        let mut backends = Vec::new();
        for (ti, t) in tasks.iter().enumerate() {
            let Some(state) = task_state(app, t) else {
                continue;
            };
            let Some(host) = t
                .host
                .as_deref()
                .and_then(|h| hosts.get(h).copied().flatten())
            else {
                continue;
            };
            let Some(port) = t
                .ports
                .as_ref()
                .and_then(|ps| ps.get(legacy.port_index))
                .and_then(|p| u16::try_from(*p).ok())
                .filter(|p| *p != 0)
            else {
                continue;
            };
            let addr = SocketAddr::new(host, port);
            out.cluster_addrs.push(addr.ip());
            backends.push(Backend {
                addr,
                state,
                app: Arc::clone(&app_id),
                task: Arc::clone(&task_ids[ti]),
            });
        }
        out.entries.push(Entry {
            target: legacy.target,
            protocol: legacy.protocol,
            backends,
            port_index: legacy.port_index,
            key: key.clone(),
            value: text,
        });
    }
}

/// The result of merging every app's contribution.
#[derive(Debug, Default)]
pub struct Built {
    pub vips: Vec<Vip>,
    pub rejections: Vec<Rejection>,
}

/// Merge apps into VIPs: the same VIP claimed by several apps is one VIP with the union of
/// their backends; named VIPs get addresses from `alloc`; IP VIPs pass `policy` and must not
/// be an address the cluster already uses.
pub fn assemble<'a>(
    apps: impl IntoIterator<Item = &'a AppVips>,
    framework: &str,
    policy: &IpPolicy,
    alloc: &mut VipAllocator,
) -> Built {
    let apps: Vec<&AppVips> = apps.into_iter().collect();
    let cluster: HashSet<IpAddr> = apps
        .iter()
        .flat_map(|a| a.cluster_addrs.iter().copied())
        .collect();
    let mut rejections: Vec<Rejection> = apps
        .iter()
        .flat_map(|a| a.rejections.iter().cloned())
        .collect();

    // IP VIPs first: they reserve their addresses against named-VIP allocation.
    let mut ip_vips: Vec<(&AppVips, &Entry, IpAddr, u16)> = Vec::new();
    let mut named: BTreeMap<VipName, Vec<(&AppVips, &Entry, u16)>> = BTreeMap::new();
    for app in &apps {
        for e in &app.entries {
            match &e.target {
                VipLabel::Ip { ip, port } => {
                    let checked = policy.check(*ip).and_then(|()| {
                        if cluster.contains(ip) {
                            Err(LabelError::ClusterAddress(*ip))
                        } else if alloc.in_range(*ip) {
                            // Named VIPs own that range: an IP VIP there could land on a
                            // name's address and take its traffic.
                            Err(LabelError::NamedVipRange(*ip))
                        } else {
                            Ok(())
                        }
                    });
                    match checked {
                        Ok(()) => ip_vips.push((app, e, *ip, *port)),
                        Err(err) => rejections.push(Rejection::new(
                            &app.app,
                            e.port_index,
                            &e.key,
                            &e.value,
                            &err,
                        )),
                    }
                }
                VipLabel::Named { label, port } => named
                    .entry(app.name(label, framework))
                    .or_default()
                    .push((app, e, *port)),
            }
        }
    }
    let reserved: HashSet<IpAddr> = ip_vips.iter().map(|(_, _, ip, _)| *ip).collect();
    let mut wants = BTreeSet::new();
    for (name, uses) in &named {
        let key = format!("{}.{}", name.label, name.framework);
        wants.insert((key.clone(), Family::V4));
        if uses
            .iter()
            .any(|(_, e, _)| e.backends.iter().any(|b| b.addr.is_ipv6()))
        {
            wants.insert((key, Family::V6));
        }
    }
    let assignment = alloc.assign(&wants, &reserved);
    // Names that got no address, per family: without IPv4 the name is rejected; without
    // IPv6 it keeps its IPv4 VIPs (and the rejection says IPv6 ran out).
    let exhausted: HashSet<(&str, Family)> = assignment
        .failed
        .iter()
        .map(|(n, f, _)| (n.as_str(), *f))
        .collect();

    let mut vips: BTreeMap<VipKey, Vip> = BTreeMap::new();
    let mut add = |key: VipKey, name: Option<VipName>, backends: &[Backend]| {
        let v = vips.entry(key).or_insert_with(|| Vip {
            key,
            name: name.clone(),
            backends: Vec::new(),
        });
        v.backends.extend_from_slice(backends);
    };
    for (_, e, ip, port) in &ip_vips {
        let key = VipKey {
            ip: *ip,
            port: *port,
            protocol: e.protocol,
        };
        add(key, None, &e.backends);
    }
    for (name, uses) in &named {
        let key = format!("{}.{}", name.label, name.framework);
        for (fam, cidr) in [(Family::V4, "--vip-cidr"), (Family::V6, "--vip-cidr6")] {
            if exhausted.contains(&(key.as_str(), fam)) {
                for (app, e, _) in uses {
                    let err = LabelError::Exhausted(name.label.clone(), cidr);
                    rejections.push(Rejection::new(
                        &app.app,
                        e.port_index,
                        &e.key,
                        &e.value,
                        &err,
                    ));
                }
            }
        }
        if exhausted.contains(&(key.as_str(), Family::V4)) {
            // A rejected name holds no address at all.
            alloc.release(&key, Family::V6);
            continue;
        }
        for fam in [Family::V4, Family::V6] {
            let Some(ip) = assignment.addrs.get(&(key.clone(), fam)) else {
                continue;
            };
            for (_, e, port) in uses {
                let vk = VipKey {
                    ip: *ip,
                    port: *port,
                    protocol: e.protocol,
                };
                add(vk, Some(name.clone()), &e.backends);
            }
        }
    }
    let vips = vips
        .into_values()
        .map(|mut v| {
            v.normalize();
            v
        })
        .collect();
    rejections.sort();
    rejections.dedup();
    Built { vips, rejections }
}

#[cfg(test)]
mod tests;
