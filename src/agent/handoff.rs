//! Handing a running agent's sockets to its successor (`--take-over`), as Envoy's hot restart
//! and HAProxy's `-x` do: nothing is closed and rebound, so no connection or query meets a
//! closed port.
//!
//! The running agent listens on a unix `SOCK_SEQPACKET` socket in the state directory
//! (`<link>.<netns>.handoff.sock`, mode 0600, peers of another uid refused). A successor
//! connects and receives [`Offer`](Msg::Offer) messages: a small versioned JSON manifest of
//! names (`dns-udp 198.51.100.1:53`, `tcp 198.18.5.5:80`, `lock /run/l4lb/vip.1.lock`), each
//! with its descriptor passed by `SCM_RIGHTS` (at most [`FDS_PER_MESSAGE`] per message, each
//! message at most [`MAX_MESSAGE`] bytes). It serves from them ([`Sockets::take_tcp`] and
//! friends, used by the forwarder, DNS and the API before binding anew), applies its table,
//! then sends [`Ready`](Msg::Ready): the old agent stops accepting, finishes what is open and
//! exits without removing anything ([`HandedOver`]).
//!
//! [`Sockets`] is both sides' book: what this agent serves (offered to a successor) and what
//! it inherited (taken once). Depends on nothing else in the crate.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// The protocol's version; a peer speaking another is refused with a clear error.
pub const VERSION: u32 = 1;

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Descriptors per message, under the kernel's `SCM_MAX_FD` (253).
pub const FDS_PER_MESSAGE: usize = 200;

/// How long a successor may take from the offer to [`Msg::Ready`] (loading the kernel path
/// and applying a large table included) before the old agent stops waiting and serves on.
const READY_WITHIN: Duration = Duration::from_secs(120);

/// How long the successor waits for the whole offer.
const OFFER_WITHIN: Duration = Duration::from_secs(10);

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no running agent to take over at {}: {source}", path.display())]
    NoPeer { path: PathBuf, source: io::Error },
    #[error("the peer speaks hand-over version {0}, this agent version {VERSION}")]
    Version(u32),
    #[error("bad hand-over message: {0}")]
    Bad(String),
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("the peer closed the hand-over socket {0}")]
    Closed(&'static str),
    #[error("the peer did not finish {0} in time")]
    Timeout(&'static str),
}

/// What a socket is for; the first word of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    DnsUdp,
    DnsTcp,
    Api,
    Tcp,
    Udp,
    /// The link lock's file (its `flock` belongs to the open file, so the successor holds
    /// the lock the moment it has the descriptor).
    Lock,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::DnsUdp,
        Kind::DnsTcp,
        Kind::Api,
        Kind::Tcp,
        Kind::Udp,
        Kind::Lock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::DnsUdp => "dns-udp",
            Kind::DnsTcp => "dns-tcp",
            Kind::Api => "api",
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
            Kind::Lock => "lock",
        }
    }

    fn socket_type(self) -> Option<socket2::Type> {
        match self {
            Kind::DnsUdp | Kind::Udp => Some(socket2::Type::DGRAM),
            Kind::DnsTcp | Kind::Api | Kind::Tcp => Some(socket2::Type::STREAM),
            Kind::Lock => None,
        }
    }
}

/// One entry of the manifest: `<kind> <address or path>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name {
    pub kind: Kind,
    pub at: String,
}

impl Name {
    pub fn socket(kind: Kind, addr: SocketAddr) -> Self {
        Name {
            kind,
            at: addr.to_string(),
        }
    }

    fn addr(&self) -> Option<SocketAddr> {
        self.at.parse().ok()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.at)
    }
}

impl std::str::FromStr for Name {
    type Err = HandoffError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HandoffError::Bad(format!("socket name {s:?}"));
        let (kind, at) = s.split_once(' ').ok_or_else(bad)?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(bad)?;
        let name = Name {
            kind,
            at: at.to_string(),
        };
        if kind != Kind::Lock && name.addr().is_none() {
            return Err(bad());
        }
        Ok(name)
    }
}

