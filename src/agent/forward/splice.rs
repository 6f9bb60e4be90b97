//! Zero-copy moving of bytes between two sockets with `splice(2)` through a pipe, and the
//! bounded pool those pipes come from. A connection leases a pipe only while bytes are in
//! flight, so idle connections hold none. No `unsafe`: `splice` comes from nix. Knows
//! nothing of VIPs, backends or counters; `tcp` decides when to splice and counts.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe size asked with `F_SETPIPE_SZ`; the kernel default (64 KiB) if refused. Pages are
/// only allocated while bytes sit in the pipe, so an empty pooled pipe costs little. 256
/// KiB × the pool's 256 pipes is the default per-user pipe budget (`pipe-user-pages-soft`,
/// past which an unprivileged process only gets tiny pipes); on loopback 1 MiB measured no
/// faster.
const PIPE_SIZE: usize = 256 << 10;

/// A pipe for splice, both ends non-blocking.
#[derive(Debug)]
pub(super) struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Capacity: bytes asked of one splice into it.
    cap: usize,
}

/// Empty pipes kept for reuse, so moving a burst of bytes does not cost a `pipe2`. A
/// connection leases a pipe only while bytes are in flight ([`PipePool::lease`]).
#[derive(Debug)]
pub(super) struct PipePool {
    pipes: Mutex<Vec<Pipe>>,
    /// Empty pipes kept at most.
    max: usize,
    /// Pipes leased right now.
    leased: AtomicUsize,
    /// Test switch: splice out of the pipe fails with EINVAL.
    #[cfg(test)]
    pub(super) refuse_out: bool,
}

impl PipePool {
    pub(super) fn new(max: usize) -> Self {
        PipePool {
            pipes: Mutex::new(Vec::new()),
            max,
            leased: AtomicUsize::new(0),
            #[cfg(test)]
            refuse_out: false,
        }
    }

    /// A pipe, empty; back to the pool on drop unless marked dirty.
    fn lease(&self) -> io::Result<Lease<'_>> {
        let pooled = self
            .pipes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let pipe = match pooled {
            Some(p) => p,
            None => {
                let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
                // Larger pipes move more per splice call; keep the default if refused
                // (over /proc/sys/fs/pipe-max-size or the per-user pipe budget).
                let cap = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
                    .ok()
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(1 << 16);
                Pipe { r, w, cap }
            }
        };
        self.leased.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            pool: self,
            pipe: Some(pipe),
            dirty: false,
        })
    }

    /// Pipes leased right now.
    #[cfg(test)]
    pub(super) fn leased(&self) -> usize {
        self.leased.load(Ordering::Relaxed)
    }

    /// Empty pipes held for reuse.
    #[cfg(test)]
    pub(super) fn pooled(&self) -> usize {
        self.pipes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A pipe taken from a [`PipePool`]. Dropped clean it goes back to the pool (if the pool is
/// not full); dropped dirty (bytes may be left in it) it is closed.
struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    dirty: bool,
}

impl Lease<'_> {
    fn pipe(&self) -> &Pipe {
        // Only `drop` takes it out.
        self.pipe.as_ref().expect("leased pipe")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.leased.fetch_sub(1, Ordering::Relaxed);
        if self.dirty {
            return;
        }
        if let Some(p) = self.pipe.take() {
            let mut pipes = self
                .pool
                .pipes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if pipes.len() < self.pool.max {
                pipes.push(p);
            }
        }
    }
}

pub(super) enum SpliceEnd {
    Io(io::Error),
    /// The kernel refused splice here; these bytes were in the pipe and are still to be
    /// written (the caller copies them and every byte after).
    Unsupported(Vec<u8>),
    /// No pipe could be had (out of descriptors); this round copies instead.
    NoPipe,
}

impl From<io::Error> for SpliceEnd {
    fn from(e: io::Error) -> Self {
        SpliceEnd::Io(e)
    }
}

fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)
}

fn splice_error(e: io::Error) -> Result<(), io::Error> {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(errno) if unsupported(errno) => Ok(()),
        _ => Err(e),
    }
}

/// Splice what `from` has (up to a pipe's capacity) to `to`, leasing a pipe only once
/// `from` is readable and returning it empty. Returns the bytes moved; 0 at EOF.
pub(super) async fn splice_once(
    pipes: &PipePool,
    from: &TcpStream,
    to: &TcpStream,
    count: &impl Fn(usize),
) -> Result<usize, SpliceEnd> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let (mut lease, n) = loop {
        from.readable().await?;
        let lease = pipes.lease().map_err(|e| {
            tracing::debug!(error = %e, "no pipe for splice; copying");
            SpliceEnd::NoPipe
        })?;
        let pipe = lease.pipe();
        let r = from.try_io(Interest::READABLE, || {
            splice(from, None, &pipe.w, None, pipe.cap, flags).map_err(io::Error::from)
        });
        match r {
            Ok(n) => break (lease, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                return Err(splice_error(e)
                    .map_or_else(SpliceEnd::Io, |()| SpliceEnd::Unsupported(Vec::new())));
            }
        }
    };
    // From here until the pipe is drained, bytes may sit in it.
    lease.dirty = true;
    let mut pending = n;
    while pending > 0 {
        to.writable().await?;
        let pipe = lease.pipe();
        let r = to.try_io(Interest::WRITABLE, || {
            #[cfg(test)]
            if pipes.refuse_out {
                return Err(io::Error::from(Errno::EINVAL));
            }
            splice(&pipe.r, None, to, None, pending, flags).map_err(io::Error::from)
        });
        match r {
            Ok(m) => {
                pending -= m;
                count(m);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                splice_error(e)?;
                // Splice refused on the way out: copy the rest out of the pipe.
                let mut buf = vec![0u8; pending];
                let mut got = 0;
                while got < pending {
                    match nix::unistd::read(&lease.pipe().r, &mut buf[got..]) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) => return Err(SpliceEnd::Io(e.into())),
                    }
                }
                buf.truncate(got);
                return Err(SpliceEnd::Unsupported(buf));
            }
        }
    }
    lease.dirty = false;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_are_enlarged_pooled_when_clean_and_closed_when_dirty() {
        let pool = PipePool::new(1);
        {
            let l = pool.lease().unwrap();
            let p = l.pipe();
            let size = fcntl(&p.w, FcntlArg::F_GETPIPE_SZ).unwrap() as usize;
            assert_eq!(p.cap, size);
            // Unprivileged and over the per-user budget, the kernel may refuse to enlarge.
            assert!(size >= 1 << 16, "{size}");
            assert_eq!(pool.leased(), 1);
        }
        assert_eq!((pool.pooled(), pool.leased()), (1, 0));
        {
            let mut l = pool.lease().unwrap();
            assert_eq!((pool.pooled(), pool.leased()), (0, 1));
            l.dirty = true;
        }
        assert_eq!(
            (pool.pooled(), pool.leased()),
            (0, 0),
            "dirty pipes are not reused"
        );
        let (a, b) = (pool.lease().unwrap(), pool.lease().unwrap());
        drop((a, b));
        assert_eq!(pool.pooled(), 1, "the pool stays bounded");
    }
}
