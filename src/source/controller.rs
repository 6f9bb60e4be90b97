//! An agent's source: follow one or more controllers with Consul-style blocking queries on
//! `GET /v1/vips/delta?index=N&wait=…` (only what changed since the version held), failing
//! over between them. When every controller is down
//! the last table stays published, so the data plane keeps forwarding.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{StatusCode, Url, header};
use tokio_util::sync::CancellationToken;

use super::TableTx;
use super::marathon::sync::Backoff;
use super::metrics::SourceMetrics;
use crate::model::Secret;
use crate::model::wire::DeltaJson;
use crate::model::wire::{CHANGED_AT_HEADER, INDEX_HEADER};
use crate::model::{VipTable, unix_ms_now};

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub controllers: Vec<Url>,
    /// How long one blocking query may wait on the controller.
    pub wait: Duration,
    pub token: Option<Secret>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("HTTP {0}")]
    Status(StatusCode),
    #[error("body is not a VIP list: {0}")]
    Body(serde_json::Error),
    #[error("body longer than {0} bytes")]
    TooLarge(usize),
}

/// Follow the controllers until `shutdown`, publishing each changed table on `tx` with an
/// agent-local version (controllers number their tables independently).
pub async fn run(
    cfg: WatchConfig,
    tx: TableTx,
    metrics: SourceMetrics,
    shutdown: CancellationToken,
) {
    let http = match crate::tls::client_builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(cfg.wait + Duration::from_secs(10))
        .tcp_keepalive(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build HTTP client");
            return;
        }
    };
    if cfg.controllers.is_empty() {
        return;
    }
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    let mut idx = 0usize;
    let mut index = 0u64;
    // The controller's own table at `index` (in its numbering), which deltas apply to.
    let mut mirror = VipTable::default();
    loop {
        let base = &cfg.controllers[idx % cfg.controllers.len()];
        let fut = poll(&http, base, index, &cfg);
        let res = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = fut => r,
        };
        match res {
            Ok((new_index, changed_at, delta)) => {
                metrics.request("vips_watch", "ok");
                metrics.set_connected(true);
                if delta.full {
                    metrics.last_resync_ms.set(unix_ms_now() as i64);
                }
                backoff.reset();
                if !delta.full && delta.from != mirror.version {
                    // Not a change to what we hold (cannot happen with a sane controller):
                    // start over with a full read.
                    index = 0;
                    mirror = VipTable::default();
                    continue;
                }
                mirror = delta.apply(&mirror);
                index = new_index;
                let current = tx.borrow().clone();
                let mut t = mirror.clone();
                t.version = current.version + 1;
                if current.version == 0 || !t.same_content(&current) {
                    t.changed_at_ms = changed_at;
                    let t = Arc::new(t.share_with(&current));
                    tracing::info!(
                        version = t.version,
                        controller_index = index,
                        vips = t.vips.len(),
                        "new VIP table from controller"
                    );
                    metrics.observe_table(&t);
                    metrics.last_event_ms.set(unix_ms_now() as i64);
                    tx.send_replace(t);
                }
            }
            Err(e) => {
                tracing::warn!(controller = %base, error = %e, "controller watch failed; keeping the last table");
                metrics.request("vips_watch", "error");
                metrics.sync_error("controller");
                metrics.set_connected(false);
                idx += 1;
                index = 0;
                mirror = VipTable::default();
                let wait = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn poll(
    http: &reqwest::Client,
    base: &Url,
    index: u64,
    cfg: &WatchConfig,
) -> Result<(u64, u64, DeltaJson), WatchError> {
    let mut url = base.clone();
    url.set_path(&format!(
        "{}/v1/vips/delta",
        base.path().trim_end_matches('/')
    ));
    url.set_query(Some(&format!(
        "index={index}&wait={}s",
        cfg.wait.as_secs().max(1)
    )));
    let mut rb = http.get(url);
    if let Some(t) = &cfg.token {
        rb = rb.header(header::AUTHORIZATION, format!("Bearer {}", t.expose()));
    }
    let resp = rb.send().await?;
    if !resp.status().is_success() {
        return Err(WatchError::Status(resp.status()));
    }
    let num = |h: &str| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let new_index = num(INDEX_HEADER);
    let changed_at = num(CHANGED_AT_HEADER);
    let limit = super::marathon::client::MAX_BODY;
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(WatchError::TooLarge(limit));
    }
    let mut resp = resp;
    let mut body = Vec::new();
    while let Some(c) = resp.chunk().await? {
        if body.len() + c.len() > limit {
            return Err(WatchError::TooLarge(limit));
        }
        body.extend_from_slice(&c);
    }
    let delta: DeltaJson = serde_json::from_slice(&body).map_err(WatchError::Body)?;
    Ok((new_index, changed_at, delta))
}
