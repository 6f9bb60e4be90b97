//! The apps-file source: a file re-read whenever its modification time, size or content
//! changes, and read into contributions by the [`Reader`] the caller names (for `--apps-file`,
//! Marathon's `GET /v2/apps?embed=apps.tasks` shape). A bad edit is logged and counted; the
//! last good table stays. Knows no source's payloads.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::entries::Contribution;
use super::{HostCache, PayloadError, Publisher, SourceError};
use crate::model::unix_ms_now;

/// Reads a whole file into contributions and the parts that did not parse (blocking: JSON
/// and name lookups).
pub type Reader = fn(&[u8], &HostCache) -> Result<(Vec<Contribution>, Vec<String>), PayloadError>;

/// Fingerprint recorded while the file cannot be read, so the error is logged once.
const UNREADABLE: (Option<SystemTime>, u64, u64) = (None, u64::MAX, 0);

/// Watch `path`, polling every `interval`, reading it with `read`, until `shutdown`.
pub async fn run(
    path: PathBuf,
    interval: Duration,
    publisher: Publisher,
    read: Reader,
    shutdown: CancellationToken,
) {
    let mut last: Option<(Option<SystemTime>, u64, u64)> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let body = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                if last != Some(UNREADABLE) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read apps file; keeping the last good table");
                    publisher.metrics().sync_error("file_read");
                }
                last = Some(UNREADABLE);
                publisher.metrics().set_connected(false);
                continue;
            }
        };
        let mtime = tokio::fs::metadata(&path)
            .await
            .ok()
            .and_then(|m| m.modified().ok());
        let fingerprint = (mtime, body.len() as u64, crate::model::stable_hash(&body));
        publisher.metrics().set_connected(true);
        if last == Some(fingerprint) {
            continue;
        }
        publisher.metrics().last_event_ms.set(unix_ms_now() as i64);
        last = Some(fingerprint);
        match publish(&publisher, read, body).await {
            Ok(()) => tracing::debug!(path = %path.display(), "apps file read"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "apps file unusable; keeping the last good table");
                publisher.metrics().sync_error("file_payload");
            }
        }
    }
}

/// Replace every contribution with what `body` holds.
async fn publish(publisher: &Publisher, read: Reader, body: Vec<u8>) -> Result<(), SourceError> {
    publisher
        .blocking(move |p| {
            let (contribs, bad) = read(&body, p.hosts())?;
            p.skipped(bad);
            p.replace_contributions(contribs, unix_ms_now());
            p.metrics().last_resync_ms.set(unix_ms_now() as i64);
            Ok(())
        })
        .await?
}
