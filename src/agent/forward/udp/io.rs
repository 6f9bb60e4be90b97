//! The UDP shell: one socket per VIP bound to the VIP address (so replies leave from it); per
//! client session a connected upstream socket to one backend and a task relaying its replies
//! back through the VIP socket. Drives the pure [`FlowTable`].
//!
//! Both directions move datagrams in batches ([`super::batch`]): one `recvmmsg` takes what
//! is queued, and the datagrams of one session go on in one `sendmmsg`.
//!
//! Sessions to a backend that leaves the table are dropped at once; sessions to a backend
//! that turns draining continue until idle. A refused send or receive (ICMP port
//! unreachable) ends the session and counts against the backend's health.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, SLOTS, with_batch};
use super::flows::FlowTable;
use tracing::Instrument;

use crate::agent::forward::Ctx;
use crate::agent::forward::balancer::Failure;
use crate::agent::forward::state::{BackendShared, VipShared};

/// Full batches taken from a VIP socket per wake-up before yielding to other tasks.
const ROUNDS: usize = 4;

/// Datagrams of one batch bound for one session (indices into the batch, in order).
struct Group {
    client: SocketAddr,
    up: Arc<UdpSocket>,
    backend: Arc<BackendShared>,
    which: [usize; SLOTS],
    len: usize,
}

impl Group {
    fn which(&self) -> &[usize] {
        &self.which[..self.len]
    }
}

/// The I/O half of one session; dropping it closes the session.
#[derive(Debug)]
pub(crate) struct SessionIo {
    upstream: Arc<UdpSocket>,
    backend: Arc<BackendShared>,
    replies: JoinHandle<()>,
    ctx: Arc<Ctx>,
    _permit: OwnedSemaphorePermit,
}

impl SessionIo {
    fn new(
        upstream: Arc<UdpSocket>,
        backend: Arc<BackendShared>,
        replies: JoinHandle<()>,
        ctx: Arc<Ctx>,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        backend.active.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.udp_sessions_active.inc();
        SessionIo {
            upstream,
            backend,
            replies,
            ctx,
            _permit: permit,
        }
    }
}

impl Drop for SessionIo {
    fn drop(&mut self) {
        self.replies.abort();
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
        self.ctx.metrics.udp_sessions_active.dec();
    }
}

type Flows = Mutex<FlowTable<SessionIo>>;

fn lock(f: &Flows) -> MutexGuard<'_, FlowTable<SessionIo>> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One UDP VIP.
#[derive(Debug)]
pub(crate) struct UdpVip {
    ctx: Arc<Ctx>,
    vip: Arc<VipShared>,
    socket: Arc<UdpSocket>,
    flows: Arc<Flows>,
}

