//! TCP forwarding: one accept loop per VIP, and per connection a backend pick with
//! transparent retry, then bytes moved in each direction, half-close honoured.
//!
//! A direction starts by copying through a per-thread scratch buffer, so short
//! request/response traffic never touches a pipe; once a read fills [`AUTO_SPLICE`] bytes the
//! direction switches to zero-copy `splice(2)` (HAProxy's splice-auto, in [`super::splice`]),
//! taking a pipe from the pool only while bytes are in flight: an idle connection holds its two sockets and
//! nothing else. Where the kernel refuses splice, the direction keeps copying.
//!
//! Errors of this host (out of descriptors, memory or local ports) never count against a
//! backend: the client is closed and `l4lb_local_errors_total{kind}` counts them.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use prometheus_client::metrics::counter::Counter;
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::balancer::Failure;
use super::splice::{SpliceEnd, splice_once};
use super::state::{BackendShared, VipShared};
use super::{Ctx, SCRATCH, with_scratch};

/// A direction whose read fills this many bytes switches from copying to splice.
const AUTO_SPLICE: usize = 16 * 1024;
/// Listen backlog asked for; the kernel caps it at `net.core.somaxconn`. A burst of connects
/// must wait in the queue, not have its SYNs dropped: 1024 lost 1–2 of 9,350 connections
/// opened at once in `scripts/bench.sh`, where HAProxy and nginx lost none.
const LISTEN_BACKLOG: i32 = 65_535;
/// How long the accept loop sleeps when the host is out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// Keepalive and `TCP_NODELAY` on one socket. On a listener, Linux copies them to every
/// accepted socket, so only upstream sockets pay these syscalls per connection.
fn tune(sock: SockRef<'_>) -> io::Result<()> {
    sock.set_tcp_keepalive(&keepalive())?;
    sock.set_tcp_nodelay(true)
}

/// Bind a listening socket on a VIP address (SO_REUSEADDR, so a VIP removed and re-added
/// right away binds again), with the options accepted sockets inherit.
pub(super) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    tune(SockRef::from(&sock))?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(sock.into())
}

/// The `kind` label of an error that is this host's fault, not a backend's: out of
/// descriptors, memory or local addresses/ports.
pub(crate) fn local_kind(e: &io::Error) -> Option<&'static str> {
    match e.raw_os_error().map(Errno::from_raw)? {
        Errno::EMFILE => Some("emfile"),
        Errno::ENFILE => Some("enfile"),
        Errno::ENOBUFS => Some("enobufs"),
        Errno::ENOMEM => Some("enomem"),
        Errno::EADDRNOTAVAIL => Some("eaddrnotavail"),
        _ => None,
    }
}

/// How one connect attempt to a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnectError {
    /// This host could not make the connection (the `kind` label): the backend is not to
    /// blame and another backend would fail the same way.
    Local(&'static str),
    /// The backend (or the path to it) failed.
    Backend(Failure),
}

impl ConnectError {
    /// Classify an error of `socket()` (`creating`) or of `connect()`.
    pub(super) fn classify(e: &io::Error, creating: bool) -> Self {
        if let Some(kind) = local_kind(e) {
            ConnectError::Local(kind)
        } else if creating {
            ConnectError::Local("socket")
        } else if e.kind() == io::ErrorKind::ConnectionRefused {
            ConnectError::Backend(Failure::Refused)
        } else {
            ConnectError::Backend(Failure::Other)
        }
    }
}

/// Accept clients on one VIP until `stop` is cancelled; the listener closes on return.
pub(super) async fn accept_loop(
    ctx: Arc<Ctx>,
    vip: Arc<VipShared>,
    listener: Arc<TcpListener>,
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
                // Out of descriptors or memory: the connection stays in the backlog and the
                // listener stays readable, so back off a little rather than spin. Other
                // errors (a client that gave up in the backlog) concern one connection only.
                if let Some(kind) = local_kind(&e) {
                    ctx.metrics.local_error(kind);
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                } else {
                    tracing::debug!(error = %e, "accept failed");
                }
                continue;
            }
        };
        ctx.metrics.connections.inc();
        let Ok(permit) = Arc::clone(&ctx.permits).try_acquire_owned() else {
            ctx.metrics.connections_refused.inc();
            tracing::debug!("connection refused: at --max-connections");
            drop(client);
            continue;
        };
        let (c, v) = (Arc::clone(&ctx), Arc::clone(&vip));
        // Counts the connection as the VIP's until it ends: a removed VIP's address stays
        // while any is open.
        let held = vip.conns.token();
        ctx.tracker.spawn(
            async move {
                handle(&c, &v, client).await;
                drop(permit);
                drop(held);
            }
            .in_current_span(),
        );
    }
}

/// Counts a backend's open connection (including a connect in flight) while alive.
pub(super) struct ActiveGuard(Arc<BackendShared>);

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

