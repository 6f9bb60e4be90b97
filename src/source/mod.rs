//! Where VIP tables come from: Marathon (REST snapshot + SSE invalidation, apps and pods), the
//! Mesos master (operator API `SUBSCRIBE`), an apps file in Marathon's shape, or, for agents,
//! a controller's `/v1/vips` watch ([`controller_client`]; [`rendezvous`] ranks controllers
//! per agent). Every source publishes whole tables on a `tokio::sync::watch` channel. Depends
//! on `model`, never on `agent`.
//!
//! A neutral core serves them all: [`http`] (credentials, errors, capped reads, redaction,
//! back-off), [`acs`] (a DC/OS service account's login), [`entries`] (labelled ports → VIP
//! entries), [`state`] (contributions → versioned
//! table), [`metrics`], and here the [`Publisher`], the [`HostCache`] and payload errors.
//! `marathon`, `mesos`, `file` and `controller_client` depend on that core, never on each
//! other.

pub mod acs;
pub mod controller_client;
pub mod entries;
pub mod file;
pub mod http;
pub mod marathon;
pub mod mesos;
pub mod metrics;
pub mod rendezvous;
pub mod state;

use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use serde_json::Value;

use self::entries::{Contribution, Rejection};
use self::metrics::SourceMetrics;
use self::state::{BuildConfig, TableState};
use crate::model::status::{LabelRejection, carry_since};
use crate::model::{VipTable, unix_ms_now};

/// The sending half every source publishes on.
pub type TableTx = watch::Sender<Arc<VipTable>>;
/// The receiving half consumers (API, agent) follow.
pub type TableRx = watch::Receiver<Arc<VipTable>>;
/// Every label the source currently rejects, with since when (for `/v1/label-errors`).
pub type LabelErrorsRx = watch::Receiver<Arc<Vec<LabelRejection>>>;

/// A channel holding the empty version-0 table ("no table yet").
pub fn table_channel() -> (TableTx, TableRx) {
    watch::channel(Arc::new(VipTable::default()))
}

/// Resolves `task.host` names, caching answers (good and bad) for a short while so a table
/// build looks each host up at most once, and the builds that follow within the TTL not at
/// all. Shared by every app and every build of one source.
#[derive(Clone)]
pub struct HostCache {
    inner: Arc<Mutex<HostMap>>,
    lookup: Arc<Lookup>,
    ttl: Duration,
}

/// A blocking name lookup.
type Lookup = dyn Fn(&str) -> Option<IpAddr> + Send + Sync;

type HostMap = HashMap<String, (Option<IpAddr>, Instant)>;

const HOST_TTL: Duration = Duration::from_secs(30);

impl Default for HostCache {
    /// The system resolver (`getaddrinfo`), answers kept 30 s.
    fn default() -> Self {
        HostCache::with_lookup(
            |host| {
                (host, 0)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut it| it.next())
                    .map(|sa| sa.ip())
            },
            HOST_TTL,
        )
    }
}

impl std::fmt::Debug for HostCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.inner.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("HostCache")
            .field("cached", &cached)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl HostCache {
    /// A cache over `lookup` (blocking), answers kept for `ttl`.
    pub fn with_lookup(
        lookup: impl Fn(&str) -> Option<IpAddr> + Send + Sync + 'static,
        ttl: Duration,
    ) -> Self {
        HostCache {
            inner: Arc::default(),
            lookup: Arc::new(lookup),
            ttl,
        }
    }

    /// Blocking lookup (run it off the async threads).
    pub fn resolve(&self, host: &str) -> Option<IpAddr> {
        if let Ok(map) = self.inner.lock()
            && let Some((ip, at)) = map.get(host)
            && at.elapsed() < self.ttl
        {
            return *ip;
        }
        let ip = (self.lookup)(host);
        if let Ok(mut map) = self.inner.lock() {
            // Forget what expired, so hosts that left the cluster do not stay forever.
            let ttl = self.ttl;
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            map.insert(host.to_string(), (ip, Instant::now()));
        }
        ip
    }
}

/// Why a payload was not usable (the last good table stays).
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("payload has no {0:?} field of the expected shape")]
    Shape(&'static str),
}

/// Each element of a list on its own: one that does not parse is returned as an error string
/// naming it (`<what> <id>: <error>`, the id where `id` finds it) and skipped alone.
pub fn parse_each<T: serde::de::DeserializeOwned>(
    raw: Vec<Value>,
    what: &str,
    id: impl Fn(&Value) -> Option<&Value>,
) -> (Vec<T>, Vec<String>) {
    let mut ok = Vec::with_capacity(raw.len());
    let mut bad = Vec::new();
    for v in raw {
        let name = id(&v).and_then(Value::as_str).unwrap_or("?").to_string();
        match serde_json::from_value::<T>(v) {
            Ok(a) => ok.push(a),
            Err(e) => bad.push(format!("{what} {name}: {e}")),
        }
    }
    (ok, bad)
}

