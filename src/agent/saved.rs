//! The last applied table on disk, `<state dir>/<link>.<netns>.table.json`, so a restarted
//! agent serves at once, even while every controller is down: the first table from its
//! source replaces it. Written at most once every [`SAVE_EVERY`] after a change (a temporary
//! file, then a rename, so a reader never sees half a table); removed on a clean stop, since
//! a stopped agent serves nothing and its successor should not either until told. A table
//! older than [`MAX_AGE`], larger than the answer cap or unreadable is ignored, with a
//! warning. The format is the controller's full delta (`model::wire`), with the save time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::VipTable;
use crate::model::delta_in::Delta;
use crate::model::unix_ms_now;
use crate::model::wire::FullDelta;

/// Changes within this are saved once, as of the last.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);
/// A saved table older than this is not served: its backends are likely gone.
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Why a saved table is not used.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is {size} bytes, over the {max}-byte answer cap", path.display())]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("not a saved table: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("saved {age_s} s ago, more than {} s", MAX_AGE.as_secs())]
    TooOld { age_s: u64 },
}

/// What is on disk, as written: the table serialised from itself, one VIP at a time.
#[derive(Serialize)]
struct Saving<'a> {
    saved_at_ms: u64,
    table: FullDelta<'a>,
}

/// What is on disk, as read: the table parsed straight into model types.
#[derive(Deserialize)]
struct Saved {
    saved_at_ms: u64,
    table: Delta,
}

/// `table` as saved at `now_ms`.
pub fn encode(table: &VipTable, now_ms: u64) -> Vec<u8> {
    let saving = Saving {
        saved_at_ms: now_ms,
        table: FullDelta(table),
    };
    // String keys only: serializing it cannot fail.
    serde_json::to_vec(&saving).unwrap_or_default()
}

/// The table saved in `bytes`, if it is one and younger than [`MAX_AGE`] at `now_ms`.
pub fn decode(bytes: &[u8], now_ms: u64) -> Result<VipTable, SavedError> {
    let saved: Saved = serde_json::from_slice(bytes)?;
    let age_ms = now_ms.saturating_sub(saved.saved_at_ms);
    if age_ms > MAX_AGE.as_millis() as u64 {
        return Err(SavedError::TooOld {
            age_s: age_ms / 1000,
        });
    }
    Ok(saved.table.apply(&VipTable::default()))
}

/// The saved table of one agent (one link in one network namespace).
#[derive(Debug, Clone)]
pub struct SavedTable {
    path: PathBuf,
    max_size: u64,
}