async fn handle(ctx: &Ctx, vip: &VipShared, client: TcpStream) {
    // Keepalive and TCP_NODELAY come from the listener.
    let (guard, upstream) = match connect_upstream(ctx, vip).await {
        Ok(up) => up,
        Err(Unreached::NoBackend) => {
            ctx.metrics.connections_no_backend.inc();
            vip.series.failed.inc();
            return;
        }
        Err(Unreached::Local(kind)) => {
            ctx.metrics.local_error(kind);
            vip.series.failed.inc();
            return;
        }
    };
    vip.series.ok.inc();
    ctx.metrics.connections_active.inc();
    let backend = Arc::clone(&guard.0);
    let kill = backend.kill_token(&ctx.hard_kill);
    let idle = ctx.cfg.tcp_idle_timeout;
    let activity = Activity::new(idle.is_some());
    let finished = AtomicBool::new(false);
    let work = async {
        tokio::try_join!(
            pump(
                ctx,
                &client,
                &upstream,
                &backend,
                &ctx.metrics.bytes_c2b,
                &activity,
                &finished
            ),
            pump(
                ctx,
                &upstream,
                &client,
                &backend,
                &ctx.metrics.bytes_b2c,
                &activity,
                &finished
            ),
        )
    };
    tokio::select! {
        r = work => if let Err(e) = r {
            tracing::debug!(backend = %backend.addr, error = %e, "connection ended with error");
        },
        () = kill.cancelled() => {
            // Cut mid-stream: reset both ends rather than send a FIN, which would tell the
            // client that a truncated answer was complete, and leave no half-closed socket
            // behind on an address that may leave the interface next.
            for s in [&client, &upstream] {
                if let Err(e) = SockRef::from(s).set_linger(Some(Duration::ZERO)) {
                    tracing::debug!(error = %e, "cannot set SO_LINGER 0");
                }
            }
            tracing::debug!(backend = %backend.addr, "connection reset: drain timeout or shutdown");
        }
        () = activity.idle(idle) => {
            tracing::debug!(backend = %backend.addr, "connection closed: idle");
        }
    }
    ctx.metrics.connections_active.dec();
    drop(guard);
}

/// Why a client connection got no upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unreached {
    /// Every backend tried failed (or there is none).
    NoBackend,
    /// This host could not open a connection (the `kind` label); no backend is blamed.
    Local(&'static str),
}

/// One connect attempt, socket creation included.
///
/// No `tcp-smart-connect` (delaying the handshake's last ACK onto the client's first bytes,
/// read at accept): built and measured side by side, it saved 2–4 µs of ~50 µs of CPU per
/// short connection, within this machine's noise, and it changes how the backend's side of
/// the handshake completes; it was taken out to keep the handshake standard.
async fn connect(addr: SocketAddr) -> Result<TcpStream, ConnectError> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| ConnectError::classify(&e, true))?;
    if let Err(e) = tune(SockRef::from(&sock)) {
        tracing::debug!(error = %e, "cannot set keepalive/nodelay");
    }
    sock.connect(addr)
        .await
        .map_err(|e| ConnectError::classify(&e, false))
}

/// Pick and connect, retrying on other backends after backend failures (not local ones).
pub(super) async fn connect_upstream(
    ctx: &Ctx,
    vip: &VipShared,
) -> Result<(ActiveGuard, TcpStream), Unreached> {
    let set = vip.set.load_full();
    let mut tried: Vec<SocketAddr> = Vec::new();
    for attempt in 0..=ctx.cfg.connect_retries {
        let backend = {
            let mut rng = rand::rng();
            set.choose(&tried, Instant::now(), &mut rng)
        };
        let Some(backend) = backend else {
            tracing::debug!(tried = tried.len(), "no backend left to try");
            return Err(Unreached::NoBackend);
        };
        if attempt > 0 {
            ctx.metrics.connections_retried.inc();
        }
        let guard = ActiveGuard::new(Arc::clone(&backend));
        let started = Instant::now();
        let failure = match tokio::time::timeout(ctx.cfg.connect_timeout, connect(backend.addr))
            .await
        {
            Ok(Ok(s)) => {
                backend.record_success(started.elapsed());
                return Ok((guard, s));
            }
            Ok(Err(ConnectError::Local(kind))) => {
                tracing::warn!(backend = %backend.addr, kind, "cannot connect: local resources exhausted");
                return Err(Unreached::Local(kind));
            }
            Ok(Err(ConnectError::Backend(f))) => {
                tracing::debug!(backend = %backend.addr, failure = ?f, "connect failed");
                f
            }
            Err(_) => {
                tracing::debug!(backend = %backend.addr, "connect timed out");
                Failure::Other
            }
        };
        backend.record_failure(Instant::now(), failure);
        // Only now: the common first-try success allocates nothing.
        tried.push(backend.addr);
    }
    Err(Unreached::NoBackend)
}

/// Last time bytes moved on a connection, for the idle timeout. Without one, nothing is
/// recorded (no clock read per copy).
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    tracked: bool,
}

