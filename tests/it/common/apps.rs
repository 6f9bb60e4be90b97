//! Apps files for `l4lb run --apps-file`: a labelled app with a task per backend, the file
//! itself, and the command-line start every apps-file agent in these tests shares.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

use super::marathon::{add_task, host_app, task};

/// An app with one port carrying `labels` (`VIP_0`, `VIP_1`, …) over `protocol` and one
/// running task per backend.
pub fn labelled_app(id: &str, labels: &[&str], protocol: &str, backends: &[SocketAddr]) -> Value {
    let mut a = host_app(id, &labels[..1], protocol);
    let mut l = serde_json::Map::new();
    for (i, v) in labels.iter().enumerate() {
        l.insert(format!("VIP_{i}"), Value::from(*v));
    }
    a["portDefinitions"][0]["labels"] = Value::Object(l);
    for (i, b) in backends.iter().enumerate() {
        add_task(
            &mut a,
            task(id, i, &b.ip().to_string(), &[b.port()], "TASK_RUNNING"),
        );
    }
    a
}

/// `{"apps": apps}` as the apps file format.
pub fn apps_json(apps: Vec<Value>) -> String {
    serde_json::json!({ "apps": apps }).to_string()
}

/// Write `apps` to `path` as an apps file.
pub fn write_apps(path: &Path, apps: Vec<Value>) {
    std::fs::write(path, apps_json(apps)).unwrap();
}

/// `run --apps-file <file> --apps-file-poll 50ms --api-listen 127.0.0.1:0 --dns-listen
/// 127.0.0.1:0`, then `extra`: an agent whose ports are read back from its log.
pub fn run_args(file: &Path, extra: &[&str]) -> Vec<String> {
    let file = file.to_str().unwrap();
    let base = ["run", "--apps-file", file, "--apps-file-poll", "50ms"];
    let listen = ["--api-listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0"];
    base.iter()
        .chain(&listen)
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

/// Flags for an unprivileged agent on loopback: no VIP link, VIPs in 127.128.0.0/16.
pub const ON_LOOPBACK: [&str; 5] = [
    "--interface-kind",
    "none",
    "--allow-loopback-vips",
    "--vip-cidr",
    "127.128.0.0/16",
];

/// `agent --controller <url> --interface-kind none --api-listen 127.0.0.1:0 --dns-listen
/// 127.0.0.1:0`: an unprivileged agent following one controller.
pub fn agent_args(controller: &str) -> Vec<String> {
    let base = [
        "agent",
        "--controller",
        controller,
        "--interface-kind",
        "none",
    ];
    let listen = ["--api-listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0"];
    base.iter().chain(&listen).map(|s| s.to_string()).collect()
}
