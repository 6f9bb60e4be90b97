//! What the Mesos master has told us, kept current event by event, and each task's VIP
//! contribution. Pure: events in, the set of changed tasks out; addresses are resolved through
//! the function the caller passes. Depends on `labels` and the neutral VIP entry builder
//! ([`entries`](crate::source::entries)).
//!
//! A task is one contribution (its key `<framework id>/<task id>`), so an event costs the
//! tasks it touches: a task event one task, an agent or framework event the tasks on it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::types::{Agent, Event, GetState, Labels, Status, Task, parse_tasks};
use crate::labels::{self, LabelError};
use crate::model::{Backend, BackendState, TaskPort, TaskRecord};
use crate::source::entries::{Contribution, LabelValue, protocols};

/// What an event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Everything (a `SUBSCRIBED` or `GET_STATE`): replace every contribution.
    Full,
    /// These tasks' contributions (a task no longer known is removed).
    Tasks(BTreeSet<String>),
    Nothing,
}

/// The part of a task l4lb keeps (the latest status folded in).
#[derive(Debug, Clone)]
struct TaskState {
    name: Arc<str>,
    task_id: Arc<str>,
    framework_id: String,
    agent_id: String,
    state: String,
    /// As dcos-net reads it: the newest status's `healthy`; without one, unhealthy when the
    /// task has a health check (not yet reported) and unknown (served) when it has none. A
    /// later status without `healthy` keeps the last answer.
    healthy: Option<bool>,
    /// From the latest status that reported container addresses.
    container_ips: Vec<IpAddr>,
    /// Discovery ports: (number, protocol, labels).
    ports: Vec<(u32, Option<String>, Labels)>,
    labels: Labels,
    /// The task's port resources in order (for legacy `VIP_PORT<n>`).
    port_resources: Vec<u64>,
}

/// States after which a task never serves again: it is forgotten.
const TERMINAL: &[&str] = &[
    "TASK_FINISHED",
    "TASK_FAILED",
    "TASK_KILLED",
    "TASK_ERROR",
    "TASK_LOST",
    "TASK_DROPPED",
    "TASK_GONE",
    "TASK_GONE_BY_OPERATOR",
];

/// Largest number of port resources expanded per task (a range `0-65535` is not a reason to
/// allocate 65,536 entries per task).
const MAX_PORT_RESOURCES: usize = 1024;

