//! One agent per VIP link: an exclusive `flock(2)` on `/run/l4lb/<link>.<netns>.lock`, held
//! for the life of the [`super::Netif`]. A second agent on the same link (in the same network
//! namespace; the inode of the namespace is in the name, links being per namespace) would
//! remove the first one's addresses and clear the link on exit; it is refused at start
//! instead. The kernel drops the lock when the holder dies, so a SIGKILLed agent never
//! leaves a stale one (only its file, which the next agent takes). A clean release unlinks
//! the file while still holding the lock; a taker checks that the file it locked is still
//! the one at the path, and retries if not.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::NetifError;

/// Where the lock files live.
pub const LOCK_DIR: &str = "/run/l4lb";

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub(super) struct LinkLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl LinkLock {
    /// Take the lock of `link` in the calling thread's network namespace, or say who holds it.
    pub(super) fn acquire(dir: &Path, link: &str) -> Result<Self, NetifError> {
        let denied = |op: String| NetifError::PermissionDenied { op };
        let io = |op: String, e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                denied(op)
            } else {
                NetifError::Lock { op, source: e }
            }
        };
        // /proc/self names the process's main thread; a thread that entered another namespace
        // (tests do) must ask about itself.
        let ns = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(|e| io("reading the network namespace".into(), e))?
            .ino();
        std::fs::create_dir_all(dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(format!("{link}.{ns}.lock"));
        // The holder unlinks the file when it lets go, so a lock taken on a file that is no
        // longer the one at `path` (unlinked, or replaced by a newer one) is worthless: retry.
        let mut file = loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io(format!("opening {}", path.display()), e))?;
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    return Err(NetifError::Busy {
                        link: link.to_string(),
                        holder: holder.trim().to_string(),
                        lock: path,
                    });
                }
                Err((_, e)) => {
                    return Err(io(
                        format!("locking {}", path.display()),
                        std::io::Error::from(e),
                    ));
                }
            };
            let held = file
                .metadata()
                .map_err(|e| io(format!("reading {}", path.display()), e))?;
            match std::fs::metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => break file,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("reading {}", path.display()), e)),
            }
        };
        // Who holds it, for the next one's error message.
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "cannot write the PID into the lock");
        }
        Ok(LinkLock { _file: file, path })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LinkLock {
    /// Unlink the file while still holding the lock (the lock goes with the field, after
    /// this), so lock files do not pile up; `acquire` copes with one unlinked under it.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = LinkLock::acquire(dir.path(), "vip9").unwrap();
        match LinkLock::acquire(dir.path(), "vip9") {
            Err(NetifError::Busy { link, holder, lock }) => {
                assert_eq!(link, "vip9");
                assert_eq!(holder, std::process::id().to_string());
                assert_eq!(lock, first.path());
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        // Another link is another lock.
        let _other = LinkLock::acquire(dir.path(), "vip8").unwrap();
        let path = first.path().to_path_buf();
        drop(first);
        assert!(!path.exists(), "the lock file goes with the lock");
        let again = LinkLock::acquire(dir.path(), "vip9").expect("released on drop");
        assert!(path.exists());
        drop(again);
    }

    #[test]
    fn a_lock_on_a_file_unlinked_under_it_is_retaken_on_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = LinkLock::acquire(dir.path(), "vip7").unwrap();
        // As if the holder let go between another's open and its flock: the file that
        // other one opened is unlinked, and a third took the path.
        let stale = File::open(first.path()).unwrap();
        let path = first.path().to_path_buf();
        drop(first);
        let third = LinkLock::acquire(dir.path(), "vip7").unwrap();
        let stale = Flock::lock(stale, FlockArg::LockExclusiveNonblock)
            .expect("the unlinked file's lock is free");
        // The stale lock does not count: the path's file is locked by `third`.
        assert!(matches!(
            LinkLock::acquire(dir.path(), "vip7"),
            Err(NetifError::Busy { .. })
        ));
        drop(stale);
        assert_eq!(third.path(), path);
    }
}