/// The messages, one per `SOCK_SEQPACKET` datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum Msg {
    /// Old → new: `names[i]` names the i-th descriptor passed with this message; `last`
    /// ends the offer.
    Offer {
        version: u32,
        pid: u32,
        names: Vec<String>,
        last: bool,
    },
    /// New → old: serving from the inherited sockets; stop accepting.
    Ready { version: u32, pid: u32 },
    /// Either way: will not go on, and why.
    Refused { version: u32, reason: String },
}

impl Msg {
    fn version(&self) -> u32 {
        match self {
            Msg::Offer { version, .. }
            | Msg::Ready { version, .. }
            | Msg::Refused { version, .. } => *version,
        }
    }
}

/// Set once this agent has handed over: its stop then removes no address, anchor, program,
/// pin, saved table or lock file (the successor serves them).
#[derive(Debug, Clone, Default)]
pub struct HandedOver(Arc<AtomicBool>);

impl HandedOver {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A socket held for a successor: shared with the part serving it, so the book costs no
/// descriptor of its own.
type Held = Arc<dyn AsFd + Send + Sync>;

#[derive(Default)]
struct Book {
    /// What this agent serves, offered to a successor.
    offered: BTreeMap<Name, Held>,
    /// What a predecessor passed and nothing has taken yet.
    inherited: Vec<(Name, OwnedFd)>,
}

impl fmt::Debug for Book {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Book")
            .field("offered", &self.offered.keys().collect::<Vec<_>>())
            .field("inherited", &self.inherited)
            .finish()
    }
}

/// The sockets this agent serves and those it inherited. Cheap to clone (one book).
#[derive(Debug, Clone, Default)]
pub struct Sockets(Arc<Mutex<Book>>);

impl Sockets {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn inherited(entries: Vec<(Name, OwnedFd)>) -> Self {
        let s = Sockets::default();
        s.book().inherited = entries;
        s
    }

    /// Offer a duplicate of `fd` to a successor under `name`, until [`Sockets::withdraw`]
    /// (for the few sockets whose owner does not share them: DNS, the API, the lock).
    pub fn offer(&self, name: Name, fd: BorrowedFd<'_>) {
        match fd.try_clone_to_owned() {
            Ok(dup) => self.offer_shared(name, Arc::new(dup)),
            Err(e) => tracing::warn!(%name, error = %e, "cannot keep the socket for a successor"),
        }
    }

    /// Offer `socket` (shared with whoever serves it) under `name`, until
    /// [`Sockets::withdraw`].
    pub fn offer_shared(&self, name: Name, socket: Held) {
        self.book().offered.insert(name, socket);
    }

    /// Stop offering `name`: its socket is closing, and the book must not keep it open.
    pub fn withdraw(&self, name: &Name) {
        self.book().offered.remove(name);
    }

    /// Offer nothing any more (stopping: every socket must close with its server).
    pub fn withdraw_all(&self) {
        self.book().offered.clear();
    }

    /// Everything offered, for one offer.
    fn snapshot(&self) -> Vec<(Name, Held)> {
        self.book()
            .offered
            .iter()
            .map(|(n, fd)| (n.clone(), Arc::clone(fd)))
            .collect()
    }

    /// What a successor would inherit from this book (the hand-over without the socket).
    #[cfg(test)]
    pub(crate) fn passed_on(&self) -> Sockets {
        let dups = self.snapshot().into_iter().map(|(n, fd)| {
            let dup = fd.as_fd().try_clone_to_owned().expect("dup");
            (n, dup)
        });
        Sockets::inherited(dups.collect())
    }

    /// Take the inherited socket of `kind` bound to `want` (with port 0, any port of its IP:
    /// the predecessor's pick), checking it is of the right type and address.
    pub fn take(&self, kind: Kind, want: SocketAddr) -> Option<(SocketAddr, OwnedFd)> {
        let mut book = self.book();
        let i = book.inherited.iter().position(|(n, _)| {
            n.kind == kind
                && n.addr()
                    .is_some_and(|a| a == want || (want.port() == 0 && a.ip() == want.ip()))
        })?;
        let (name, fd) = book.inherited.swap_remove(i);
        drop(book);
        let sock = socket2::SockRef::from(&fd);
        let addr = sock.local_addr().ok().and_then(|a| a.as_socket());
        let ty = sock.r#type().ok();
        if addr != name.addr() || ty != kind.socket_type() {
            tracing::warn!(%name, ?addr, "inherited socket is not what its name says; binding anew");
            return None;
        }
        if let Err(e) = sock.set_nonblocking(true) {
            tracing::warn!(%name, error = %e, "inherited socket unusable; binding anew");
            return None;
        }
        tracing::debug!(%name, "serving from the inherited socket");
        addr.map(|a| (a, fd))
    }

