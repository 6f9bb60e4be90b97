//! Where VIP tables come from: Marathon (REST snapshot + SSE invalidation, apps and pods), the
//! Mesos master (operator API `SUBSCRIBE`), a Marathon-shaped apps file, or, for agents, a
//! controller's `/v1/vips` watch. Every source publishes whole tables on a
//! `tokio::sync::watch` channel. Depends on `model`, never on `agent`.

pub mod build;
pub mod controller;
pub mod file;
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

use self::build::{AppVips, Rejection, app_vips};
use self::marathon::types::{PayloadError, map_apps, parse_app};
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

/// Parse a whole apps payload into per-app contributions (blocking: JSON and DNS).
pub fn contributions(
    body: &[u8],
    hosts: &HostCache,
) -> Result<(Vec<AppVips>, Vec<String>), PayloadError> {
    map_apps(body, |a| app_vips(&a, &mut |h| hosts.resolve(h)))
}

/// Why [`read_capped`] stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The answer is longer than the limit (declared or as read).
    TooLarge,
    Http(reqwest::Error),
}

/// An HTTP answer's body, at most `limit` bytes: refused at once when its declared length is
/// over, else read chunk by chunk (no extra copy) until it ends or passes the limit. Every
/// source reads through here (Marathon, Mesos, an agent's controller watch), so one cap
/// bounds them all.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ReadError> {
    let declared = resp.content_length().unwrap_or(0);
    if declared > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut out = Vec::with_capacity(declared as usize);
    while let Some(c) = resp.chunk().await.map_err(ReadError::Http)? {
        if out.len() + c.len() > limit {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// Why a source update was not applied. The last good table stays in every case.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad payload: {0}")]
    Payload(#[from] PayloadError),
    #[error("build task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Owns the table state and publishes every new version; shared by the Marathon and file
/// sources. Heavy work (JSON, DNS, merge) runs on the blocking pool so a big cluster never
/// stalls the data plane sharing the runtime.
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

    /// Replace every app with those in `body` (a `/v2/apps?embed=apps.tasks` payload).
    pub async fn snapshot(&self, body: Vec<u8>, changed_at_ms: u64) -> Result<(), SourceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let (contribs, bad) = contributions(&body, &this.hosts)?;
            for b in bad {
                tracing::warn!(error = %b, "skipping an app that does not parse");
                this.metrics.sync_error("app_parse");
            }
            this.report_hosts(&contribs);
            this.apply(changed_at_ms, |s| s.replace_all(contribs));
            this.metrics.last_resync_ms.set(unix_ms_now() as i64);
            Ok(())
        })
        .await?
    }

    /// Replace every app and pod with those in `apps` and `pods` (a `/v2/pods/::status`
    /// payload; `None`: a Marathon without pods).
    pub async fn snapshot_with_pods(
        &self,
        apps: Vec<u8>,
        pods: Option<Vec<u8>>,
        changed_at_ms: u64,
    ) -> Result<(), SourceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let (mut contribs, mut bad) = contributions(&apps, &this.hosts)?;
            if let Some(pods) = pods {
                let (pods, bad_pods) = marathon::pods::parse_pods(&pods)?;
                bad.extend(bad_pods);
                contribs.extend(
                    pods.iter()
                        .map(|p| marathon::pods::pod_vips(p, &mut |h| this.hosts.resolve(h))),
                );
            }
            for b in bad {
                tracing::warn!(error = %b, "skipping an app or pod that does not parse");
                this.metrics.sync_error("app_parse");
            }
            this.report_hosts(&contribs);
            this.apply(changed_at_ms, |s| s.replace_all(contribs));
            Ok(())
        })
        .await?
    }

    /// Replace one pod from a `/v2/pods/{id}::status` payload.
    pub async fn pod(&self, body: Vec<u8>, changed_at_ms: u64) -> Result<(), SourceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let pod = marathon::pods::parse_pod(&body)?;
            let c = marathon::pods::pod_vips(&pod, &mut |h| this.hosts.resolve(h));
            this.report_hosts(std::slice::from_ref(&c));
            this.apply(changed_at_ms, |s| s.upsert(c));
            Ok(())
        })
        .await?
    }

    /// Replace one app from a `/v2/apps/{id}?embed=app.tasks` payload; `None` means the app
    /// is gone (404).
    pub async fn app(
        &self,
        id: String,
        body: Option<Vec<u8>>,
        changed_at_ms: u64,
    ) -> Result<(), SourceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            match body {
                None => this.apply(changed_at_ms, |s| s.remove(&id)),
                Some(body) => {
                    let app = parse_app(&body)?;
                    let c = app_vips(&app, &mut |h| this.hosts.resolve(h));
                    this.report_hosts(std::slice::from_ref(&c));
                    this.apply(changed_at_ms, |s| s.upsert(c));
                }
            }
            this.metrics.last_event_ms.set(unix_ms_now() as i64);
            Ok(())
        })
        .await?
    }

    /// Replace every contribution with `contribs` (a source's whole state; blocking: call it
    /// off the async threads).
    pub fn replace_contributions(&self, contribs: Vec<AppVips>, changed_at_ms: u64) {
        self.report_hosts(&contribs);
        self.apply(changed_at_ms, |s| s.replace_all(contribs));
    }

    /// Replace (`Some`) or remove (`None`) the contributions named (blocking, as above).
    pub fn update_contributions(
        &self,
        changes: Vec<(String, Option<AppVips>)>,
        changed_at_ms: u64,
    ) {
        let seen: Vec<AppVips> = changes.iter().filter_map(|(_, c)| c.clone()).collect();
        self.report_hosts(&seen);
        self.apply(changed_at_ms, |s| {
            for (id, c) in changes {
                match c {
                    Some(c) => s.upsert(c),
                    None => s.remove(&id),
                }
            }
        });
    }

    /// The host-name cache every build of this source shares.
    pub fn hosts(&self) -> &HostCache {
        &self.hosts
    }

    fn report_hosts(&self, seen: &[AppVips]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TWO_APPS: &str = r#"{"apps":[
        {"id":"/a","portDefinitions":[{"port":0,"labels":{"VIP_0":"/a:80"}}],"tasks":[
            {"id":"a1","host":"node-1.example","ports":[31001],"state":"TASK_RUNNING"},
            {"id":"a2","host":"gone.example","ports":[31002],"state":"TASK_RUNNING"}]},
        {"id":"/b","portDefinitions":[{"port":0,"labels":{"VIP_0":"/b:80"}}],"tasks":[
            {"id":"b1","host":"node-1.example","ports":[31003],"state":"TASK_RUNNING"},
            {"id":"b2","host":"gone.example","ports":[31004],"state":"TASK_RUNNING"}]}]}"#;

    fn counting(ttl: Duration) -> (HostCache, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let cache = HostCache::with_lookup(
            move |h| {
                c.fetch_add(1, Ordering::SeqCst);
                (h == "node-1.example").then(|| "198.18.0.1".parse().unwrap())
            },
            ttl,
        );
        (cache, calls)
    }

    #[test]
    fn hosts_are_looked_up_once_across_apps_and_builds_failures_included() {
        let (cache, calls) = counting(Duration::from_secs(30));
        let (contribs, _) = contributions(TWO_APPS.as_bytes(), &cache).unwrap();
        // Two names, each looked up once for both apps, the failure too.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        for c in &contribs {
            assert_eq!(c.unresolved_hosts, ["gone.example"]);
            assert_eq!(c.entries[0].backends.len(), 1);
            assert_eq!(c.entries[0].backends[0].addr.ip().to_string(), "198.18.0.1");
        }
        // The next build within the TTL asks nothing.
        contributions(TWO_APPS.as_bytes(), &cache).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn expired_answers_are_asked_again() {
        let (cache, calls) = counting(Duration::ZERO);
        contributions(TWO_APPS.as_bytes(), &cache).unwrap();
        contributions(TWO_APPS.as_bytes(), &cache).unwrap();
        // With no TTL nothing is shared: 2 builds × 2 apps × 2 names (one app asks each of
        // its names once).
        assert_eq!(calls.load(Ordering::SeqCst), 8);
    }
}