impl SavedTable {
    /// The file of `link` in the calling thread's network namespace, under `dir`; a saved
    /// table larger than `max_size` is not read.
    pub fn at(dir: &Path, link: &str, max_size: u64) -> Result<SavedTable, SavedError> {
        let ns = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(|source| SavedError::Io {
                path: PathBuf::from("/proc/thread-self/ns/net"),
                source,
            })?
            .ino();
        Ok(SavedTable {
            path: dir.join(format!("{link}.{ns}.table.json")),
            max_size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved table, `None` when there is none.
    pub fn load(&self) -> Result<Option<VipTable>, SavedError> {
        let io = |source| SavedError::Io {
            path: self.path.clone(),
            source,
        };
        let size = match std::fs::metadata(&self.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        if size > self.max_size {
            return Err(SavedError::TooLarge {
                path: self.path.clone(),
                size,
                max: self.max_size,
            });
        }
        let bytes = std::fs::read(&self.path).map_err(io)?;
        decode(&bytes, unix_ms_now()).map(Some)
    }

    /// Write `table` (atomically).
    pub fn save(&self, table: &VipTable) -> Result<(), SavedError> {
        let io = |source| SavedError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("json.new");
        // Streamed to the file: never the whole JSON in memory beside the table.
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let saving = Saving {
            saved_at_ms: unix_ms_now(),
            table: FullDelta(table),
        };
        serde_json::to_writer(&mut w, &saving).map_err(|e| io(e.into()))?;
        std::io::Write::flush(&mut w).map_err(io)?;
        drop(w);
        std::fs::rename(&tmp, &self.path).map_err(io)
    }

    /// Remove the file (absent is fine).
    pub fn remove(&self) -> Result<(), SavedError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SavedError::Io {
                path: self.path.clone(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Save every applied table (at most once every [`SAVE_EVERY`]) until `shutdown`, then
    /// remove the file, unless `handed` is set by then (a successor serves and saves it).
    pub async fn keep(
        self,
        mut applied: watch::Receiver<Arc<VipTable>>,
        shutdown: CancellationToken,
        handed: crate::agent::handoff::HandedOver,
    ) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = applied.changed() => if r.is_err() { break },
            }
            // Let a burst of changes settle; the last one is saved.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(SAVE_EVERY) => {}
            }
            let table = applied.borrow_and_update().clone();
            if table.version == 0 {
                continue;
            }
            let me = self.clone();
            let saved = tokio::task::spawn_blocking(move || me.save(&table))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match saved {
                Ok(()) => {
                    tracing::debug!(path = %self.path.display(), "table saved");
                    failing = false;
                }
                // Said once per run of failures (a read-only state dir fails on every change).
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "cannot save the table; a restart waits for the source");
                    failing = true;
                }
                Err(e) => tracing::debug!(error = %e, "cannot save the table"),
            }
        }
        if handed.is_set() {
            return;
        }
        match self.remove() {
            Ok(()) => tracing::debug!(path = %self.path.display(), "saved table removed"),
            Err(e) => tracing::warn!(error = %e, "cannot remove the saved table"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        AppTasks, Backend, BackendState, Protocol, TaskRecord, Vip, VipKey, VipName,
    };
    use std::collections::BTreeMap;

    fn table() -> VipTable {
        let key = VipKey {
            ip: "198.18.5.5".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let mut t = VipTable::new(
            7,
            [Vip {
                key,
                name: Some(VipName {
                    label: "web".into(),
                    framework: "marathon".into(),
                }),
                backends: vec![Backend {
                    addr: "198.18.0.2:31000".parse().unwrap(),
                    state: BackendState::Active,
                    app: "/web".into(),
                    task: "web.1".into(),
                }],
            }],
        );
        let tasks = AppTasks {
            name: "web".into(),
            framework: "marathon".into(),
            tasks: vec![TaskRecord {
                id: "web.1".into(),
                host: Some("198.18.0.2".parse().unwrap()),
                container: Vec::new(),
                ports: Vec::new(),
            }],
        };
        t.apps = BTreeMap::from([("/web".to_string(), Arc::new(tasks))]);
        t
    }

    #[test]
    fn round_trip_keeps_vips_apps_and_version() {
        let t = table();
        let back = decode(&encode(&t, 1_000), 2_000).unwrap();
        assert_eq!(back.version, t.version);
        assert_eq!(back.vips, t.vips);
        assert_eq!(back.apps, t.apps);
    }

    #[test]
    fn refuses_old_and_garbage() {
        let t = table();
        let day = MAX_AGE.as_millis() as u64;
        assert!(decode(&encode(&t, 1_000), 1_000 + day).is_ok());
        assert!(matches!(
            decode(&encode(&t, 1_000), 2_000 + day),
            Err(SavedError::TooOld { .. })
        ));
        for bad in [&b""[..], b"{", b"[]", b"{\"saved_at_ms\": 1}", b"\xff\xfe"] {
            assert!(
                matches!(decode(bad, 1), Err(SavedError::Parse(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn saves_loads_refuses_oversize_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let s = SavedTable::at(dir.path(), "minuteman", 1 << 20).unwrap();
        assert!(s.load().unwrap().is_none());
        s.save(&table()).unwrap();
        assert_eq!(s.load().unwrap().unwrap().vips, table().vips);
        let small = SavedTable {
            max_size: 10,
            ..s.clone()
        };
        assert!(matches!(small.load(), Err(SavedError::TooLarge { .. })));
        s.remove().unwrap();
        s.remove().unwrap();
        assert!(s.load().unwrap().is_none());
    }
}
