//! The UDP shell: one socket per VIP bound to the VIP address (so replies leave from it); per
//! client session a connected upstream socket to one backend and a task relaying its replies
//! back through the VIP socket. Drives the pure [`FlowTable`].
//!
//! Sessions to a backend that leaves the table are dropped at once; sessions to a backend
//! that turns draining continue until idle. A refused send or receive (ICMP port
//! unreachable) ends the session and counts against the backend's health.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::flows::FlowTable;
use crate::agent::forward::balancer::Failure;
use crate::agent::forward::state::{BackendShared, VipShared};
use crate::agent::forward::{Ctx, with_scratch};

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_536;
/// Datagrams read per wake-up of a VIP socket beyond the first.
const BATCH: usize = 63;

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
    /// Bind the VIP's socket. Must run inside a tokio runtime.
    pub(crate) fn bind(ctx: Arc<Ctx>, vip: Arc<VipShared>) -> io::Result<Self> {
        let socket = Arc::new(bind_socket(vip.key.socket_addr(), true)?);
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

    /// Relay client datagrams until `stop` is cancelled; then every session closes.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
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
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, client)) => {
                        self.on_datagram(&buf[..n], client);
                        // Take what else is queued without another trip through the reactor.
                        for _ in 0..BATCH {
                            match self.socket.try_recv_from(&mut buf) {
                                Ok((n, client)) => self.on_datagram(&buf[..n], client),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => {
                        // ICMP errors for earlier replies surface here; nothing to do.
                        tracing::debug!(vip = %self.vip.key, error = %e, "UDP recv");
                    }
                },
            }
        }
        self.drop_all();
    }

    fn on_datagram(&self, data: &[u8], client: SocketAddr) {
        self.ctx.metrics.udp_c2b.inc();
        let now = Instant::now();
        // Up to two tries: a session whose backend turned out dead is replaced once.
        for _ in 0..2 {
            let existing = lock(&self.flows)
                .touch(client, now)
                .map(|s| (Arc::clone(&s.data.upstream), Arc::clone(&s.data.backend)));
            let (up, backend) = match existing {
                Some(x) => x,
                None => match self.new_session(client, now) {
                    Some(x) => x,
                    None => return,
                },
            };
            // Straight to the non-blocking socket: a fresh tokio socket has no cached write
            // readiness yet, so `try_send` would refuse the first datagram.
            match socket2::SockRef::from(&*up).send(data) {
                Ok(n) => {
                    backend.add_bytes(n as u64);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    backend.record_failure(now, Failure::Refused);
                    remove_if_same(&self.flows, client, &up);
                }
                Err(e) => {
                    // Full buffers and the like: drop this datagram, as UDP may.
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
            tracing::debug!(vip = %self.vip.key, "UDP session refused: at --max-udp-sessions");
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
        let replies = tokio::spawn(relay_replies(
            Arc::clone(&self.ctx),
            Arc::clone(&up),
            Arc::clone(&self.socket),
            client,
            Arc::downgrade(&self.flows),
            Arc::clone(&backend),
        ));
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
    loop {
        // Through the thread's scratch buffer: an idle session holds no 64 KiB of its own.
        let r = match up.readable().await {
            Ok(()) => with_scratch(|buf| {
                let n = up.try_recv(buf)?;
                if let Err(e) =
                    socket2::SockRef::from(&*vip_socket).send_to(&buf[..n], &client.into())
                {
                    tracing::debug!(%client, error = %e, "UDP reply dropped");
                }
                Ok(n)
            }),
            Err(e) => Err(e),
        };
        match r {
            Ok(n) => {
                ctx.metrics.udp_b2c.inc();
                backend.add_bytes(n as u64);
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
