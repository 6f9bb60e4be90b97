//! Marathon's REST payloads, read leniently: unknown fields are ignored, every field we use is
//! optional, and one app that does not parse is skipped on its own (see [`parse_apps`]).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::source::PayloadError;
use crate::source::entries::LabelValue;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct App {
    pub id: String,
    #[serde(default)]
    pub port_definitions: Option<Vec<PortDefinition>>,
    #[serde(default)]
    pub container: Option<Container>,
    #[serde(default)]
    pub networks: Option<Vec<Network>>,
    #[serde(default)]
    pub health_checks: Option<Vec<Value>>,
    #[serde(default)]
    pub tasks: Option<Vec<Task>>,
    /// App-level labels: the legacy `VIP_PORT<n>` ones are read from here.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortDefinition {
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub docker: Option<Docker>,
    #[serde(default)]
    pub port_mappings: Option<Vec<PortMapping>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Docker {
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub port_mappings: Option<Vec<PortMapping>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    #[serde(default)]
    pub container_port: Option<u32>,
    #[serde(default)]
    pub host_port: Option<u32>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub ports: Option<Vec<u32>>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub ip_addresses: Option<Vec<IpAddressEntry>>,
    #[serde(default)]
    pub health_check_results: Option<Vec<HealthCheckResult>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpAddressEntry {
    #[serde(default)]
    pub ip_address: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckResult {
    #[serde(default)]
    pub alive: bool,
}

/// A label map's entries as the entry builder reads them (a value that is not a JSON string
/// is kept as its JSON text, and rejected).
pub fn label_values(
    labels: &BTreeMap<String, Value>,
) -> impl Iterator<Item = (&str, LabelValue<'_>)> {
    labels.iter().map(|(k, v)| {
        let value = v
            .as_str()
            .map_or_else(|| LabelValue::NotText(v.to_string()), LabelValue::Text);
        (k.as_str(), value)
    })
}

/// Apps from a `GET /v2/apps?embed=apps.tasks` body. The envelope must parse (otherwise the
/// caller keeps its last good table); an app inside it that does not is returned as an error
/// string and skipped alone.
pub fn parse_apps(body: &[u8]) -> Result<(Vec<App>, Vec<String>), PayloadError> {
    map_apps(body, |a| a)
}

/// [`parse_apps`] that hands each app to `f` as soon as it is parsed and keeps only what `f`
/// returns: the body is never turned into a JSON tree (each app is a borrowed slice of it
/// until parsed), and no more than one parsed app lives at a time.
pub fn map_apps<T>(
    body: &[u8],
    mut f: impl FnMut(App) -> T,
) -> Result<(Vec<T>, Vec<String>), PayloadError> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        apps: Option<Vec<&'a serde_json::value::RawValue>>,
    }
    #[derive(Deserialize)]
    struct Id {
        id: Option<Value>,
    }
    let env: Envelope<'_> = serde_json::from_slice(body)?;
    let raw = env.apps.ok_or(PayloadError::Shape("apps"))?;
    let mut out = Vec::with_capacity(raw.len());
    let mut bad = Vec::new();
    for r in raw {
        match serde_json::from_str::<App>(r.get()) {
            Ok(a) => out.push(f(a)),
            Err(e) => {
                let id = serde_json::from_str::<Id>(r.get())
                    .ok()
                    .and_then(|i| i.id)
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| "?".into());
                bad.push(format!("app {id}: {e}"));
            }
        }
    }
    Ok((out, bad))
}

/// The app from a `GET /v2/apps/{id}?embed=app.tasks` body (`{"app": {...}}`).
pub fn parse_app(body: &[u8]) -> Result<App, PayloadError> {
    #[derive(Deserialize)]
    struct Envelope {
        app: Option<App>,
    }
    let env: Envelope = serde_json::from_slice(body)?;
    env.app.ok_or(PayloadError::Shape("app"))
}
