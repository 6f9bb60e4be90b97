//! The Mesos operator API v1 payloads l4lb reads (JSON, snake_case as Mesos writes it), read
//! leniently: every field optional, unknown fields ignored, and one task that does not parse
//! skipped alone (see [`parse_tasks`]).

use serde::Deserialize;
use serde_json::Value;

use crate::source::{PayloadError, parse_each};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Id {
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Task {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub task_id: Id,
    #[serde(default)]
    pub framework_id: Id,
    #[serde(default)]
    pub agent_id: Id,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub statuses: Vec<Status>,
    #[serde(default)]
    pub discovery: Option<Discovery>,
    #[serde(default)]
    pub labels: Option<Labels>,
    #[serde(default)]
    pub resources: Vec<Resource>,
    /// Present when the task has a health check (its content is not read).
    #[serde(default)]
    pub health_check: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub task_id: Id,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub healthy: Option<bool>,
    #[serde(default)]
    pub container_status: Option<ContainerStatus>,
    /// Seconds since the epoch; the newest status is the one that counts.
    #[serde(default)]
    pub timestamp: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerStatus {
    #[serde(default)]
    pub network_infos: Vec<NetworkInfo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetworkInfo {
    #[serde(default)]
    pub ip_addresses: Vec<IpAddressInfo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct IpAddressInfo {
    #[serde(default)]
    pub ip_address: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Discovery {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ports: Option<Ports>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Ports {
    #[serde(default)]
    pub ports: Vec<DiscoveryPort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DiscoveryPort {
    #[serde(default)]
    pub number: u32,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub labels: Option<Labels>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Labels {
    #[serde(default)]
    pub labels: Vec<Label>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Label {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
}

impl Labels {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|l| l.key == key)
            .and_then(|l| l.value.as_deref())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Resource {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ranges: Option<Ranges>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Ranges {
    #[serde(default)]
    pub range: Vec<Range>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Range {
    #[serde(default)]
    pub begin: u64,
    #[serde(default)]
    pub end: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Agent {
    #[serde(default)]
    pub agent_info: AgentInfo,
    #[serde(default)]
    pub pid: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AgentInfo {
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub id: Id,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Framework {
    #[serde(default)]
    pub framework_info: FrameworkInfo,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct FrameworkInfo {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub id: Id,
}

/// `GET_STATE`'s `get_state`, and `SUBSCRIBED`'s.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GetState {
    #[serde(default)]
    pub get_tasks: GetTasks,
    #[serde(default)]
    pub get_frameworks: GetFrameworks,
    #[serde(default)]
    pub get_agents: GetAgents,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GetTasks {
    /// Raw, so that one task that does not parse is skipped alone.
    #[serde(default)]
    pub tasks: Vec<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GetFrameworks {
    #[serde(default)]
    pub frameworks: Vec<Framework>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GetAgents {
    #[serde(default)]
    pub agents: Vec<Agent>,
    /// Agents known from the registry after a master fail-over, not yet re-registered.
    #[serde(default)]
    pub recovered_agents: Vec<AgentInfo>,
}

/// One `SUBSCRIBE` event (or a `GET_STATE` response: `type` `GET_STATE`, `get_state`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Event {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub subscribed: Option<Subscribed>,
    #[serde(default)]
    pub get_state: Option<GetState>,
    #[serde(default)]
    pub task_added: Option<TaskAdded>,
    #[serde(default)]
    pub task_updated: Option<TaskUpdated>,
    #[serde(default)]
    pub agent_added: Option<AgentAdded>,
    #[serde(default)]
    pub agent_removed: Option<AgentRemoved>,
    #[serde(default)]
    pub framework_added: Option<FrameworkEvent>,
    #[serde(default)]
    pub framework_updated: Option<FrameworkEvent>,
    #[serde(default)]
    pub framework_removed: Option<FrameworkRemoved>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Subscribed {
    #[serde(default)]
    pub get_state: GetState,
    #[serde(default)]
    pub heartbeat_interval_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TaskAdded {
    pub task: Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TaskUpdated {
    #[serde(default)]
    pub framework_id: Id,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AgentAdded {
    #[serde(default)]
    pub agent: Agent,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AgentRemoved {
    #[serde(default)]
    pub agent_id: Id,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct FrameworkEvent {
    #[serde(default)]
    pub framework: Framework,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct FrameworkRemoved {
    #[serde(default)]
    pub framework_info: FrameworkInfo,
}

/// Parse one event (or a `GET_STATE` response).
pub fn parse_event(body: &[u8]) -> Result<Event, PayloadError> {
    Ok(serde_json::from_slice(body)?)
}

/// The state in a `GET_STATE` response body.
pub fn parse_get_state(body: &[u8]) -> Result<GetState, PayloadError> {
    parse_event(body)?
        .get_state
        .ok_or(PayloadError::Shape("get_state"))
}

/// Tasks from raw values; the ones that do not parse are returned as error strings.
pub fn parse_tasks(raw: Vec<Value>) -> (Vec<Task>, Vec<String>) {
    parse_each(raw, "task", |v| v.pointer("/task_id/value"))
}
