//! TCP forwarding: one accept loop per VIP, and per connection a backend pick with
//! transparent retry, then zero-copy `splice(2)` through a pipe per direction (a plain copy
//! where the kernel refuses splice), half-close honoured.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, SpliceFFlags, splice};
use prometheus_client::metrics::counter::Counter;
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::balancer::Failure;
use super::state::{BackendShared, VipShared};

/// Bytes asked of one splice call; a default pipe holds 64 KiB.
const CHUNK: usize = 1 << 16;

/// Bind a listening socket on a VIP address (SO_REUSEADDR, so a VIP removed and re-added
/// right away binds again).
pub(super) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Accept clients on one VIP until `stop` is cancelled; the listener closes on return.
pub(super) async fn accept_loop(
    ctx: Arc<Ctx>,
    vip: Arc<VipShared>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of descriptors or memory: back off a little rather than spin. Other
                // errors (a client that gave up in the backlog) concern one connection only.
                let exhausted = matches!(
                    e.raw_os_error().map(Errno::from_raw),
                    Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
                );
                if exhausted {
                    tracing::warn!(vip = %vip.key, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                } else {
                    tracing::debug!(vip = %vip.key, error = %e, "accept failed");
                }
                continue;
            }
        };
        ctx.metrics.connections.inc();
        let Ok(permit) = Arc::clone(&ctx.permits).try_acquire_owned() else {
            ctx.metrics.connections_refused.inc();
            tracing::debug!(vip = %vip.key, "connection refused: at --max-connections");
            drop(client);
            continue;
        };
        let (c, v) = (Arc::clone(&ctx), Arc::clone(&vip));
        ctx.tracker.spawn(async move {
            handle(&c, &v, client).await;
            drop(permit);
        });
    }
}

/// Counts a backend's open connection (including a connect in flight) while alive.
struct ActiveGuard(Arc<BackendShared>);

impl ActiveGuard {
    fn new(b: Arc<BackendShared>) -> Self {
        b.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(b)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn tune(s: &TcpStream) {
    let sock = SockRef::from(s);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    if let Err(e) = sock
        .set_tcp_keepalive(&ka)
        .and_then(|()| s.set_nodelay(true))
    {
        tracing::debug!(error = %e, "cannot set keepalive/nodelay");
    }
}

async fn handle(ctx: &Ctx, vip: &VipShared, client: TcpStream) {
    tune(&client);
    let Some((guard, upstream)) = connect_upstream(ctx, vip).await else {
        ctx.metrics.connections_no_backend.inc();
        return;
    };
    ctx.metrics.connections_active.inc();
    let backend = Arc::clone(&guard.0);
    let kill = backend.kill_token();
    let idle = ctx.cfg.tcp_idle_timeout;
    let activity = Activity::new();
    let work = async {
        tokio::try_join!(
            pump(
                ctx,
                &client,
                &upstream,
                &backend,
                &ctx.metrics.bytes_c2b,
                &activity
            ),
            pump(
                ctx,
                &upstream,
                &client,
                &backend,
                &ctx.metrics.bytes_b2c,
                &activity
            ),
        )
    };
    tokio::select! {
        r = work => if let Err(e) = r {
            tracing::debug!(backend = %backend.addr, error = %e, "connection ended with error");
        },
        () = kill.cancelled() => {
            tracing::debug!(backend = %backend.addr, "connection closed: drain timeout or shutdown");
        }
        () = activity.idle(idle) => {
            tracing::debug!(backend = %backend.addr, "connection closed: idle");
        }
    }
    ctx.metrics.connections_active.dec();
    drop(guard);
}

/// Pick and connect, retrying on other backends. `None` when no backend could be reached.
async fn connect_upstream(ctx: &Ctx, vip: &VipShared) -> Option<(ActiveGuard, TcpStream)> {
    let set = vip.set.load_full();
    let mut tried: Vec<SocketAddr> = Vec::new();
    for attempt in 0..=ctx.cfg.connect_retries {
        let backend = {
            let mut rng = rand::rng();
            set.choose(&tried, Instant::now(), &mut rng)
        };
        let Some(backend) = backend else {
            tracing::debug!(vip = %vip.key, tried = tried.len(), "no backend left to try");
            return None;
        };
        if attempt > 0 {
            ctx.metrics.connections_retried.inc();
        }
        tried.push(backend.addr);
        let guard = ActiveGuard::new(Arc::clone(&backend));
        let failure =
            match tokio::time::timeout(ctx.cfg.connect_timeout, TcpStream::connect(backend.addr))
                .await
            {
                Ok(Ok(s)) => {
                    backend.record_success();
                    tune(&s);
                    return Some((guard, s));
                }
                Ok(Err(e)) => {
                    tracing::debug!(backend = %backend.addr, error = %e, "connect failed");
                    if e.kind() == io::ErrorKind::ConnectionRefused {
                        Failure::Refused
                    } else {
                        Failure::Other
                    }
                }
                Err(_) => {
                    tracing::debug!(backend = %backend.addr, "connect timed out");
                    Failure::Other
                }
            };
        backend.record_failure(Instant::now(), failure);
    }
    None
}

/// Last time bytes moved on a connection, for the idle timeout.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`; never without a timeout.
    async fn idle(&self, idle: Option<Duration>) {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let deadline =
                self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A pipe for splice, both ends non-blocking.
#[derive(Debug)]
pub(super) struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// Empty pipes kept for reuse, so a connection does not cost two `pipe2` calls.
#[derive(Debug)]
pub(super) struct PipePool {
    pipes: Mutex<Vec<Pipe>>,
    max: usize,
}

impl PipePool {
    pub(super) fn new(max: usize) -> Self {
        PipePool {
            pipes: Mutex::new(Vec::new()),
            max,
        }
    }

    fn take(&self) -> io::Result<Pipe> {
        if let Some(p) = self
            .pipes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { r, w })
    }

    /// Return a pipe that is known to be empty.
    fn put(&self, p: Pipe) {
        let mut pipes = self.pipes.lock().unwrap_or_else(PoisonError::into_inner);
        if pipes.len() < self.max {
            pipes.push(p);
        }
    }
}

enum SpliceEnd {
    Io(io::Error),
    /// The kernel refused splice here; `pending` bytes are still in the pipe.
    Unsupported {
        pending: usize,
    },
}

impl From<io::Error> for SpliceEnd {
    fn from(e: io::Error) -> Self {
        SpliceEnd::Io(e)
    }
}

fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)
}

