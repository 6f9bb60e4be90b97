//! Marathon pods (`GET /v2/pods/::status`, `GET /v2/pods/{id}::status`): the VIP labels on
//! `spec.containers[].endpoints[].labels`, and each instance's backends — the agent and the
//! endpoint's allocated host port, or (container networking without a host port) each of the
//! instance's addresses and the endpoint's container port. Each running container is also a
//! Mesos task named after its container (as Marathon launches it), which Mesos-DNS serves as
//! `<container>.<framework>.mesos`: [`Contribution::named_tasks`]. Pure, read leniently like
//! apps.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::types::{Network, label_values};
use crate::model::{Backend, BackendState, TaskPort, TaskRecord};
use crate::source::entries::{Contribution, Hosts, protocols};
use crate::source::{PayloadError, parse_each};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub id: String,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub instances: Vec<PodInstance>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    pub containers: Vec<PodContainer>,
    pub networks: Vec<Network>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodContainer {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub health_check: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Endpoint {
    pub name: String,
    pub container_port: Option<u32>,
    pub host_port: Option<u32>,
    pub protocol: Vec<String>,
    pub labels: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodInstance {
    pub id: String,
    pub agent_hostname: Option<String>,
    pub networks: Vec<InstanceNetwork>,
    pub containers: Vec<ContainerStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct InstanceNetwork {
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    pub status: Option<String>,
    pub endpoints: Vec<EndpointStatus>,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointStatus {
    pub name: String,
    pub allocated_host_port: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Condition {
    pub name: String,
    pub value: Option<String>,
}

/// Pods from a `GET /v2/pods/::status` body (a JSON array); a pod that does not parse is
/// returned as an error string and skipped alone.
pub fn parse_pods(body: &[u8]) -> Result<(Vec<PodStatus>, Vec<String>), PayloadError> {
    let raw: Vec<Value> = serde_json::from_slice(body)?;
    Ok(parse_each(raw, "pod", |v| v.get("id")))
}

/// One pod from a `GET /v2/pods/{id}::status` body.
pub fn parse_pod(body: &[u8]) -> Result<PodStatus, PayloadError> {
    Ok(serde_json::from_slice(body)?)
}

/// A pod container's state as a backend, as for app tasks: running and healthy (or without a
/// health check) → active; running with a check not (yet) reported healthy, or killing →
/// draining; anything else → none.
fn container_state(spec: &PodContainer, status: &ContainerStatus) -> Option<BackendState> {
    match status.status.as_deref() {
        Some("TASK_RUNNING") => {
            let healthy = status
                .conditions
                .iter()
                .find(|c| c.name == "healthy")
                .and_then(|c| c.value.as_deref());
            match (spec.health_check.is_some(), healthy) {
                (_, Some("false")) => Some(BackendState::Draining),
                (true, Some("true")) | (false, _) => Some(BackendState::Active),
                (true, _) => Some(BackendState::Draining),
            }
        }
        Some("TASK_KILLING") => Some(BackendState::Draining),
        _ => None,
    }
}

/// What one pod contributes, keyed by its id like an app (Marathon's ids are one namespace).
pub fn pod_contribution(
    pod: &PodStatus,
    resolve: &mut dyn FnMut(&str) -> Option<IpAddr>,
) -> Contribution {
    let mut out = Contribution {
        app: pod.id.clone(),
        ..Contribution::default()
    };
    let container_mode = pod
        .spec
        .networks
        .first()
        .is_some_and(|n| n.mode.as_deref() == Some("container"));
    let pod_id: Arc<str> = pod.id.as_str().into();
    // Each instance's agent, resolved once.
    let agents = pod
        .instances
        .iter()
        .filter_map(|i| i.agent_hostname.as_deref());
    let hosts = out.resolve_hosts(agents, resolve);
    let instance_ips = |i: &PodInstance| -> Vec<IpAddr> {
        i.networks
            .iter()
            .flat_map(|n| &n.addresses)
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect()
    };
    out.cluster_addrs
        .extend(pod.instances.iter().flat_map(instance_ips));
    let mut index = 0;
    for c in &pod.spec.containers {
        for ep in &c.endpoints {
            let idx = index;
            index += 1;
            let Some(labels) = &ep.labels else { continue };
            let proto = (!ep.protocol.is_empty()).then(|| ep.protocol.join(","));
            out.add_port(idx, proto.as_deref(), label_values(labels), |out| {
                let mut backends = Vec::new();
                for inst in &pod.instances {
                    let Some(status) = inst.containers.iter().find(|s| s.name == c.name) else {
                        continue;
                    };
                    let Some(state) = container_state(c, status) else {
                        continue;
                    };
                    let host_port = status
                        .endpoints
                        .iter()
                        .find(|e| e.name == ep.name)
                        .and_then(|e| e.allocated_host_port)
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0);
                    let host = inst
                        .agent_hostname
                        .as_deref()
                        .and_then(|h| hosts.get(h).copied().flatten());
                    let addrs: Vec<SocketAddr> = match (host_port, host) {
                        (Some(p), Some(h)) => vec![SocketAddr::new(h, p)],
                        (Some(_), None) => Vec::new(),
                        (None, _) if container_mode => {
                            let cport = ep
                                .container_port
                                .and_then(|p| u16::try_from(p).ok())
                                .filter(|p| *p != 0);
                            match cport {
                                Some(cp) => instance_ips(inst)
                                    .into_iter()
                                    .map(|ip| SocketAddr::new(ip, cp))
                                    .collect(),
                                None => Vec::new(),
                            }
                        }
                        (None, _) => Vec::new(),
                    };
                    for addr in addrs {
                        out.cluster_addrs.push(addr.ip());
                        backends.push(Backend {
                            addr,
                            state,
                            app: Arc::clone(&pod_id),
                            task: format!("{}.{}", inst.id, c.name).into(),
                        });
                    }
                }
                backends
            });
        }
    }
    out.named_tasks = container_tasks(pod, container_mode, &hosts, &instance_ips);
    out.finish();
    out
}

/// The running containers of `pod` as Mesos tasks, by container name (each list sorted by
/// id): id `<instance>.<container>`, the instance's agent, its addresses in container
/// networking, and the container's allocated host ports.
fn container_tasks(
    pod: &PodStatus,
    container_mode: bool,
    hosts: &Hosts<'_>,
    instance_ips: &dyn Fn(&PodInstance) -> Vec<IpAddr>,
) -> Vec<(String, Vec<TaskRecord>)> {
    let mut by_name: BTreeMap<String, Vec<TaskRecord>> = BTreeMap::new();
    for inst in &pod.instances {
        let host = inst
            .agent_hostname
            .as_deref()
            .and_then(|h| hosts.get(h).copied().flatten());
        let mut container = if container_mode {
            instance_ips(inst)
        } else {
            Vec::new()
        };
        container.sort();
        container.dedup();
        for status in &inst.containers {
            if status.name.is_empty() || status.status.as_deref() != Some("TASK_RUNNING") {
                continue;
            }
            if host.is_none() && container.is_empty() {
                continue;
            }
            let spec = pod.spec.containers.iter().find(|c| c.name == status.name);
            let mut ports = Vec::new();
            for e in &status.endpoints {
                let Some(port) = e
                    .allocated_host_port
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                else {
                    continue;
                };
                let proto = spec
                    .and_then(|c| c.endpoints.iter().find(|ep| ep.name == e.name))
                    .filter(|ep| !ep.protocol.is_empty())
                    .map(|ep| ep.protocol.join(","));
                for protocol in protocols(proto.as_deref()).unwrap_or_default() {
                    ports.push(TaskPort {
                        port,
                        protocol,
                        name: (!e.name.is_empty()).then(|| e.name.clone()),
                    });
                }
            }
            by_name
                .entry(status.name.clone())
                .or_default()
                .push(TaskRecord {
                    id: format!("{}.{}", inst.id, status.name),
                    host,
                    container: container.clone(),
                    ports,
                });
        }
    }
    by_name
        .into_iter()
        .map(|(name, mut tasks)| {
            tasks.sort();
            (name, tasks)
        })
        .collect()
}

#[cfg(test)]
mod tests;