    /// [`Sockets::take`] as a listener.
    pub fn take_tcp(&self, kind: Kind, want: SocketAddr) -> Option<std::net::TcpListener> {
        self.take(kind, want).map(|(_, fd)| fd.into())
    }

    /// [`Sockets::take`] as a UDP socket.
    pub fn take_udp(&self, kind: Kind, want: SocketAddr) -> Option<std::net::UdpSocket> {
        self.take(kind, want).map(|(_, fd)| fd.into())
    }

    /// Take the inherited lock file of `path`, if passed.
    pub fn take_lock(&self, path: &Path) -> Option<std::fs::File> {
        let mut book = self.book();
        let at = path.display().to_string();
        let i = book
            .inherited
            .iter()
            .position(|(n, _)| n.kind == Kind::Lock && n.at == at)?;
        Some(book.inherited.swap_remove(i).1.into())
    }

    /// Close every inherited socket nothing took (a VIP the predecessor served that this
    /// agent does not); returns their names.
    pub fn drop_unclaimed(&self) -> Vec<String> {
        let left = std::mem::take(&mut self.book().inherited);
        left.into_iter().map(|(n, _)| n.to_string()).collect()
    }

    /// How many inherited sockets are not taken yet.
    pub fn unclaimed(&self) -> usize {
        self.book().inherited.len()
    }
}

/// The hand-over socket of link `link` in the calling thread's network namespace.
pub fn socket_path(state_dir: &Path, link: &str) -> io::Result<PathBuf> {
    let ns = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    Ok(state_dir.join(format!("{link}.{ns}.handoff.sock")))
}

/// One `SOCK_SEQPACKET` connection, non-blocking under tokio.
struct Conn(AsyncFd<OwnedFd>);