/// Why a source update was not applied. The last good table stays in every case.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad payload: {0}")]
    Payload(#[from] PayloadError),
    #[error("build task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Owns the table state and publishes every new version; shared by the Marathon, Mesos and
/// file sources. Heavy work (JSON, DNS, merge) runs on the blocking pool ([`Publisher::blocking`])
/// so a big cluster never stalls the data plane sharing the runtime.
#[derive(Clone)]
pub struct Publisher {
    state: Arc<Mutex<TableState>>,
    tx: TableTx,
    labels: Arc<watch::Sender<Arc<Vec<LabelRejection>>>>,
    metrics: SourceMetrics,
    hosts: HostCache,
}

impl Publisher {
    pub fn new(cfg: BuildConfig, tx: TableTx, metrics: SourceMetrics) -> Self {
        Publisher {
            state: Arc::new(Mutex::new(TableState::new(cfg, unix_ms_now()))),
            tx,
            labels: Arc::new(watch::channel(Arc::default()).0),
            metrics,
            hosts: HostCache::default(),
        }
    }

    /// Follow the rejected labels (updated with every build that changes them).
    pub fn label_errors(&self) -> LabelErrorsRx {
        self.labels.subscribe()
    }

    pub fn metrics(&self) -> &SourceMetrics {
        &self.metrics
    }

    /// Every label currently rejected.
    pub fn rejections(&self) -> Vec<Rejection> {
        self.state
            .lock()
            .map(|s| s.rejections().cloned().collect())
            .unwrap_or_default()
    }

    /// Run `f` on the blocking pool (JSON, name lookups, the table build) with this
    /// publisher.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Publisher) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this)).await
    }

    /// Log and count the parts of a payload that did not parse (each skipped alone).
    pub fn skipped(&self, bad: Vec<String>) {
        for b in bad {
            tracing::warn!(error = %b, "skipping an app, pod or task that does not parse");
            self.metrics.sync_error("app_parse");
        }
    }

    /// Replace every contribution with `contribs` (a source's whole state; blocking: call it
    /// off the async threads).
    pub fn replace_contributions(&self, contribs: Vec<Contribution>, changed_at_ms: u64) {
        self.report_hosts(&contribs);
        self.apply(changed_at_ms, |s| s.replace_all(contribs));
    }

    /// Replace (`Some`) or remove (`None`) the contributions named (blocking, as above).
    pub fn update_contributions(
        &self,
        changes: Vec<(String, Option<Contribution>)>,
        changed_at_ms: u64,
    ) {
        self.report_hosts(changes.iter().filter_map(|(_, c)| c.as_ref()));
        self.apply(changed_at_ms, |s| s.update(changes));
    }

    /// Whether the last state published holds a contribution by `id`.
    pub fn holds(&self, id: &str) -> bool {
        self.state.lock().is_ok_and(|s| s.holds(id))
    }

    /// The host-name cache every build of this source shares.
    pub fn hosts(&self) -> &HostCache {
        &self.hosts
    }

    fn report_hosts<'a>(&self, seen: impl IntoIterator<Item = &'a Contribution>) {
        for c in seen {
            for h in &c.unresolved_hosts {
                tracing::warn!(host = %h, app = %c.app, "task host does not resolve; its tasks are skipped");
                self.metrics.unresolved_hosts.inc();
            }
        }
    }

    fn apply(&self, changed_at_ms: u64, change: impl FnOnce(&mut TableState)) {
        let started = Instant::now();
        let rebuilt = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            change(&mut st);
            let rebuilt = st.rebuild(changed_at_ms);
            let now: Vec<LabelRejection> = st.rejections().map(|r| r.to_model(0)).collect();
            self.metrics.labels_rejected.set(now.len() as i64);
            self.labels.send_if_modified(|shown| {
                let next = carry_since(shown, now, unix_ms_now());
                let changed = **shown != next;
                if changed {
                    *shown = Arc::new(next);
                }
                changed
            });
            rebuilt
        };
        self.metrics
            .table_build_ms
            .set(started.elapsed().as_millis() as i64);
        for r in &rebuilt.new_rejections {
            tracing::warn!(app = %r.app, port_index = r.port_index, key = %r.key, value = %r.value,
                reason = r.reason, "VIP label rejected: {}", r.error);
            self.metrics
                .label_errors
                .get_or_create(&[("reason", r.reason.to_string())])
                .inc();
        }
        if let Some(t) = rebuilt.table {
            tracing::info!(
                version = t.version,
                vips = t.vips.len(),
                backends = t.backend_count(),
                "new VIP table"
            );
            self.metrics.observe_table(&t);
            self.tx.send_replace(t);
        }
    }
}
