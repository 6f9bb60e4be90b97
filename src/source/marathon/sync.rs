//! The Marathon sync loop: a full snapshot at start, on every (re)connect of the event stream
//! and every resync interval; in between, the SSE stream invalidates single apps, which are
//! re-read alone. Bursts coalesce: while one round of fetches runs, new invalidations collect
//! into the next round. Every failure keeps the last good table, and an app the table holds
//! is dropped only by a full read: a 404 on its single read (Marathon gives one for a moment
//! during a deployment) schedules that read instead, at most one per `confirm_gap`.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::apps::{app_contribution, contributions};
use super::client::Client;
use super::events::{COUNTED_EVENTS, Invalidation, SseDecoder, invalidation};
use super::pods::{parse_pod, parse_pods, pod_contribution};
use super::types::parse_app;
use crate::model::unix_ms_now;
use crate::source::http::{Backoff, Error};
use crate::source::{Publisher, SourceError};

/// How the loop behaves.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub resync_interval: Duration,
    /// Smallest and largest back-off between failed attempts.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Apps re-read at once after a burst of events.
    pub fetch_concurrency: usize,
    /// Least time between two full reads that confirm a held app's 404 (a 404 storm costs
    /// one full read per gap, however many apps and events).
    pub confirm_gap: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            resync_interval: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            fetch_concurrency: 8,
            confirm_gap: Duration::from_secs(1),
        }
    }
}

/// Messages from the event-stream task to the sync loop.
#[derive(Debug)]
enum Signal {
    /// The stream (re)connected: events may have been missed; take a snapshot.
    Connected,
    Invalidate(Invalidation, u64),
}

/// Run until `shutdown`. Publishes through `publisher`.
pub async fn run(
    client: Client,
    publisher: Publisher,
    cfg: SyncConfig,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<Signal>(4096);
    let stream_task = tokio::spawn(stream_events(
        client.clone(),
        publisher.clone(),
        cfg.clone(),
        tx,
        shutdown.clone(),
    ));

    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    // When the next full snapshot is due (now, at start).
    let mut snapshot_at = tokio::time::Instant::now();
    let mut snapshot_changed_at = unix_ms_now();
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut dirty_since = 0u64;
    // When the last full read to confirm a 404 was scheduled.
    let mut last_confirm: Option<tokio::time::Instant> = None;

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(snapshot_at) => {
                match take_snapshot(&client, &publisher, snapshot_changed_at).await {
                    Ok(()) => {
                        backoff.reset();
                        snapshot_at = tokio::time::Instant::now() + cfg.resync_interval;
                    }
                    Err(()) => snapshot_at = tokio::time::Instant::now() + backoff.next_delay(),
                }
                snapshot_changed_at = unix_ms_now();
            }
            sig = rx.recv() => {
                let Some(sig) = sig else { break };
                let mut all = false;
                let mut handle = |s: Signal, dirty: &mut BTreeSet<String>, since: &mut u64| match s {
                    Signal::Connected => all = true,
                    Signal::Invalidate(Invalidation::All, at) => {
                        all = true;
                        *since = if *since == 0 { at } else { (*since).min(at) };
                    }
                    Signal::Invalidate(Invalidation::Apps(apps), at) => {
                        dirty.extend(apps);
                        *since = if *since == 0 { at } else { (*since).min(at) };
                    }
                    Signal::Invalidate(Invalidation::None, _) => {}
                };
                handle(sig, &mut dirty, &mut dirty_since);
                // Coalesce everything already queued.
                while let Ok(s) = rx.try_recv() {
                    handle(s, &mut dirty, &mut dirty_since);
                }
                if all {
                    dirty.clear();
                    snapshot_changed_at = if dirty_since == 0 { unix_ms_now() } else { dirty_since };
                    dirty_since = 0;
                    snapshot_at = tokio::time::Instant::now();
                    continue;
                }
                if dirty.is_empty() {
                    continue;
                }
                let apps = std::mem::take(&mut dirty);
                let at = std::mem::replace(&mut dirty_since, 0);
                match refresh_apps(&client, &publisher, apps, at, cfg.fetch_concurrency).await {
                    Refreshed::All => {}
                    // An app could not be read: fall back to a snapshot soon.
                    Refreshed::Failed => {
                        snapshot_changed_at = at;
                        snapshot_at = tokio::time::Instant::now() + backoff.next_delay();
                    }
                    // A held app answered 404: only a full read may drop it. However many
                    // such 404s come, at most one such read per `confirm_gap`.
                    Refreshed::Confirm => {
                        snapshot_changed_at = at;
                        let soonest = last_confirm.map_or_else(tokio::time::Instant::now, |t| t + cfg.confirm_gap);
                        snapshot_at = snapshot_at.min(soonest.max(tokio::time::Instant::now()));
                        last_confirm = Some(snapshot_at);
                    }
                }
            }
        }
    }
    stream_task.abort();
}

