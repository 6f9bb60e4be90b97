//! One agent per VIP link: an exclusive `flock(2)` on `/run/l4lb/<link>.<netns>.lock`, held
//! for the life of the [`super::Netif`]. A second agent on the same link (in the same network
//! namespace; the inode of the namespace is in the name, links being per namespace) would
//! remove the first one's addresses and clear the link on exit; it is refused at start
//! instead. The kernel drops the lock when the holder dies, so a SIGKILLed agent never
//! leaves a stale one (only its file, which the next agent takes). A clean release unlinks
//! the file while still holding the lock; a taker checks that the file it locked is still
//! the one at the path, and retries if not. A successor (`--take-over`) is passed the open
//! file ([`LinkLock::adopt`]): the lock belongs to the open file, so it holds the lock at
//! once, and the predecessor lets go without unlinking ([`LinkLock::hand_over`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd};
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
    /// `None` only once handed over and dropped.
    file: Option<Flock<File>>,
    path: PathBuf,
    /// A successor holds the same lock: leave the file.
    handed_over: bool,
}

/// The lock file of `link` in the calling thread's network namespace.
pub(super) fn lock_path(dir: &Path, link: &str) -> std::io::Result<PathBuf> {
    // /proc/self names the process's main thread; a thread that entered another namespace
    // (tests do) must ask about itself.
    let ns = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    Ok(dir.join(format!("{link}.{ns}.lock")))
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
        let path =
            lock_path(dir, link).map_err(|e| io("reading the network namespace".into(), e))?;
        std::fs::create_dir_all(dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
        // The holder unlinks the file when it lets go, so a lock taken on a file that is no
        // longer the one at `path` (unlinked, or replaced by a newer one) is worthless: retry.
        let file = loop {
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
        Ok(LinkLock::holding(file, path))
    }

    /// Hold the lock of `link` through `file`, the open lock file a predecessor passed on:
    /// it must be the file at the lock's path, and its lock must be the predecessor's (a
    /// lock that another open file holds is refused as [`NetifError::Busy`]).
    pub(super) fn adopt(dir: &Path, link: &str, file: File) -> Result<Self, NetifError> {
        let err = |op: String, source| NetifError::Lock { op, source };
        let path =
            lock_path(dir, link).map_err(|e| err("reading the network namespace".into(), e))?;
        let held = file
            .metadata()
            .map_err(|e| err("reading the inherited lock".into(), e))?;
        let now =
            std::fs::metadata(&path).map_err(|e| err(format!("reading {}", path.display()), e))?;
        if now.ino() != held.ino() || now.dev() != held.dev() {
            return Err(err(
                format!("adopting {}", path.display()),
                std::io::Error::other("the inherited lock is not the file at the path"),
            ));
        }
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => Ok(LinkLock::holding(f, path)),
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                Err(NetifError::Busy {
                    link: link.to_string(),
                    holder: holder.trim().to_string(),
                    lock: path,
                })
            }
            Err((_, e)) => Err(err(format!("locking {}", path.display()), e.into())),
        }
    }

    /// Write our PID into the held lock (who holds it, for the next one's error message).
    fn holding(mut file: Flock<File>, path: PathBuf) -> Self {
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "cannot write the PID into the lock");
        }
        LinkLock {
            file: Some(file),
            path,
            handed_over: false,
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The open lock file, to pass to a successor.
    pub(super) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd())
    }

    /// A successor holds the lock now (through the same open file): keep the file on drop.
    pub(super) fn hand_over(&mut self) {
        self.handed_over = true;
    }
}

impl Drop for LinkLock {
    /// Unlink the file while still holding the lock (the lock goes with the field, after
    /// this), so lock files do not pile up; `acquire` copes with one unlinked under it.
    fn drop(&mut self) {
        if self.handed_over {
            // Dropping the `Flock` would unlock the open file the successor shares: leave
            // the descriptor to the process's exit instead.
            std::mem::forget(self.file.take());
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
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
    fn a_successor_adopts_the_passed_lock_and_the_predecessor_leaves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = LinkLock::acquire(dir.path(), "vip6").unwrap();
        // A file opened anew is another open file: its lock is refused.
        let other = File::open(old.path()).unwrap();
        assert!(matches!(
            LinkLock::adopt(dir.path(), "vip6", other),
            Err(NetifError::Busy { .. })
        ));
        let passed = File::from(old.fd().unwrap().try_clone_to_owned().unwrap());
        let new = LinkLock::adopt(dir.path(), "vip6", passed).expect("the same open file");
        old.hand_over();
        drop(old);
        assert!(new.path().exists(), "the successor's lock file stays");
        assert!(matches!(
            LinkLock::acquire(dir.path(), "vip6"),
            Err(NetifError::Busy { .. })
        ));
        drop(new);
        assert!(LinkLock::acquire(dir.path(), "vip6").is_ok());
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
