//! The VIP entry builder (pure): labelled ports in, VIP table entries out. Every source
//! (Marathon apps and pods, Mesos tasks) turns what it reads into a [`Contribution`] through
//! the same steps: a port's VIP labels parsed with its protocols, or rejected with a reason
//! ([`Contribution::add_port`], [`Contribution::add_legacy`]); across contributions, VIPs
//! claimed by several merged, named-VIP addresses allocated and the IP-VIP safety rules
//! applied ([`assemble`]). Knows no source's payloads: their input is neutral
//! ([`LabelValue`], backends the source computed).
//!
//! A contribution is one app, pod or task, so an event about one re-computes only that one.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::labels::{self, IpPolicy, LabelError, VipLabel};
use crate::model::{AppTasks, Backend, Protocol, TaskRecord, Vip, VipKey, VipName};
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

    pub fn new(app: &str, port_index: usize, key: &str, value: &str, e: &LabelError) -> Self {
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

/// A label's value as a source read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelValue<'a> {
    Text(&'a str),
    /// Not a string (Marathon's labels are JSON values): its JSON text. Always rejected.
    NotText(String),
}

impl LabelValue<'_> {
    /// The value as shown in a rejection.
    fn text(&self) -> &str {
        match self {
            LabelValue::Text(t) => t,
            LabelValue::NotText(t) => t,
        }
    }

    /// The text, or the rejection of a value that is not text.
    fn parse<T>(&self, f: impl FnOnce(&str) -> Result<T, LabelError>) -> Result<T, LabelError> {
        match self {
            LabelValue::Text(t) => f(t),
            LabelValue::NotText(t) => Err(LabelError::NotAString(t.clone())),
        }
    }
}

/// A contribution's hosts (names or IP literals), each resolved once.
pub type Hosts<'h> = BTreeMap<&'h str, Option<IpAddr>>;

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

/// Everything one app, pod or Mesos task contributes to the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contribution {
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
    /// Tasks served under names of their own beside [`Contribution::tasks`], as
    /// `(task name, tasks sorted by id)`: a Marathon pod's containers, each a Mesos task
    /// named after its container, as Mesos-DNS serves them.
    pub named_tasks: Vec<(String, Vec<TaskRecord>)>,
}

impl Contribution {
    /// The entries of one labelled port: each VIP label among `labels` (other keys are
    /// skipped) parsed with the port's `protocol` (`"tcp"`, `"udp,tcp"`; absent: tcp), one
    /// entry per protocol, or rejected at `index` with its reason. Every entry is served by
    /// the port's backends, which `backends` computes once, when a first label parses.
    pub fn add_port<'a>(
        &mut self,
        index: usize,
        protocol: Option<&str>,
        labels: impl IntoIterator<Item = (&'a str, LabelValue<'a>)>,
        backends: impl FnOnce(&mut Self) -> Vec<Backend>,
    ) {
        let mut backends = Some(backends);
        let mut served: Option<Vec<Backend>> = None;
        for (key, value) in labels.into_iter().filter(|(k, _)| labels::is_vip_key(k)) {
            let parsed = value
                .parse(|v| protocols(protocol).and_then(|ps| Ok((ps, labels::parse_value(v)?))));
            let (protos, target) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    self.reject(index, key, value.text(), &e);
                    continue;
                }
            };
            let served =
                served.get_or_insert_with(|| backends.take().map_or_else(Vec::new, |f| f(self)));
            self.push_entries(&protos, &target, served, index, key, value.text());
        }
    }

    /// The entries of legacy labels `VIP_PORT<n>: "tcp://<name-or-ip>:<port>"` among `labels`
    /// (other keys are skipped): one VIP served by the backends `backends` gives for port `n`,
    /// or a rejection (at 0 when the label does not parse, at `n` when `backends` refuses).
    pub fn add_legacy<'a>(
        &mut self,
        labels: impl IntoIterator<Item = (&'a str, LabelValue<'a>)>,
        mut backends: impl FnMut(usize, &mut Self) -> Result<Vec<Backend>, LabelError>,
    ) {
        for (key, value) in labels.into_iter().filter(|(k, _)| labels::is_legacy_key(k)) {
            let legacy = match value.parse(|v| labels::parse_legacy(key, v)) {
                Ok(l) => l,
                Err(e) => {
                    self.reject(0, key, value.text(), &e);
                    continue;
                }
            };
            match backends(legacy.port_index, self) {
                Ok(backends) => self.entries.push(Entry {
                    target: legacy.target,
                    protocol: legacy.protocol,
                    backends,
                    port_index: legacy.port_index,
                    key: key.to_string(),
                    value: value.text().to_string(),
                }),
                Err(e) => self.reject(legacy.port_index, key, value.text(), &e),
            }
        }
    }

    /// Resolve each of `hosts` once (an IP literal is its own address; a name goes to
    /// `resolve`), noting every address as a cluster address and every name that does not
    /// resolve.
    pub fn resolve_hosts<'h>(
        &mut self,
        hosts: impl IntoIterator<Item = &'h str>,
        resolve: &mut dyn FnMut(&str) -> Option<IpAddr>,
    ) -> Hosts<'h> {
        let mut out = Hosts::new();
        for h in hosts {
            out.entry(h)
                .or_insert_with(|| h.parse::<IpAddr>().ok().or_else(|| resolve(h)));
        }
        for (h, ip) in &out {
            match ip {
                Some(ip) => self.cluster_addrs.push(ip.to_canonical()),
                None => self.unresolved_hosts.push(h.to_string()),
            }
        }
        out
    }

    fn reject(&mut self, index: usize, key: &str, value: &str, e: &LabelError) {
        let r = Rejection::new(&self.app, index, key, value, e);
        self.rejections.push(r);
    }

    /// Sort and deduplicate the cluster addresses (once every address is in).
    pub fn finish(&mut self) {
        self.cluster_addrs.sort();
        self.cluster_addrs.dedup();
    }

    /// One entry of a labelled port per protocol it names, all with the same backends.
    fn push_entries(
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

/// Every app's running tasks, keyed by app id (apps without one left out; a pod's
/// containers under `<pod id>::<container>`).
pub fn app_tasks<'a>(
    apps: impl IntoIterator<Item = &'a Contribution>,
    framework: &str,
) -> BTreeMap<String, Arc<AppTasks>> {
    apps.into_iter()
        .flat_map(|a| all_tasks_of(a, framework))
        .collect()
}

