//! What the API shows beside the table: the VIP labels a source rejected, with the words
//! `l4lb check`, `/v1/label-errors` and the status page all use; and an agent's live view of
//! its data plane ([`LiveStats`]: which [`Plane`] serves a VIP, per-backend counters). Pure
//! data and one trait; `source` and `agent` fill them, `api` serves them, none of them
//! imports another.

use std::fmt;
use std::net::SocketAddr;

use super::VipKey;

use serde::{Deserialize, Serialize};

/// One VIP label a source refused, and since when.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LabelRejection {
    /// The Marathon app id (`/group/web`).
    pub app: String,
    /// Index of the port (in `portDefinitions` or `portMappings`) that carries the label.
    pub port_index: usize,
    /// The label key (`VIP_0`).
    pub key: String,
    /// The label value as written (`web:99999`).
    pub value: String,
    /// Short stable reason, as in `l4lb_label_errors_total{reason}` (`bad_port`).
    pub reason: String,
    /// The reason for people (`port 99999 is not in 1..65535`).
    pub error: String,
    /// When this source first saw the rejection (Unix ms); 0 when unknown (`l4lb check`).
    pub since_ms: u64,
}

impl fmt::Display for LabelRejection {
    /// `app /web port 0 VIP_1="bad": <error> [<reason>]`, the line `l4lb check` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "app {} port {} {}={:?}: {} [{}]",
            self.app, self.port_index, self.key, self.value, self.error, self.reason
        )
    }
}

/// Keep `since_ms` of rejections already known; stamp new ones with `now_ms`. The result is
/// sorted (app, port, key, ...), one entry per rejection.
pub fn carry_since(
    previous: &[LabelRejection],
    mut current: Vec<LabelRejection>,
    now_ms: u64,
) -> Vec<LabelRejection> {
    for r in &mut current {
        r.since_ms = previous
            .iter()
            .find(|p| same_rejection(p, r))
            .map_or(now_ms, |p| p.since_ms);
    }
    current.sort();
    current.dedup_by(|a, b| same_rejection(a, b));
    current
}

fn same_rejection(a: &LabelRejection, b: &LabelRejection) -> bool {
    a.app == b.app
        && a.port_index == b.port_index
        && a.key == b.key
        && a.value == b.value
        && a.reason == b.reason
}

/// What carries a VIP's connections on an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Plane {
    /// Translated inside `connect()`/`sendmsg()` by the eBPF programs.
    #[serde(rename = "bpf")]
    Kernel,
    /// The splice proxy's listeners.
    #[serde(rename = "proxy")]
    Proxy,
}

impl Plane {
    /// The label the API, the metrics and the logs use: `bpf` or `proxy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Plane::Kernel => "bpf",
            Plane::Proxy => "proxy",
        }
    }
}

/// Live counters of one backend of one VIP, as an agent sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BackendCounters {
    pub connections: u64,
    pub bytes: u64,
    pub ejected: bool,
    /// Connections the kernel path sent to it, when it runs.
    pub kernel_connections: Option<u64>,
    /// Successful connects, in total.
    pub connects: u64,
    /// Failed or timed-out connects to this backend through this VIP, in total.
    pub connect_failures: u64,
    /// Connect latency p50 and p99 in seconds (none before the first connect).
    pub connect_p50: Option<f64>,
    pub connect_p99: Option<f64>,
}

/// Client connections of one VIP, by result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VipCounters {
    pub ok: u64,
    pub failed: u64,
}

/// An agent's live view of its data plane, read by its API: the agent implements it, the API
/// holds it as a trait object.
pub trait LiveStats: Send + Sync {
    fn backend(&self, vip: &VipKey, addr: SocketAddr) -> Option<BackendCounters>;
    /// Per-VIP connection counters (none by default).
    fn vip(&self, _vip: &VipKey) -> Option<VipCounters> {
        None
    }

    /// What serves `vip` (`None`: not said), and why when it is not the kernel path.
    fn data_plane(&self, _vip: &VipKey) -> Option<(Plane, Option<String>)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(app: &str, value: &str, since_ms: u64) -> LabelRejection {
        LabelRejection {
            app: app.into(),
            port_index: 0,
            key: "VIP_0".into(),
            value: value.into(),
            reason: "missing_port".into(),
            error: "no port".into(),
            since_ms,
        }
    }

    #[test]
    fn since_is_kept_for_known_rejections_and_stamped_for_new_ones() {
        for (name, prev, cur, want) in [
            (
                "first sight",
                vec![],
                vec![r("/a", "x", 0)],
                vec![r("/a", "x", 9)],
            ),
            (
                "kept",
                vec![r("/a", "x", 5)],
                vec![r("/a", "x", 0)],
                vec![r("/a", "x", 5)],
            ),
            (
                "value changed is a new rejection",
                vec![r("/a", "x", 5)],
                vec![r("/a", "y", 0)],
                vec![r("/a", "y", 9)],
            ),
            (
                "fixed ones leave, sorted, deduplicated",
                vec![r("/a", "x", 5), r("/b", "x", 6)],
                vec![r("/c", "x", 0), r("/b", "x", 0), r("/c", "x", 0)],
                vec![r("/b", "x", 6), r("/c", "x", 9)],
            ),
        ] {
            assert_eq!(carry_since(&prev, cur, 9), want, "{name}");
        }
    }

    #[test]
    fn planes_are_named_as_the_api_names_them() {
        for (p, s) in [(Plane::Kernel, "bpf"), (Plane::Proxy, "proxy")] {
            assert_eq!(p.as_str(), s);
            let json = format!("\"{s}\"");
            assert_eq!(
                serde_json::to_string(&p).ok().as_deref(),
                Some(json.as_str())
            );
            assert_eq!(serde_json::from_str::<Plane>(&json).ok(), Some(p));
        }
    }

    #[test]
    fn the_check_line() {
        assert_eq!(
            r("/web", "bad", 0).to_string(),
            r#"app /web port 0 VIP_0="bad": no port [missing_port]"#
        );
    }
}
