//! The Mesos sync loop: `SUBSCRIBE` to the leading master and fold every event into the
//! [`Cluster`], publishing the contributions of the tasks each event touched. Whenever the
//! stream cannot be opened or breaks (a dropped connection, a missed heartbeat, a frame out of
//! step), the whole state is read with `GET_STATE` before the next attempt, so the table stays
//! current while the stream is down. Every failure keeps the last good table.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::cluster::{Applied, Cluster};
use super::recordio::RecordIoDecoder;
use super::types::parse_event;
use crate::model::unix_ms_now;
use crate::source::Publisher;
use crate::source::http::{Backoff, MAX_BODY};

/// The event types counted by name in `marathon_events_total{type}` (any other is `other`).
const EVENTS: &[&str] = &[
    "SUBSCRIBED",
    "TASK_ADDED",
    "TASK_UPDATED",
    "AGENT_ADDED",
    "AGENT_REMOVED",
    "FRAMEWORK_ADDED",
    "FRAMEWORK_UPDATED",
    "FRAMEWORK_REMOVED",
    "HEARTBEAT",
];

/// How the loop behaves.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Largest event accepted (the first, `SUBSCRIBED`, holds the whole state).
    pub max_record: usize,
    /// Silence after which the stream counts as dead, until the master states its heartbeat
    /// interval (then three intervals).
    pub heartbeat_grace: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            max_record: MAX_BODY,
            // Mesos's default heartbeat is 15 s.
            heartbeat_grace: Duration::from_secs(45),
        }
    }
}

/// Why a stream was given up (for the log and `l4lb_source_sync_errors_total{kind}`).
fn stream_error_kind(e: &StreamEnd) -> &'static str {
    match e {
        StreamEnd::Eof => "events_eof",
        StreamEnd::Broken => "events_stream",
        StreamEnd::Silent => "events_heartbeat",
        StreamEnd::Framing => "events_framing",
        StreamEnd::Shutdown => "shutdown",
    }
}

#[derive(Debug)]
enum StreamEnd {
    Eof,
    Broken,
    Silent,
    Framing,
    Shutdown,
}

/// Run until `shutdown`, publishing through `publisher`.
pub async fn run(
    client: Client,
    publisher: Publisher,
    cfg: SyncConfig,
    shutdown: CancellationToken,
) {
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    let m = publisher.metrics().clone();
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match client.subscribe().await {
            Ok(resp) => {
                m.request("subscribe", "ok");
                tracing::info!("Mesos event stream connected");
                let connected_at = tokio::time::Instant::now();
                let end = follow(resp, &cluster, &publisher, &cfg, &shutdown).await;
                if matches!(end, StreamEnd::Shutdown) {
                    return;
                }
                tracing::warn!(reason = ?end, "Mesos event stream ended; reading the state");
                m.sync_error(stream_error_kind(&end));
                if connected_at.elapsed() > Duration::from_secs(10) {
                    backoff.reset();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to Mesos; reading the state");
                m.request("subscribe", "error");
                m.sync_error(e.kind());
            }
        }
        read_state(&client, &cluster, &publisher).await;
        if !backoff.pause(&shutdown).await {
            return;
        }
    }
}

/// The `GET_STATE` fallback: replace everything with the master's current state.
async fn read_state(client: &Client, cluster: &Arc<Mutex<Cluster>>, publisher: &Publisher) {
    let m = publisher.metrics();
    let body = match client.get_state().await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "Mesos GET_STATE failed; keeping the last good table");
            m.request("get_state", "error");
            m.sync_error(e.kind());
            return;
        }
    };
    m.request("get_state", "ok");
    let (cluster, publisher) = (Arc::clone(cluster), publisher.clone());
    let done = tokio::task::spawn_blocking(move || apply_records(vec![body], &cluster, &publisher));
    if let Err(e) = done.await {
        tracing::error!(error = %e, "applying Mesos state failed");
    }
}

/// Read records off one `SUBSCRIBE` answer until it ends.
async fn follow(
    resp: reqwest::Response,
    cluster: &Arc<Mutex<Cluster>>,
    publisher: &Publisher,
    cfg: &SyncConfig,
    shutdown: &CancellationToken,
) -> StreamEnd {
    let mut body = resp.bytes_stream();
    let mut dec = RecordIoDecoder::new(cfg.max_record);
    let mut grace = cfg.heartbeat_grace;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return StreamEnd::Shutdown,
            n = tokio::time::timeout(grace, body.next()) => n,
        };
        let chunk = match next {
            Err(_) => return StreamEnd::Silent,
            Ok(None) => return StreamEnd::Eof,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e.without_url(), "Mesos event stream broke");
                return StreamEnd::Broken;
            }
            Ok(Some(Ok(c))) => c,
        };
        let mut records = Vec::new();
        if let Err(e) = dec.feed(&chunk, &mut records) {
            tracing::warn!(error = %e, "Mesos event stream out of step");
            return StreamEnd::Framing;
        }
        if records.is_empty() {
            continue;
        }
        let (c, p) = (Arc::clone(cluster), publisher.clone());
        match tokio::task::spawn_blocking(move || apply_records(records, &c, &p)).await {
            Ok(Some(hb)) => {
                grace = Duration::try_from_secs_f64(hb * 3.0)
                    .unwrap_or(cfg.heartbeat_grace)
                    .max(Duration::from_secs(1));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "applying Mesos events failed");
                return StreamEnd::Broken;
            }
        }
    }
}

/// Fold `records` (events, or a `GET_STATE` answer) into the cluster and publish what changed:
/// everything after a `SUBSCRIBED`/`GET_STATE`, else only the tasks the events touched.
/// Blocking (JSON, name lookups, the table build). Returns the heartbeat interval a
/// `SUBSCRIBED` announced.
pub fn apply_records(
    records: Vec<Vec<u8>>,
    cluster: &Mutex<Cluster>,
    publisher: &Publisher,
) -> Option<f64> {
    let m = publisher.metrics();
    let now = unix_ms_now();
    let Ok(mut c) = cluster.lock() else {
        return None;
    };
    let mut heartbeat = None;
    let mut full = false;
    let mut touched = BTreeSet::new();
    for r in records {
        let ev = match parse_event(&r) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "skipping a Mesos event that does not parse");
                m.sync_error("payload");
                continue;
            }
        };
        m.event(&ev.kind, EVENTS);
        if let Some(s) = &ev.subscribed {
            heartbeat = s.heartbeat_interval_seconds;
        }
        let (applied, bad) = c.apply(ev);
        for b in bad {
            tracing::warn!(error = %b, "skipping a Mesos task that does not parse");
            m.sync_error("task_parse");
        }
        match applied {
            Applied::Full => {
                full = true;
                touched.clear();
            }
            Applied::Tasks(keys) if !full => touched.extend(keys),
            Applied::Tasks(_) | Applied::Nothing => {}
        }
    }
    let hosts = publisher.hosts().clone();
    let mut resolve = |h: &str| hosts.resolve(h);
    if full {
        tracing::info!(tasks = c.task_count(), "Mesos state read");
        publisher.replace_contributions(c.contributions(&mut resolve), now);
    } else if !touched.is_empty() {
        publisher.update_contributions(c.changed(touched, &mut resolve), now);
    }
    heartbeat
}
