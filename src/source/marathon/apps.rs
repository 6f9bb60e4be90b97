//! Marathon apps → VIP entries (pure): an app's labelled ports whatever its networking mode
//! (host, bridge, container), their backends by task state and health, its running tasks (for
//! task names) and its legacy `VIP_PORT<n>` labels ([`app_contribution`]); and a whole
//! `GET /v2/apps?embed=apps.tasks` payload (the apps file's shape too) read into
//! contributions ([`contributions`]). The labels themselves go through the neutral
//! [`entries`](crate::source::entries) builder.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_json::Value;

use super::types::{App, PortMapping, Task, label_values, map_apps};
use crate::labels::LabelError;
use crate::model::{Backend, BackendState, TaskPort, TaskRecord};
use crate::source::entries::{Contribution, Hosts, protocols};
use crate::source::{HostCache, PayloadError};

/// Parse a whole apps payload into per-app contributions (blocking: JSON and DNS); apps that
/// do not parse are returned as errors and skipped alone.
pub fn contributions(
    body: &[u8],
    hosts: &HostCache,
) -> Result<(Vec<Contribution>, Vec<String>), PayloadError> {
    map_apps(body, |a| app_contribution(&a, &mut |h| hosts.resolve(h)))
}

/// The running tasks of `app` (TASK_RUNNING, healthy or not: task names list every instance,
/// as Mesos-DNS does) with their host, container addresses and host ports. Container
/// addresses only in container networking: in host and bridge mode `ipAddresses` holds the
/// agent's or a non-routable bridge address (§4), which no other host can reach.
fn running_tasks(app: &App, mode: Mode, ports: &[Port<'_>], hosts: &Hosts<'_>) -> Vec<TaskRecord> {
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
                .map(|ip| SocketAddr::new(ip.to_canonical(), cport))
                .collect())
        }
    }
}

/// What one app contributes: its VIP labels with their backends, and its rejected labels.
/// `resolve` maps `task.host` to an address (IP literals never reach it).
pub fn app_contribution(
    app: &App,
    resolve: &mut dyn FnMut(&str) -> Option<IpAddr>,
) -> Contribution {
    let mode = mode(app);
    let mut out = Contribution {
        app: app.id.clone(),
        ..Contribution::default()
    };
    let tasks = app.tasks.as_deref().unwrap_or_default();
    let app_id: Arc<str> = app.id.as_str().into();
    let task_ids: Vec<Arc<str>> = tasks.iter().map(|t| t.id.as_str().into()).collect();
    let hosts = out.resolve_hosts(tasks.iter().filter_map(|t| t.host.as_deref()), resolve);
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
    // The tasks that are backends (by their state), with their host's address.
    let live: Vec<(&Task, BackendState, Option<IpAddr>, &Arc<str>)> = tasks
        .iter()
        .zip(&task_ids)
        .filter_map(|(t, id)| {
            let host = t
                .host
                .as_deref()
                .and_then(|h| hosts.get(h).copied().flatten());
            Some((t, task_state(app, t)?, host, id))
        })
        .collect();
    let backend = |addr: SocketAddr, state, task: &Arc<str>, out: &mut Contribution| {
        out.cluster_addrs.push(addr.ip());
        Backend {
            addr,
            state,
            app: Arc::clone(&app_id),
            task: Arc::clone(task),
        }
    };
    for (idx, port) in app_ports.iter().enumerate() {
        let Some(labels) = port.labels else { continue };
        out.add_port(idx, port.protocol, label_values(labels), |out| {
            let mut backends = Vec::new();
            for &(t, state, host, id) in &live {
                if host.is_none() && port.host_port_index.is_some() {
                    continue;
                }
                // A task without the port (still staging, old shape) is not a backend.
                let Ok(addrs) = task_addrs(mode, port, t, host) else {
                    continue;
                };
                for addr in addrs {
                    backends.push(backend(addr, state, id, out));
                }
            }
            backends
        });
    }
    // App-level legacy labels: each task's `n`-th host port (`task.ports[n]` on the task's
    // host); a task without an `n`-th port is no backend.
    if let Some(labels) = &app.labels {
        out.add_legacy(label_values(labels), |n, out| {
            let mut backends = Vec::new();
            for &(t, state, host, id) in &live {
                let port = t.ports.as_ref().and_then(|ps| ps.get(n));
                let port = port
                    .and_then(|p| u16::try_from(*p).ok())
                    .filter(|p| *p != 0);
                if let (Some(host), Some(port)) = (host, port) {
                    backends.push(backend(SocketAddr::new(host, port), state, id, out));
                }
            }
            Ok(backends)
        });
    }
    out.finish();
    out
}

#[cfg(test)]
mod tests;