async fn take_snapshot(client: &Client, publisher: &Publisher, changed_at: u64) -> Result<(), ()> {
    let m = publisher.metrics();
    let body = match client.apps().await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "Marathon snapshot failed; keeping the last good table");
            m.request("apps", "error");
            m.sync_error(e.kind());
            return Err(());
        }
    };
    m.request("apps", "ok");
    let pods = match client.pods().await {
        Ok(p) => {
            m.request("pods", "ok");
            p
        }
        Err(e) => {
            tracing::warn!(error = %e, "Marathon pods snapshot failed; keeping the last good table");
            m.request("pods", "error");
            m.sync_error(e.kind());
            return Err(());
        }
    };
    publish_snapshot(publisher, body, pods, changed_at)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "Marathon snapshot unusable; keeping the last good table");
            m.sync_error("payload");
        })
}

/// How re-reading the apps an event named went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refreshed {
    All,
    /// One could not be read or used: its last good state stays until a snapshot.
    Failed,
    /// One the table holds answered 404 (Marathon does so for a moment during a
    /// deployment): kept until a full read confirms it is gone.
    Confirm,
}

async fn refresh_apps(
    client: &Client,
    publisher: &Publisher,
    apps: BTreeSet<String>,
    changed_at: u64,
    concurrency: usize,
) -> Refreshed {
    let m = publisher.metrics();
    let results: Vec<_> = futures::stream::iter(apps)
        .map(|id| async move {
            let r = read_app_or_pod(client, &id).await;
            (id, r)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut ok = true;
    let mut confirm = false;
    for (id, r) in results {
        match r {
            Ok(RunSpec::App(None)) if publisher.holds(&id) => {
                tracing::info!(app = %id, "a held app answered 404; keeping it until a full read confirms");
                m.request("app", "not_found");
                confirm = true;
            }
            Ok(RunSpec::Pod(body)) => {
                m.request("pod", "ok");
                if let Err(e) = publish_pod(publisher, body, changed_at).await {
                    tracing::warn!(pod = %id, error = %e, "pod payload unusable; keeping its last good state");
                    m.sync_error("payload");
                    ok = false;
                }
            }
            Ok(RunSpec::App(body)) => {
                m.request("app", "ok");
                if let Err(e) = publish_app(publisher, id.clone(), body, changed_at).await {
                    tracing::warn!(app = %id, error = %e, "app payload unusable; keeping its last good state");
                    m.sync_error("payload");
                    ok = false;
                }
            }
            Err(e) => {
                tracing::warn!(app = %id, error = %e, "reading app failed; keeping its last good state");
                m.request("app", "error");
                m.sync_error(e.kind());
                ok = false;
            }
        }
    }
    match (ok, confirm) {
        (false, _) => Refreshed::Failed,
        (true, true) => Refreshed::Confirm,
        (true, false) => Refreshed::All,
    }
}

/// Replace every app and pod with those in `apps` and `pods` (a `/v2/pods/::status`
/// payload; `None`: a Marathon without pods).
async fn publish_snapshot(
    publisher: &Publisher,
    apps: Vec<u8>,
    pods: Option<Vec<u8>>,
    changed_at_ms: u64,
) -> Result<(), SourceError> {
    publisher
        .blocking(move |p| {
            let (mut contribs, mut bad) = contributions(&apps, p.hosts())?;
            if let Some(pods) = pods {
                let (pods, bad_pods) = parse_pods(&pods)?;
                bad.extend(bad_pods);
                contribs.extend(
                    pods.iter()
                        .map(|pod| pod_contribution(pod, &mut |h| p.hosts().resolve(h))),
                );
            }
            p.skipped(bad);
            p.replace_contributions(contribs, changed_at_ms);
            Ok(())
        })
        .await?
}

/// Replace one pod from a `/v2/pods/{id}::status` payload.
async fn publish_pod(
    publisher: &Publisher,
    body: Vec<u8>,
    changed_at_ms: u64,
) -> Result<(), SourceError> {
    publisher
        .blocking(move |p| {
            let pod = parse_pod(&body)?;
            let c = pod_contribution(&pod, &mut |h| p.hosts().resolve(h));
            p.update_contributions(vec![(pod.id, Some(c))], changed_at_ms);
            Ok(())
        })
        .await?
}

/// Replace one app from a `/v2/apps/{id}?embed=app.tasks` payload; `None` means the app is
/// gone (404).
async fn publish_app(
    publisher: &Publisher,
    id: String,
    body: Option<Vec<u8>>,
    changed_at_ms: u64,
) -> Result<(), SourceError> {
    publisher
        .blocking(move |p| {
            let c = match body {
                Some(body) => Some(app_contribution(&parse_app(&body)?, &mut |h| {
                    p.hosts().resolve(h)
                })),
                None => None,
            };
            p.update_contributions(vec![(id, c)], changed_at_ms);
            p.metrics().last_event_ms.set(unix_ms_now() as i64);
            Ok(())
        })
        .await?
}

/// What an id names: an app (`None`: neither an app nor a pod, gone) or a pod.
enum RunSpec {
    App(Option<Vec<u8>>),
    Pod(Vec<u8>),
}

/// Read `id` as an app; when no app has it, as a pod (ids are one namespace in Marathon).
async fn read_app_or_pod(client: &Client, id: &str) -> Result<RunSpec, Error> {
    match client.app(id).await? {
        Some(body) => Ok(RunSpec::App(Some(body))),
        None => Ok(match client.pod(id).await? {
            Some(body) => RunSpec::Pod(body),
            None => RunSpec::App(None),
        }),
    }
}

async fn stream_events(
    client: Client,
    publisher: Publisher,
    cfg: SyncConfig,
    tx: mpsc::Sender<Signal>,
    shutdown: CancellationToken,
) {
    let m = publisher.metrics().clone();
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match client.events().await {
            Ok(resp) => {
                m.request("events", "ok");
                m.set_connected(true);
                tracing::info!("Marathon event stream connected");
                // Events may have been missed before the stream was up: re-read everything.
                if tx.send(Signal::Connected).await.is_err() {
                    return;
                }
                let connected_at = tokio::time::Instant::now();
                let mut body = resp.bytes_stream();
                let mut dec = SseDecoder::default();
                let mut evs = Vec::new();
                loop {
                    let chunk = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        c = body.next() => c,
                    };
                    let chunk = match chunk {
                        Some(Ok(c)) => c,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e.without_url(), "Marathon event stream broke");
                            m.sync_error("events_stream");
                            break;
                        }
                        None => {
                            tracing::warn!("Marathon event stream ended");
                            m.sync_error("events_eof");
                            break;
                        }
                    };
                    if dec.feed(&chunk, &mut evs).is_err() {
                        m.sync_error("events_line_too_long");
                        break;
                    }
                    let now = unix_ms_now();
                    for ev in evs.drain(..) {
                        let kind = if ev.event.is_empty() {
                            "unnamed"
                        } else {
                            ev.event.as_str()
                        };
                        m.event(kind, COUNTED_EVENTS);
                        m.last_event_ms.set(now as i64);
                        let inv = invalidation(&ev);
                        if inv != Invalidation::None
                            && tx.send(Signal::Invalidate(inv, now)).await.is_err()
                        {
                            return;
                        }
                    }
                }
                m.set_connected(false);
                if connected_at.elapsed() > Duration::from_secs(10) {
                    backoff.reset();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open Marathon event stream");
                m.request("events", "error");
                m.sync_error(e.kind());
            }
        }
        if !backoff.pause(&shutdown).await {
            return;
        }
    }
}