fn bind_socket(addr: SocketAddr, reuse: bool) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if reuse {
        sock.set_reuse_address(true)?;
        // Absorb bursts on the shared VIP socket; the kernel may clamp this, which is fine.
        let _ = sock.set_recv_buffer_size(4 << 20);
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

impl UdpVip {
    /// Bind the VIP's socket, or serve `inherited` (a predecessor's, already bound to the
    /// VIP). Must run inside a tokio runtime.
    pub(crate) fn bind(
        ctx: Arc<Ctx>,
        vip: Arc<VipShared>,
        inherited: Option<std::net::UdpSocket>,
    ) -> io::Result<Self> {
        let socket = match inherited {
            Some(s) => UdpSocket::from_std(s)?,
            None => bind_socket(vip.key.socket_addr(), true)?,
        };
        let socket = Arc::new(socket);
        let flows = Arc::new(Mutex::new(FlowTable::new(
            ctx.cfg.udp_idle_timeout,
            ctx.cfg.max_udp_sessions,
        )));
        Ok(UdpVip {
            ctx,
            vip,
            socket,
            flows,
        })
    }

    /// Drop every session to these backends at once (they left the table); the clients' next
    /// datagrams pick live backends.
    pub(crate) fn drop_backends(&self, removed: &[Arc<BackendShared>]) {
        let mut gone = Vec::new();
        {
            let mut f = lock(&self.flows);
            for b in removed {
                gone.extend(f.remove_backend(b.addr));
            }
        }
        drop(gone);
    }

    pub(crate) fn drop_all(&self) {
        let gone = lock(&self.flows).drain_all();
        drop(gone);
    }

    /// The VIP socket, to offer a successor.
    pub(crate) fn socket(&self) -> Arc<UdpSocket> {
        Arc::clone(&self.socket)
    }

    /// Relay client datagrams until `stop` is cancelled; then every session closes (after a
    /// hand-over, once idle: their replies still come back through this socket, while the
    /// successor reads what clients send).
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.ctx.cfg.udp_idle_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = sweep.tick() => {
                    let gone = lock(&self.flows).expire(Instant::now());
                    drop(gone);
                }
                r = self.socket.readable() => match r {
                    Ok(()) => self.drain(),
                    Err(e) => tracing::debug!(error = %e, "UDP readiness"),
                },
            }
        }
        if self.ctx.handing_over.load(Ordering::SeqCst) {
            self.linger(&mut sweep).await;
        }
        self.drop_all();
    }

    /// Keep the sessions until each has been idle for the idle timeout, or the shutdown
    /// grace ends.
    async fn linger(&self, sweep: &mut tokio::time::Interval) {
        while !lock(&self.flows).is_empty() {
            tokio::select! {
                () = self.ctx.hard_kill.cancelled() => return,
                _ = sweep.tick() => {
                    let gone = lock(&self.flows).expire(Instant::now());
                    drop(gone);
                }
            }
        }
    }

    /// Forward what the VIP socket has queued, a batch at a time, up to [`ROUNDS`] batches.
    fn drain(&self) {
        let fd = self.socket.as_raw_fd();
        for _ in 0..ROUNDS {
            let r = self.socket.try_io(Interest::READABLE, || {
                with_batch(|b| {
                    let n = b.recv(fd)?;
                    self.forward(b);
                    Ok(n)
                })
            });
            match r {
                Ok(SLOTS) => continue,
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors for earlier replies surface here; nothing to do.
                Err(e) => {
                    tracing::debug!(error = %e, "UDP recv");
                    break;
                }
            }
        }
    }

    /// Send one received batch on: per session, its datagrams in one `sendmmsg`.
    fn forward(&self, b: &mut Batch) {
        let now = Instant::now();
        // One allocation per batch (not per datagram or per session).
        let mut groups: Vec<Group> = Vec::with_capacity(b.len());
        for i in 0..b.len() {
            self.ctx.metrics.udp_c2b.inc();
            let Some(client) = b.datagram(i).1 else {
                continue;
            };
            if let Some(g) = groups.iter_mut().find(|g| g.client == client) {
                // A batch holds at most SLOTS datagrams, so `len` stays in bounds.
                g.which[g.len] = i;
                g.len += 1;
                continue;
            }
            let Some((up, backend)) = self.session(client, now) else {
                continue;
            };
            let mut which = [0; SLOTS];
            which[0] = i;
            groups.push(Group {
                client,
                up,
                backend,
                which,
                len: 1,
            });
        }
        for g in groups {
            match b.send(g.up.as_raw_fd(), g.which(), None) {
                Ok(sent) => {
                    let bytes: usize = g.which()[..sent].iter().map(|&i| b.bytes(i)).sum();
                    g.backend.add_bytes(bytes as u64);
                    self.ctx.metrics.udp_bytes_c2b.inc_by(bytes as u64);
                    if sent < g.len {
                        tracing::debug!(backend = %g.backend.addr, dropped = g.len - sent, "UDP send buffer full");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // The backend is gone (ICMP port unreachable): one more try each, on a
                    // session with a fresh pick.
                    g.backend.record_failure(now, Failure::Refused);
                    remove_if_same(&self.flows, g.client, &g.up);
                    for &i in g.which() {
                        self.send_one(b.datagram(i).0, g.client, now);
                    }
                }
                Err(e) => {
                    // Full buffers and the like: drop these datagrams, as UDP may.
                    tracing::debug!(backend = %g.backend.addr, error = %e, "UDP send");
                }
            }
        }
    }

    /// The live session of `client`, or a new one.
    fn session(
        &self,
        client: SocketAddr,
        now: Instant,
    ) -> Option<(Arc<UdpSocket>, Arc<BackendShared>)> {
        let existing = lock(&self.flows)
            .touch(client, now)
            .map(|s| (Arc::clone(&s.data.upstream), Arc::clone(&s.data.backend)));
        existing.or_else(|| self.new_session(client, now))
    }

    /// One datagram, with one more try on a fresh session if its backend refuses.
    fn send_one(&self, data: &[u8], client: SocketAddr, now: Instant) {
        for _ in 0..2 {
            let Some((up, backend)) = self.session(client, now) else {
                return;
            };
            // Straight to the non-blocking socket: a fresh tokio socket has no cached write
            // readiness yet, so `try_send` would refuse the first datagram.
            match socket2::SockRef::from(&*up).send(data) {
                Ok(n) => {
                    backend.add_bytes(n as u64);
                    self.ctx.metrics.udp_bytes_c2b.inc_by(n as u64);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    backend.record_failure(now, Failure::Refused);
                    remove_if_same(&self.flows, client, &up);
                }
                Err(e) => {
                    tracing::debug!(backend = %backend.addr, error = %e, "UDP send");
                    return;
                }
            }
        }
    }

    fn new_session(
        &self,
        client: SocketAddr,
        now: Instant,
    ) -> Option<(Arc<UdpSocket>, Arc<BackendShared>)> {
        // An expired session of this client goes first, so it does not hold a permit.
        let stale = lock(&self.flows).remove(client);
        drop(stale);
        let set = self.vip.set.load();
        let backend = {
            let mut rng = rand::rng();
            set.choose(&[], now, &mut rng)
        };
        let Some(backend) = backend else {
            self.ctx.metrics.udp_sessions_refused.inc();
            return None;
        };
        let Ok(permit) = Arc::clone(&self.ctx.udp_permits).try_acquire_owned() else {
            self.ctx.metrics.udp_sessions_refused.inc();
            tracing::debug!("UDP session refused: at --max-udp-sessions");
            return None;
        };
        let up = match connect_upstream(backend.addr) {
            Ok(up) => Arc::new(up),
            Err(e) => {
                // Out of descriptors or the like: this host's fault, not the backend's.
                let kind = crate::agent::forward::tcp::local_kind(&e).unwrap_or("socket");
                self.ctx.metrics.local_error(kind);
                tracing::debug!(backend = %backend.addr, error = %e, "UDP upstream socket");
                return None;
            }
        };
        let replies = tokio::spawn(
            relay_replies(
                Arc::clone(&self.ctx),
                Arc::clone(&up),
                Arc::clone(&self.socket),
                client,
                Arc::downgrade(&self.flows),
                Arc::clone(&backend),
            )
            .in_current_span(),
        );
        let io = SessionIo::new(
            Arc::clone(&up),
            Arc::clone(&backend),
            replies,
            Arc::clone(&self.ctx),
            permit,
        );
        let replaced = lock(&self.flows).insert(client, backend.addr, io, now);
        match replaced {
            Ok(old) => {
                drop(old);
                Some((up, backend))
            }
            Err((_, io)) => {
                drop(io);
                self.ctx.metrics.udp_sessions_refused.inc();
                None
            }
        }
    }
}