/// One app's running tasks under their keys in [`app_tasks`]: its own ([`tasks_of`]) under
/// the app id, and each of its [`Contribution::named_tasks`] under `<app id>::<name>`.
pub fn all_tasks_of(a: &Contribution, framework: &str) -> Vec<(String, Arc<AppTasks>)> {
    let own = tasks_of(a, framework).map(|t| (a.app.clone(), t));
    let named = a
        .named_tasks
        .iter()
        .filter(|(_, tasks)| !tasks.is_empty())
        .map(|(name, tasks)| {
            let t = AppTasks {
                name: name.clone(),
                framework: a.framework_or(framework).to_string(),
                tasks: tasks.clone(),
            };
            (format!("{}::{name}", a.app), Arc::new(t))
        });
    own.into_iter().chain(named).collect()
}

/// One app's running tasks; `None` when it has none.
pub fn tasks_of(a: &Contribution, framework: &str) -> Option<Arc<AppTasks>> {
    (!a.tasks.is_empty()).then(|| {
        Arc::new(AppTasks {
            name: a.task_name.clone().unwrap_or_else(|| task_name(&a.app)),
            framework: a.framework_or(framework).to_string(),
            tasks: a.tasks.clone(),
        })
    })
}

/// The port's `protocol` ("tcp", "udp", "udp,tcp"; absent means tcp). Anything else (say
/// "sctp") is refused rather than served as TCP.
pub fn protocols(p: Option<&str>) -> Result<Vec<Protocol>, LabelError> {
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

/// The families a named VIP has an address in, from all its backends (draining ones too):
/// each family among them, IPv4 from `--vip-cidr`, IPv6 from `--vip-cidr6`. A name with no
/// backend at all has IPv4 alone, so an app scaled to zero keeps its A address.
pub fn name_families<'b>(backends: impl IntoIterator<Item = &'b Backend>) -> Vec<Family> {
    let (mut v4, mut v6) = (false, false);
    for b in backends {
        match Family::of(b.addr.ip()) {
            Family::V4 => v4 = true,
            Family::V6 => v6 = true,
        }
        if v4 && v6 {
            break;
        }
    }
    match (v4, v6) {
        (false, true) => vec![Family::V6],
        (true, true) => vec![Family::V4, Family::V6],
        _ => vec![Family::V4],
    }
}

/// The backends of `family` among `backends`: a VIP address, named or not, serves only
/// backends of its own family (as dcos-net categorizes them).
pub fn of_family(backends: &[Backend], family: Family) -> impl Iterator<Item = &Backend> {
    backends
        .iter()
        .filter(move |b| Family::of(b.addr.ip()) == family)
}

/// The result of merging every app's contribution.
#[derive(Debug, Default)]
pub struct Built {
    pub vips: Vec<Vip>,
    pub rejections: Vec<Rejection>,
}