fn container_ips(status: &Status) -> Vec<IpAddr> {
    status
        .container_status
        .iter()
        .flat_map(|c| &c.network_infos)
        .flat_map(|n| &n.ip_addresses)
        .filter_map(|a| a.ip_address.as_deref()?.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect()
}

impl TaskState {
    fn from_task(mut t: Task) -> Self {
        // Newest last (Mesos lists them in order; dcos-net sorts by timestamp, so do we).
        t.statuses.sort_by(|a, b| {
            a.timestamp
                .unwrap_or(0.0)
                .total_cmp(&b.timestamp.unwrap_or(0.0))
        });
        let latest_ips = t
            .statuses
            .iter()
            .rev()
            .map(container_ips)
            .find(|ips| !ips.is_empty())
            .unwrap_or_default();
        let port_resources = t
            .resources
            .iter()
            .filter(|r| r.name == "ports")
            .flat_map(|r| r.ranges.iter().flat_map(|rs| &rs.range))
            .flat_map(|r| r.begin..=r.end)
            .take(MAX_PORT_RESOURCES)
            .collect();
        let discovery = t.discovery.unwrap_or_default();
        let name = discovery.name.unwrap_or(t.name);
        TaskState {
            name: name.as_str().into(),
            task_id: t.task_id.value.as_str().into(),
            framework_id: t.framework_id.value,
            agent_id: t.agent_id.value,
            state: t
                .state
                .or_else(|| t.statuses.last().and_then(|s| s.state.clone()))
                .unwrap_or_default(),
            healthy: t
                .statuses
                .last()
                .and_then(|s| s.healthy)
                .or(t.health_check.is_some().then_some(false)),
            container_ips: latest_ips,
            ports: discovery
                .ports
                .map(|p| p.ports)
                .unwrap_or_default()
                .into_iter()
                .map(|p| (p.number, p.protocol, p.labels.unwrap_or_default()))
                .collect(),
            labels: t.labels.unwrap_or_default(),
            port_resources,
        }
    }

    fn key(&self) -> String {
        task_key(&self.framework_id, &self.task_id)
    }

    fn backend_state(&self) -> Option<BackendState> {
        match self.state.as_str() {
            // Unknown health (no health check) is healthy, as Mesos and dcos-net read it.
            "TASK_RUNNING" if self.healthy != Some(false) => Some(BackendState::Active),
            "TASK_RUNNING" | "TASK_KILLING" => Some(BackendState::Draining),
            _ => None,
        }
    }
}

fn task_key(framework_id: &str, task_id: &str) -> String {
    format!("{framework_id}/{task_id}")
}

/// The agent's address as text: the IP it registered from (`pid`, `slave(1)@10.0.0.4:5051`),
/// else its hostname (an IP or a name to resolve).
fn agent_address(a: &Agent) -> String {
    a.pid
        .as_deref()
        .and_then(|p| p.rsplit_once('@'))
        .and_then(|(_, hp)| hp.parse::<SocketAddr>().ok())
        .map(|sa| sa.ip().to_string())
        .unwrap_or_else(|| a.agent_info.hostname.clone())
}

/// Frameworks, agents and live tasks, with the indices that make an agent or framework event
/// cost only its tasks.
#[derive(Debug, Default)]
pub struct Cluster {
    /// Framework id → its name, mangled as Mesos-DNS does.
    frameworks: HashMap<String, String>,
    /// Agent id → address (IP literal or host name).
    agents: HashMap<String, String>,
    tasks: HashMap<String, TaskState>,
    by_agent: HashMap<String, BTreeSet<String>>,
    by_framework: HashMap<String, BTreeSet<String>>,
}

impl Cluster {
    /// The cluster a `GET_STATE` describes; tasks that do not parse are returned as errors.
    pub fn from_state(state: GetState) -> (Self, Vec<String>) {
        let mut c = Cluster::default();
        for f in state.get_frameworks.frameworks {
            let info = f.framework_info;
            c.frameworks
                .insert(info.id.value, labels::mangle(&info.name));
        }
        for info in state.get_agents.recovered_agents {
            c.agents.insert(info.id.value, info.hostname);
        }
        for a in state.get_agents.agents {
            let addr = agent_address(&a);
            c.agents.insert(a.agent_info.id.value, addr);
        }
        let (tasks, bad) = parse_tasks(state.get_tasks.tasks);
        for t in tasks {
            c.insert(TaskState::from_task(t));
        }
        (c, bad)
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    fn insert(&mut self, t: TaskState) {
        if TERMINAL.contains(&t.state.as_str()) {
            self.remove(&t.key());
            return;
        }
        let key = t.key();
        self.by_agent
            .entry(t.agent_id.clone())
            .or_default()
            .insert(key.clone());
        self.by_framework
            .entry(t.framework_id.clone())
            .or_default()
            .insert(key.clone());
        self.tasks.insert(key, t);
    }

    fn remove(&mut self, key: &str) {
        let Some(t) = self.tasks.remove(key) else {
            return;
        };
        for (index, id) in [
            (&mut self.by_agent, &t.agent_id),
            (&mut self.by_framework, &t.framework_id),
        ] {
            if let Some(keys) = index.get_mut(id) {
                keys.remove(key);
                if keys.is_empty() {
                    index.remove(id);
                }
            }
        }
    }

    fn tasks_of(index: &HashMap<String, BTreeSet<String>>, id: &str) -> BTreeSet<String> {
        index.get(id).cloned().unwrap_or_default()
    }

    /// Fold one event in. A `SUBSCRIBED` or `GET_STATE` replaces everything. Tasks of the event
    /// that do not parse are returned as errors.
    pub fn apply(&mut self, ev: Event) -> (Applied, Vec<String>) {
        let mut bad = Vec::new();
        let applied = match ev.kind.as_str() {
            "SUBSCRIBED" | "GET_STATE" => {
                let state = ev
                    .subscribed
                    .map(|s| s.get_state)
                    .or(ev.get_state)
                    .unwrap_or_default();
                let (c, b) = Cluster::from_state(state);
                *self = c;
                bad = b;
                Some(Applied::Full)
            }
            "TASK_ADDED" => ev
                .task_added
                .and_then(|a| {
                    let (mut tasks, b) = parse_tasks(vec![a.task]);
                    bad = b;
                    tasks.pop()
                })
                .map(|t| {
                    let t = TaskState::from_task(t);
                    let key = t.key();
                    self.insert(t);
                    Applied::Tasks([key].into())
                }),
            "TASK_UPDATED" => ev.task_updated.and_then(|u| {
                let key = task_key(&u.framework_id.value, &u.status.task_id.value);
                // An update of a task we never saw added (or already forgot): nothing.
                let mut t = self.tasks.get(&key).cloned()?;
                if let Some(s) = u.state.or_else(|| u.status.state.clone()) {
                    t.state = s;
                }
                if let Some(h) = u.status.healthy {
                    t.healthy = Some(h);
                }
                let ips = container_ips(&u.status);
                if !ips.is_empty() {
                    t.container_ips = ips;
                }
                self.insert(t);
                Some(Applied::Tasks([key].into()))
            }),
            "AGENT_ADDED" => ev.agent_added.map(|a| {
                let addr = agent_address(&a.agent);
                let id = a.agent.agent_info.id.value;
                self.agents.insert(id.clone(), addr);
                Applied::Tasks(Self::tasks_of(&self.by_agent, &id))
            }),
            "AGENT_REMOVED" => ev.agent_removed.map(|a| {
                self.agents.remove(&a.agent_id.value);
                Applied::Tasks(Self::tasks_of(&self.by_agent, &a.agent_id.value))
            }),
            "FRAMEWORK_ADDED" | "FRAMEWORK_UPDATED" => {
                ev.framework_added.or(ev.framework_updated).and_then(|f| {
                    let info = f.framework.framework_info;
                    let name = labels::mangle(&info.name);
                    let old = self.frameworks.insert(info.id.value.clone(), name.clone());
                    (old.as_ref() != Some(&name))
                        .then(|| Applied::Tasks(Self::tasks_of(&self.by_framework, &info.id.value)))
                })
            }
            "FRAMEWORK_REMOVED" => ev.framework_removed.map(|f| {
                // A framework torn down loses its tasks (Mesos kills them).
                let id = f.framework_info.id.value;
                self.frameworks.remove(&id);
                let keys = Self::tasks_of(&self.by_framework, &id);
                for k in &keys {
                    self.remove(k);
                }
                Applied::Tasks(keys)
            }),
            _ => None,
        }
        .unwrap_or(Applied::Nothing);
        (applied, bad)
    }

    /// Every task's contribution.
    pub fn contributions(
        &self,
        resolve: &mut dyn FnMut(&str) -> Option<IpAddr>,
    ) -> Vec<Contribution> {
        let mut keys: Vec<&String> = self.tasks.keys().collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|k| self.contribution(k, resolve))
            .collect()
    }

    /// The contributions of the tasks `keys` names (`None`: a task no longer known).
    pub fn changed(
        &self,
        keys: BTreeSet<String>,
        resolve: &mut dyn FnMut(&str) -> Option<IpAddr>,
    ) -> Vec<(String, Option<Contribution>)> {
        keys.into_iter()
            .map(|k| {
                let c = self.contribution(&k, resolve);
                (k, c)
            })
            .collect()
    }

    /// One task's contribution; `None` when the task is not (or no longer) known.
    pub fn contribution(
        &self,
        key: &str,
        resolve: &mut dyn FnMut(&str) -> Option<IpAddr>,
    ) -> Option<Contribution> {
        let t = self.tasks.get(key)?;
        let mut out = Contribution {
            app: key.to_string(),
            ..Contribution::default()
        };
        let agent = self.agents.get(&t.agent_id);
        let agent_ip = agent.and_then(|h| h.parse::<IpAddr>().ok().or_else(|| resolve(h)));
        match (agent, agent_ip) {
            (_, Some(ip)) => out.cluster_addrs.push(ip.to_canonical()),
            (Some(h), None) => out.unresolved_hosts.push(h.clone()),
            (None, None) => {}
        }
        out.cluster_addrs.extend(t.container_ips.iter().copied());
        // Until its framework is known the task has no names to give (it has its addresses).
        let Some(framework) = self.frameworks.get(&t.framework_id) else {
            out.finish();
            return Some(out);
        };
        out.framework = Some(framework.clone());
        let state = t.backend_state();
        let backend = |addr: SocketAddr, out: &mut Contribution| -> Option<Backend> {
            out.cluster_addrs.push(addr.ip());
            Some(Backend {
                addr,
                state: state?,
                app: Arc::clone(&t.name),
                task: Arc::clone(&t.task_id),
            })
        };
        for (idx, (number, protocol, port_labels)) in t.ports.iter().enumerate() {
            // As dcos-net: `network-scope: host` is the agent's port; `container`, and no
            // scope at all, the task's own addresses (for a host-networked task Mesos reports
            // the agent's). A task that reports none, without a scope: the agent.
            let scope = port_labels.get("network-scope");
            let container = match scope {
                Some("container") => true,
                Some("host") => false,
                _ => !t.container_ips.is_empty(),
            };
            let vip_labels = port_labels
                .labels
                .iter()
                .filter(|l| !labels::is_legacy_key(&l.key))
                .map(label_value);
            out.add_port(idx, protocol.as_deref(), vip_labels, |out| {
                let port = u16::try_from(*number).ok().filter(|p| *p != 0);
                let ips: Vec<IpAddr> = match (port, container) {
                    (None, _) => Vec::new(),
                    (Some(_), true) => t.container_ips.clone(),
                    (Some(_), false) => agent_ip.into_iter().collect(),
                };
                ips.into_iter()
                    .filter_map(|ip| backend(SocketAddr::new(ip, port.unwrap_or_default()), out))
                    .collect()
            });
        }
        // Legacy task labels: the VIP's backend is the agent and the task's n-th port.
        out.add_legacy(t.labels.labels.iter().map(label_value), |n, out| {
            let port = t
                .port_resources
                .get(n)
                .and_then(|p| u16::try_from(*p).ok())
                .filter(|p| *p != 0)
                .ok_or(LabelError::NoTaskPort(n))?;
            Ok(agent_ip
                .and_then(|ip| backend(SocketAddr::new(ip, port), out))
                .into_iter()
                .collect())
        });
        // Task names (the Mesos-DNS job): every running task, labelled or not, under its
        // own name and framework; one record per task, merged by name in the DNS.
        if t.state == "TASK_RUNNING" && (agent_ip.is_some() || !t.container_ips.is_empty()) {
            let mut ports = Vec::new();
            for (number, protocol, _) in &t.ports {
                let Some(port) = u16::try_from(*number).ok().filter(|p| *p != 0) else {
                    continue;
                };
                for protocol in protocols(protocol.as_deref()).unwrap_or_default() {
                    ports.push(TaskPort {
                        port,
                        protocol,
                        name: None,
                    });
                }
            }
            out.task_name = Some(t.name.to_string());
            out.tasks.push(TaskRecord {
                id: t.task_id.to_string(),
                host: agent_ip,
                container: t.container_ips.clone(),
                ports,
            });
        }
        out.finish();
        Some(out)
    }
}

/// Every task's contribution in a `GET_STATE` answer (`l4lb check --mesos-state-file`), and
/// the tasks that did not parse.
pub fn contributions_of_state(
    body: &[u8],
    resolve: &mut dyn FnMut(&str) -> Option<IpAddr>,
) -> Result<(Vec<Contribution>, Vec<String>), crate::source::PayloadError> {
    let (c, bad) = Cluster::from_state(super::types::parse_get_state(body)?);
    Ok((c.contributions(resolve), bad))
}

/// A Mesos label as the entry builder reads it (a label without a value is empty text).
fn label_value(l: &super::types::Label) -> (&str, LabelValue<'_>) {
    (
        l.key.as_str(),
        LabelValue::Text(l.value.as_deref().unwrap_or_default()),
    )
}

#[cfg(test)]
mod tests;