impl Activity {
    fn new(tracked: bool) -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            tracked,
        }
    }

    fn touch(&self) {
        if self.tracked {
            let ms = self.base.elapsed().as_millis() as u64;
            self.last_ms.store(ms, Ordering::Relaxed);
        }
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

/// Move bytes `from` → `to` until EOF, then shut down `to`'s write side (half-close). The
/// direction that finishes second skips the `shutdown`: both sockets are closed right after,
/// and `close` sends the same FIN.
async fn pump(
    ctx: &Ctx,
    from: &TcpStream,
    to: &TcpStream,
    backend: &BackendShared,
    dir: &Counter,
    activity: &Activity,
    finished: &AtomicBool,
) -> io::Result<()> {
    let count = |n: usize| {
        backend.add_bytes(n as u64);
        dir.inc_by(n as u64);
        activity.touch();
    };
    // Copy until a read fills AUTO_SPLICE bytes, then splice (if allowed and it works).
    let mut may_splice = ctx.splice;
    let mut splicing = false;
    loop {
        if splicing {
            match splice_once(&ctx.pipes, from, to, &count).await {
                Ok(0) => break,
                Ok(_) => continue,
                Err(SpliceEnd::Io(e)) => return Err(e),
                Err(SpliceEnd::Unsupported(left)) => {
                    tracing::debug!("splice refused; copying instead");
                    write_all(to, &left, false).await?;
                    if !left.is_empty() {
                        count(left.len());
                    }
                    (may_splice, splicing) = (false, false);
                    continue;
                }
                // Copy this round; try a pipe again on the next.
                Err(SpliceEnd::NoPipe) => {}
            }
        }
        let limit = if may_splice { AUTO_SPLICE } else { SCRATCH };
        let (n, eof) = copy_once(from, to, limit, &count).await?;
        if eof {
            break;
        }
        splicing = may_splice && n == limit;
    }
    if finished.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// One read of `from` (at most `limit` bytes) copied to `to`. Returns the bytes moved and
/// whether `from` is at EOF. A read that did not fill the buffer is followed by one more
/// (it would be the next loop's read anyway): when that one finds EOF, the bytes go out
/// with `MSG_MORE` so that the FIN that follows rides in the same segment (a response and
/// its close in one packet, not two).
async fn copy_once(
    from: &TcpStream,
    to: &TcpStream,
    limit: usize,
    count: &impl Fn(usize),
) -> io::Result<(usize, bool)> {
    loop {
        from.readable().await?;
        let r = with_scratch(|buf| -> io::Result<Option<Copied>> {
            let buf = &mut buf[..limit.min(SCRATCH)];
            let mut n = match from.try_read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(Some(Copied::default()));
            }
            let (mut eof, mut after) = (false, None);
            if n < buf.len() {
                match from.try_read(&mut buf[n..]) {
                    Ok(0) => eof = true,
                    Ok(m) => n += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Reported once by the kernel: keep it for after these bytes.
                    Err(e) => after = Some(e),
                }
            }
            let w = match send(to, &buf[..n], eof) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            Ok(Some(Copied {
                n,
                rest: buf[w..n].to_vec(),
                eof,
                after,
            }))
        })?;
        let Some(c) = r else { continue };
        write_all(to, &c.rest, c.eof).await?;
        if c.n > 0 {
            count(c.n);
        }
        if let Some(e) = c.after {
            return Err(e);
        }
        return Ok((c.n, c.eof || c.n == 0));
    }
}

/// What one [`copy_once`] round read.
#[derive(Default)]
struct Copied {
    n: usize,
    /// Bytes the first write did not take.
    rest: Vec<u8>,
    /// `from` reached EOF right after these bytes.
    eof: bool,
    /// An error `from` reported right after these bytes.
    after: Option<io::Error>,
}

/// One non-blocking send; `more` holds the bytes back for the FIN that follows.
fn send(to: &TcpStream, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = if more { libc::MSG_MORE } else { 0 };
    to.try_io(Interest::WRITABLE, || {
        SockRef::from(to).send_with_flags(buf, flags)
    })
}

async fn write_all(to: &TcpStream, mut buf: &[u8], more: bool) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match send(to, buf, more) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both legs carry keepalive and `TCP_NODELAY`: the client leg inherits them from the
    /// listener, the backend leg sets them itself.
    #[tokio::test]
    async fn both_legs_keepalive_and_nodelay() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let (up, accepted) = tokio::join!(connect(addr), l.accept());
        let up = up.map_err(|_| "connect").unwrap();
        let (client_leg, _) = accepted.unwrap();
        for (leg, s) in [("backend", &up), ("client", &client_leg)] {
            let r = SockRef::from(s);
            assert!(r.keepalive().unwrap(), "{leg} leg");
            assert_eq!(
                r.tcp_keepalive_time().unwrap(),
                Duration::from_secs(60),
                "{leg} leg"
            );
            assert_eq!(
                r.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(10),
                "{leg} leg"
            );
            assert_eq!(r.tcp_keepalive_retries().unwrap(), 6, "{leg} leg");
            assert!(r.tcp_nodelay().unwrap(), "{leg} leg");
        }
    }
}
