//! Marathon's REST payloads, read leniently: unknown fields are ignored, every field we use is
//! optional, and one app that does not parse is skipped on its own (see [`parse_apps`]).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::source::PayloadError;
use crate::source::entries::LabelValue;

/// An app: `id` is required; a missing `Option` field reads as `None`, and the structs below
/// default every missing field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct App {
    pub id: String,
    pub port_definitions: Option<Vec<PortDefinition>>,
    pub container: Option<Container>,
    pub networks: Option<Vec<Network>>,
    pub health_checks: Option<Vec<Value>>,
    pub tasks: Option<Vec<Task>>,
    /// App-level labels: the legacy `VIP_PORT<n>` ones are read from here.
    pub labels: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PortDefinition {
    pub port: Option<u32>,
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub labels: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Container {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub docker: Option<Docker>,
    pub port_mappings: Option<Vec<PortMapping>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Docker {
    pub network: Option<String>,
    pub port_mappings: Option<Vec<PortMapping>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PortMapping {
    pub container_port: Option<u32>,
    pub host_port: Option<u32>,
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub labels: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Network {
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Task {
    pub id: String,
    pub host: Option<String>,
    pub ports: Option<Vec<u32>>,
    pub state: Option<String>,
    pub ip_addresses: Option<Vec<IpAddressEntry>>,
    pub health_check_results: Option<Vec<HealthCheckResult>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct IpAddressEntry {
    pub ip_address: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HealthCheckResult {
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