/// Move bytes `from` → `to` until EOF, then shut down `to`'s write side (half-close).
async fn pump(
    ctx: &Ctx,
    from: &TcpStream,
    to: &TcpStream,
    backend: &BackendShared,
    dir: &Counter,
    activity: &Activity,
) -> io::Result<()> {
    let count = |n: usize| {
        backend.add_bytes(n as u64);
        dir.inc_by(n as u64);
        activity.touch();
    };
    let pipe = if ctx.splice {
        ctx.pipes.take()
    } else {
        Err(io::Error::other("splice disabled"))
    };
    match pipe {
        Ok(pipe) => match splice_loop(from, to, &pipe, &count).await {
            Ok(()) => ctx.pipes.put(pipe),
            Err(SpliceEnd::Io(e)) => return Err(e),
            Err(SpliceEnd::Unsupported { pending }) => {
                tracing::debug!("splice refused; copying instead");
                let mut buf = vec![0u8; pending];
                let mut got = 0;
                while got < pending {
                    match nix::unistd::read(&pipe.r, &mut buf[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return Err(e.into()),
                    }
                }
                write_all(to, &buf[..got]).await?;
                count(got);
                copy_loop(from, to, &count).await?;
            }
        },
        Err(e) => {
            tracing::debug!(error = %e, "no pipe for splice; copying instead");
            copy_loop(from, to, &count).await?;
        }
    }
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

async fn splice_loop(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    count: &impl Fn(usize),
) -> Result<(), SpliceEnd> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        // Fill the (empty) pipe from the source socket.
        let n = loop {
            from.readable().await?;
            let r = from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.w, None, CHUNK, flags).map_err(io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    return Err(match e.raw_os_error().map(Errno::from_raw) {
                        Some(errno) if unsupported(errno) => SpliceEnd::Unsupported { pending: 0 },
                        _ => SpliceEnd::Io(e),
                    });
                }
            }
        };
        if n == 0 {
            return Ok(());
        }
        // Drain the pipe into the destination socket.
        let mut pending = n;
        while pending > 0 {
            to.writable().await?;
            let r = to.try_io(Interest::WRITABLE, || {
                splice(&pipe.r, None, to, None, pending, flags).map_err(io::Error::from)
            });
            match r {
                Ok(m) => {
                    pending -= m;
                    count(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    return Err(match e.raw_os_error().map(Errno::from_raw) {
                        Some(errno) if unsupported(errno) => SpliceEnd::Unsupported { pending },
                        _ => SpliceEnd::Io(e),
                    });
                }
            }
        }
    }
}

async fn copy_loop(from: &TcpStream, to: &TcpStream, count: &impl Fn(usize)) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(());
        }
        write_all(to, &buf[..n]).await?;
        count(n);
    }
}

async fn write_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
