//! Prometheus metrics of the control plane: table, labels, and every source's requests and
//! events (each source names the event types it counts).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::labels::ReasonLabel;
use crate::model::{BackendState, VipTable};

/// A single-label label set, e.g. `[("reason", "bad_port")]`.
pub type Label = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];

#[derive(Clone, Default)]
pub struct SourceMetrics {
    pub table_version: Gauge,
    pub table_build_ms: Gauge,
    pub table_changed_at_ms: Gauge,
    pub vips: Gauge,
    pub backends: Family<Label, Gauge>,
    pub label_errors: Family<ReasonLabel, Counter>,
    pub requests: Family<Labels2, Counter>,
    pub sync_errors: Family<Label, Counter>,
    pub events: Family<Label, Counter>,
    pub unresolved_hosts: Counter,
    /// 1 while the source answers (Marathon's event stream open, the controller watch
    /// answering, the apps file readable), else 0. The Mesos source does not set it (yet).
    pub connected: Gauge,
    /// When the source last reported a change (an event, a changed table or file; Unix ms).
    pub last_event_ms: Gauge,
    /// When the last full read of the source was applied (Unix ms).
    pub last_resync_ms: Gauge,
    /// Labels rejected in the current table.
    pub labels_rejected: Gauge,
}

impl SourceMetrics {
    /// Create and register under `registry` (already prefixed `l4lb`).
    pub fn new(registry: &mut Registry) -> Self {
        let m = SourceMetrics::default();
        registry.register(
            "table_version",
            "Version of the current VIP table",
            m.table_version.clone(),
        );
        registry.register(
            "table_build_milliseconds",
            "Time the last table build took",
            m.table_build_ms.clone(),
        );
        registry.register(
            "table_changed_at_unix_milliseconds",
            "When the change behind the current table was seen at the source",
            m.table_changed_at_ms.clone(),
        );
        registry.register("vips", "VIPs in the current table", m.vips.clone());
        registry.register(
            "backends",
            "Backends in the current table by state",
            m.backends.clone(),
        );
        registry.register(
            "label_errors",
            "Rejected VIP labels by reason",
            m.label_errors.clone(),
        );
        registry.register(
            "marathon_requests",
            "Marathon API requests by kind and outcome",
            m.requests.clone(),
        );
        registry.register(
            "sync_errors",
            "Source errors by kind (table kept)",
            m.sync_errors.clone(),
        );
        registry.register(
            "marathon_events",
            "Marathon events received by type",
            m.events.clone(),
        );
        registry.register(
            "unresolved_hosts",
            "Task hosts that did not resolve (their tasks skipped)",
            m.unresolved_hosts.clone(),
        );
        registry.register(
            "source_connected",
            "1 while the source answers (Marathon event stream, controller watch, apps file)",
            m.connected.clone(),
        );
        registry.register(
            "source_last_event_unix_milliseconds",
            "When the source last reported a change",
            m.last_event_ms.clone(),
        );
        registry.register(
            "source_last_resync_unix_milliseconds",
            "When the last full read of the source was applied",
            m.last_resync_ms.clone(),
        );
        registry.register(
            "labels_rejected",
            "VIP labels the current table rejects (see /v1/label-errors)",
            m.labels_rejected.clone(),
        );
        m
    }

    /// The source answered (or stopped answering).
    pub fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    pub fn observe_table(&self, t: &VipTable) {
        self.table_version.set(t.version as i64);
        self.table_changed_at_ms.set(t.changed_at_ms as i64);
        self.vips.set(t.vips.len() as i64);
        let (mut active, mut draining) = (0i64, 0i64);
        for b in t.vips.values().flat_map(|v| v.backends.iter()) {
            match b.state {
                BackendState::Active => active += 1,
                BackendState::Draining => draining += 1,
            }
        }
        self.backends
            .get_or_create(&[("state", "active".into())])
            .set(active);
        self.backends
            .get_or_create(&[("state", "draining".into())])
            .set(draining);
    }

    pub fn request(&self, kind: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&[("kind", kind.into()), ("outcome", outcome.into())])
            .inc();
    }

    /// Count one event of `kind` from a source's stream, labelled with its name when `known`
    /// (the source's event types) has it, else `other`: the name comes from outside, and
    /// 200,000 invented names must not add 200,000 series.
    pub fn event(&self, kind: &str, known: &[&str]) {
        let label = known.iter().find(|k| **k == kind).map_or("other", |k| k);
        self.events
            .get_or_create(&[("type", label.to_string())])
            .inc();
    }

    pub fn sync_error(&self, kind: &'static str) {
        self.sync_errors
            .get_or_create(&[("kind", kind.into())])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_labels_are_a_bounded_set() {
        let mut reg = Registry::default();
        let m = SourceMetrics::new(&mut reg);
        let known = ["status_update_event", "TASK_UPDATED"];
        for i in 0..10_000 {
            m.event(&format!("invented_{i}"), &known);
        }
        m.event("status_update_event", &known);
        m.event("TASK_UPDATED", &known);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("marathon_events_total"))
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            out.contains("marathon_events_total{type=\"other\"} 10000"),
            "{out}"
        );
    }
}