impl Conn {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Conn(register(fd)?))
    }

    async fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| HandoffError::Bad(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE || fds.len() > FDS_PER_MESSAGE {
            return Err(HandoffError::Bad(format!(
                "{} bytes and {} descriptors: over the limit",
                bytes.len(),
                fds.len()
            )));
        }
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        loop {
            let mut guard = self.0.writable().await.map_err(sock_err("waiting on"))?;
            let sent = guard.try_io(|fd| {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("control buffer too small"));
                }
                rustix::net::sendmsg(
                    fd.get_ref(),
                    &[IoSlice::new(&bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(r) => return r.map(|_| ()).map_err(sock_err("sending on")),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message and its descriptors; `None` when the peer closed.
    async fn recv(&self) -> Result<Option<(Msg, Vec<OwnedFd>)>, HandoffError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let (n, flags, fds) = loop {
            let mut guard = self.0.readable().await.map_err(sock_err("waiting on"))?;
            let got = guard.try_io(|fd| {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let r = rustix::net::recvmsg(
                    fd.get_ref(),
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(passed) = m {
                        fds.extend(passed);
                    }
                }
                Ok((r.bytes, r.flags, fds))
            });
            match got {
                Ok(r) => break r.map_err(sock_err("receiving on"))?,
                Err(_would_block) => continue,
            }
        };
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        if flags.contains(ReturnFlags::TRUNC) {
            return Err(HandoffError::Bad(format!(
                "a message over {MAX_MESSAGE} bytes"
            )));
        }
        if flags.contains(ReturnFlags::CTRUNC) {
            return Err(HandoffError::Bad(format!(
                "more than {FDS_PER_MESSAGE} descriptors in one message"
            )));
        }
        let msg: Msg = serde_json::from_slice(&buf[..n])
            .map_err(|e| HandoffError::Bad(format!("not a hand-over message: {e}")))?;
        if msg.version() != VERSION {
            return Err(HandoffError::Version(msg.version()));
        }
        Ok(Some((msg, fds)))
    }
}

fn sock_err(op: &'static str) -> impl Fn(io::Error) -> HandoffError {
    move |source| HandoffError::Io {
        op,
        path: PathBuf::from("the hand-over connection"),
        source,
    }
}

/// Register `fd` with tokio. `AsyncFd::new` is deprecated because a type whose descriptor can
/// change or close behind the registration is unsound with it (tokio#8587); an `OwnedFd`
/// owns its descriptor until dropped, which is what `AsyncFd::register`'s unsafe contract
/// asks, so the safe call is kept here rather than writing `unsafe`.
#[allow(deprecated)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd)
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

/// Whether the peer of `fd` may take this agent's sockets: root, or our own user.
fn peer_allowed(fd: BorrowedFd<'_>) -> Result<(), HandoffError> {
    let cred = rustix::net::sockopt::socket_peercred(fd).map_err(|e| HandoffError::Io {
        op: "reading the peer of",
        path: PathBuf::from("the hand-over connection"),
        source: e.into(),
    })?;
    let me = rustix::process::geteuid();
    if cred.uid.is_root() || cred.uid == me {
        Ok(())
    } else {
        Err(HandoffError::Refused(format!(
            "peer pid {} runs as uid {}, not root or uid {}",
            cred.pid.as_raw_nonzero(),
            cred.uid.as_raw(),
            me.as_raw()
        )))
    }
}

/// The running agent's end: waits for a successor.
#[derive(Debug)]
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    ino: u64,
}

impl Listener {
    /// Listen at `path` (replacing any file there: the caller holds the link's lock, so no
    /// other agent of this link is listening).
    pub fn bind(path: &Path) -> Result<Self, HandoffError> {
        let io = |op| {
            let path = path.to_path_buf();
            move |source| HandoffError::Io { op, path, source }
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io("removing")(e)),
            _ => {}
        }
        let fd = seqpacket().map_err(io("creating a socket for"))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| io("naming")(e.into()))?;
        rustix::net::bind(&fd, &addr).map_err(|e| io("binding")(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("restricting"))?;
        rustix::net::listen(&fd, 4).map_err(|e| io("listening on")(e.into()))?;
        let ino = std::fs::metadata(path).map_err(io("reading"))?.ino();
        let fd = register(fd).map_err(io("registering"))?;
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
            ino,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.fd.readable().await?;
            let r = guard.try_io(|fd| {
                Ok(rustix::net::accept_with(
                    fd.get_ref(),
                    SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                )?)
            });
            if let Ok(r) = r {
                return r;
            }
        }
    }

    /// Serve successors until one is ready (its pid is returned) or `stop`. `prepare` runs
    /// before each offer (the caller saves its table there, for the successor to load). A
    /// successor that fails or goes away changes nothing: this agent serves on.
    pub async fn serve(
        &self,
        sockets: &Sockets,
        mut prepare: impl FnMut(),
        stop: &CancellationToken,
    ) -> Option<u32> {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => return None,
                c = self.accept() => c,
            };
            let conn = match conn.and_then(Conn::new) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "hand-over accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let outcome = tokio::select! {
                _ = stop.cancelled() => return None,
                r = self.hand_over(&conn, sockets, &mut prepare) => r,
            };
            match outcome {
                Ok(pid) => return Some(pid),
                Err(e) => tracing::warn!(error = %e, "take-over attempt failed; still serving"),
            }
        }
    }

    async fn hand_over(
        &self,
        conn: &Conn,
        sockets: &Sockets,
        prepare: &mut impl FnMut(),
    ) -> Result<u32, HandoffError> {
        if let Err(e) = peer_allowed(conn.0.get_ref().as_fd()) {
            let reason = e.to_string();
            let _ = conn
                .send(
                    &Msg::Refused {
                        version: VERSION,
                        reason,
                    },
                    &[],
                )
                .await;
            return Err(e);
        }
        prepare();
        let entries = sockets.snapshot();
        tracing::info!(
            sockets = entries.len(),
            "a successor asks to take over; offering"
        );
        let pid = std::process::id();
        let mut chunks = entries.chunks(FDS_PER_MESSAGE).peekable();
        if chunks.peek().is_none() {
            let offer = Msg::Offer {
                version: VERSION,
                pid,
                names: Vec::new(),
                last: true,
            };
            conn.send(&offer, &[]).await?;
        }
        while let Some(chunk) = chunks.next() {
            let offer = Msg::Offer {
                version: VERSION,
                pid,
                names: chunk.iter().map(|(n, _)| n.to_string()).collect(),
                last: chunks.peek().is_none(),
            };
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
            conn.send(&offer, &fds).await?;
        }
        drop(entries);
        match tokio::time::timeout(READY_WITHIN, conn.recv()).await {
            Err(_) => Err(HandoffError::Timeout("its start")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) => Err(HandoffError::Closed("before it was ready")),
            Ok(Ok(Some((Msg::Ready { pid, .. }, _)))) => Ok(pid),
            Ok(Ok(Some((Msg::Refused { reason, .. }, _)))) => Err(HandoffError::Refused(reason)),
            Ok(Ok(Some((other, _)))) => Err(HandoffError::Bad(format!("unexpected {other:?}"))),
        }
    }
}