/// Merge apps into VIPs: the same VIP claimed by several apps is one VIP with the union of
/// their backends; named VIPs get an address from `alloc` per family among their backends
/// ([`name_families`]); IP VIPs pass `policy` and must not be an address the cluster already
/// uses. Every VIP address keeps only the backends of its own family ([`of_family`]).
pub fn assemble<'a>(
    apps: impl IntoIterator<Item = &'a Contribution>,
    framework: &str,
    policy: &IpPolicy,
    alloc: &mut VipAllocator,
) -> Built {
    let apps: Vec<&Contribution> = apps.into_iter().collect();
    let cluster: HashSet<IpAddr> = apps
        .iter()
        .flat_map(|a| a.cluster_addrs.iter().copied())
        .collect();
    let mut rejections: Vec<Rejection> = apps
        .iter()
        .flat_map(|a| a.rejections.iter().cloned())
        .collect();

    // IP VIPs first: they reserve their addresses against named-VIP allocation.
    let mut ip_vips: Vec<(&Contribution, &Entry, IpAddr, u16)> = Vec::new();
    let mut named: BTreeMap<VipName, Vec<(&Contribution, &Entry, u16)>> = BTreeMap::new();
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
        for fam in name_families(uses.iter().flat_map(|(_, e, _)| &e.backends)) {
            wants.insert((key.clone(), fam));
        }
    }
    let assignment = alloc.assign(&wants, &reserved);
    // Names that got no address in a family they want: the rejection says which range ran
    // out, and the name keeps its address in the other family if it has one.
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
        v.backends
            .extend(of_family(backends, Family::of(key.ip)).cloned());
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
        let mut served = false;
        for fam in [Family::V4, Family::V6] {
            let Some(ip) = assignment.addrs.get(&(key.clone(), fam)) else {
                continue;
            };
            served = true;
            for (_, e, port) in uses {
                let vk = VipKey {
                    ip: *ip,
                    port: *port,
                    protocol: e.protocol,
                };
                add(vk, Some(name.clone()), &e.backends);
            }
        }
        if !served {
            // A name with no address in any family it wants holds none at all.
            alloc.release(&key, Family::V4);
            alloc.release(&key, Family::V6);
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

/// The reason of a VIP left out for having more than `--max-backends-per-vip` backends.
pub const TOO_MANY_BACKENDS: &str = "too_many_backends";

/// Leave out of `built` every VIP with more than `max` backends, rejecting each label that
/// claims it (its app, port and label, with the count): a label that would make one VIP of
/// a hundred thousand tasks is shown and counted like any other bad label, and the rest of
/// the table is kept.
pub fn limit_backends<'a>(
    built: &mut Built,
    apps: impl IntoIterator<Item = &'a Contribution>,
    framework: &str,
    max: usize,
) {
    if built.vips.iter().all(|v| v.backends.len() <= max) {
        return;
    }
    let (over, kept): (Vec<Vip>, Vec<Vip>) = std::mem::take(&mut built.vips)
        .into_iter()
        .partition(|v| v.backends.len() > max);
    built.vips = kept;
    let apps: Vec<&Contribution> = apps.into_iter().collect();
    for v in &over {
        let claims = |app: &Contribution, e: &Entry| {
            e.protocol == v.key.protocol
                && match (&e.target, &v.name) {
                    (VipLabel::Ip { ip, port }, None) => *ip == v.key.ip && *port == v.key.port,
                    (VipLabel::Named { label, port }, Some(n)) => {
                        *port == v.key.port
                            && *label == n.label
                            && app.framework_or(framework) == n.framework
                    }
                    _ => false,
                }
        };
        let err = LabelError::TooManyBackends(v.vip_string(), v.backends.len(), max);
        for app in &apps {
            for e in app.entries.iter().filter(|e| claims(app, e)) {
                built.rejections.push(Rejection::new(
                    &app.app,
                    e.port_index,
                    &e.key,
                    &e.value,
                    &err,
                ));
            }
        }
    }
    built.rejections.sort();
    built.rejections.dedup();
}

/// Test helpers of the sources: VIPs as text a test can compare.
#[cfg(test)]
pub(crate) mod test_util {
    use crate::model::Vip;

    /// (FQDN or IP, `port/protocol`, backends as `addr State`, with ` task` when asked).
    pub(crate) type Summary = (String, String, Vec<String>);

    /// `vips` summarized, sorted.
    pub(crate) fn summary<'a>(
        vips: impl IntoIterator<Item = &'a Vip>,
        tasks: bool,
    ) -> Vec<Summary> {
        let mut out: Vec<Summary> = vips
            .into_iter()
            .map(|v| {
                let name = v
                    .name
                    .as_ref()
                    .map_or_else(|| v.key.ip.to_string(), |n| n.fqdn());
                let backends = v
                    .backends
                    .iter()
                    .map(|b| match tasks {
                        true => format!("{} {:?} {}", b.addr, b.state, b.task),
                        false => format!("{} {:?}", b.addr, b.state),
                    })
                    .collect();
                (name, format!("{}/{}", v.key.port, v.key.protocol), backends)
            })
            .collect();
        out.sort();
        out
    }

    /// One expected [`Summary`].
    pub(crate) fn s(name: &str, port: &str, backends: &[&str]) -> Summary {
        let backends = backends.iter().map(|b| b.to_string()).collect();
        (name.to_string(), port.to_string(), backends)
    }
}

#[cfg(test)]
mod tests;