fn connect_upstream(backend: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if backend.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = bind_socket(local, false)?;
    socket2::SockRef::from(&sock).connect(&backend.into())?;
    Ok(sock)
}

/// Remove `client`'s session if it is still the one using `up`.
fn remove_if_same(flows: &Flows, client: SocketAddr, up: &Arc<UdpSocket>) {
    let gone = {
        let mut f = lock(flows);
        let same = f
            .get(client, Instant::now())
            .is_some_and(|s| Arc::ptr_eq(&s.data.upstream, up));
        if same { f.remove(client) } else { None }
    };
    drop(gone);
}

async fn relay_replies(
    ctx: Arc<Ctx>,
    up: Arc<UdpSocket>,
    vip_socket: Arc<UdpSocket>,
    client: SocketAddr,
    flows: Weak<Flows>,
    backend: Arc<BackendShared>,
) {
    let vip_fd = vip_socket.as_raw_fd();
    loop {
        // Through the thread's batch buffers: an idle session holds none of its own.
        let r = match up.readable().await {
            Ok(()) => up.try_io(Interest::READABLE, || {
                with_batch(|b| {
                    let n = b.recv(up.as_raw_fd())?;
                    let bytes: usize = (0..n).map(|i| b.bytes(i)).sum();
                    match b.send_all(vip_fd, Some(client)) {
                        Ok(sent) if sent < n => {
                            tracing::debug!(%client, dropped = n - sent, "UDP replies dropped");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(%client, error = %e, "UDP replies dropped"),
                    }
                    Ok((n, bytes))
                })
            }),
            Err(e) => Err(e),
        };
        match r {
            Ok((n, bytes)) => {
                ctx.metrics.udp_b2c.inc_by(n as u64);
                ctx.metrics.udp_bytes_b2c.inc_by(bytes as u64);
                backend.add_bytes(bytes as u64);
                let Some(flows) = flows.upgrade() else { return };
                lock(&flows).touch(client, Instant::now());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    backend.record_failure(Instant::now(), Failure::Refused);
                } else {
                    tracing::debug!(backend = %backend.addr, error = %e, "UDP upstream recv");
                }
                // End the session; the client's next datagram picks a backend afresh. This
                // drops our own JoinHandle (aborting this task at its next await: we return).
                if let Some(flows) = flows.upgrade() {
                    remove_if_same(&flows, client, &up);
                }
                return;
            }
        }
    }
}