impl Drop for Listener {
    /// Remove the socket file, unless a successor has bound its own there.
    fn drop(&mut self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The successor's end: the inherited sockets came; [`Successor::ready`] ends the hand-over.
#[derive(Debug)]
pub struct Successor {
    conn: ConnBox,
    /// The predecessor's pid.
    pub predecessor: u32,
}

/// [`Conn`] behind a `Debug` that shows nothing of it.
struct ConnBox(Conn);

impl fmt::Debug for ConnBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Conn")
    }
}

impl Successor {
    /// Tell the predecessor this agent serves: it stops accepting and drains.
    pub async fn ready(self) -> Result<(), HandoffError> {
        let msg = Msg::Ready {
            version: VERSION,
            pid: std::process::id(),
        };
        self.conn.0.send(&msg, &[]).await
    }

    /// Give up (the predecessor serves on).
    pub async fn refuse(self, reason: String) {
        let msg = Msg::Refused {
            version: VERSION,
            reason,
        };
        let _ = self.conn.0.send(&msg, &[]).await;
    }
}

/// Connect to the running agent at `path` and receive its sockets.
pub async fn take_over(path: &Path) -> Result<(Sockets, Successor), HandoffError> {
    let fd = seqpacket().map_err(|source| HandoffError::Io {
        op: "creating a socket for",
        path: path.to_path_buf(),
        source,
    })?;
    let addr = SocketAddrUnix::new(path).map_err(|e| HandoffError::NoPeer {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    // A unix connect completes at once (or fails with EAGAIN when the backlog is full).
    rustix::net::connect(&fd, &addr).map_err(|e| HandoffError::NoPeer {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let conn = Conn::new(fd).map_err(sock_err("registering"))?;
    peer_allowed(conn.0.get_ref().as_fd())?;
    let (entries, predecessor) = tokio::time::timeout(OFFER_WITHIN, receive_offer(&conn))
        .await
        .map_err(|_| HandoffError::Timeout("its offer"))??;
    Ok((
        Sockets::inherited(entries),
        Successor {
            conn: ConnBox(conn),
            predecessor,
        },
    ))
}

async fn receive_offer(conn: &Conn) -> Result<(Vec<(Name, OwnedFd)>, u32), HandoffError> {
    let mut entries = Vec::new();
    loop {
        match conn.recv().await? {
            None => return Err(HandoffError::Closed("during its offer")),
            Some((
                Msg::Offer {
                    pid, names, last, ..
                },
                fds,
            )) => {
                if names.len() != fds.len() {
                    return Err(HandoffError::Bad(format!(
                        "{} names for {} descriptors",
                        names.len(),
                        fds.len()
                    )));
                }
                for (n, fd) in names.iter().zip(fds) {
                    entries.push((n.parse()?, fd));
                }
                if last {
                    return Ok((entries, pid));
                }
            }
            Some((Msg::Refused { reason, .. }, _)) => return Err(HandoffError::Refused(reason)),
            Some((other, _)) => {
                return Err(HandoffError::Bad(format!("unexpected {other:?}")));
            }
        }
    }
}

#[cfg(test)]
mod tests;
