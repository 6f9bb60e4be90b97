//! The VIP interface (DESIGN §7): a dummy link (or, where the kernel has no dummy driver, an
//! empty bridge) that carries every VIP address as a /32 or /128, managed over rtnetlink.
//!
//! Owns the link, the addresses on it and their anchor routes on `lo` (`anchor`: a VIP stays
//! local while someone has flushed its address), and reports the host's other addresses for
//! the IP-VIP safety check (§3). Depends on nothing else in l4lb; the agent calls
//! [`Netif::sync`] with the VIP addresses of each table, and [`Netif::heal`] when [`watch`]
//! sees the link changed behind its back. The reconciliation itself is the pure [`plan`].

mod anchor;
mod lock;
mod plan;
pub mod watch;

pub use anchor::ANCHOR_PROTO;
pub use lock::LOCK_DIR;

pub use plan::{Plan, host_prefix, is_kernel_managed, plan};

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::agent::handoff::{Kind, Name, Sockets};
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use nix::errno::Errno;
use rtnetlink::{AddressMessageBuilder, Handle, LinkBridge, LinkDummy, LinkUnspec};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Which kind of link carries the VIPs (`--interface-kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterfaceKind {
    /// Dummy if the kernel has the driver, else an empty bridge.
    Auto,
    Dummy,
    Bridge,
    /// Install nothing; serve only VIPs that are already local (e.g. in 127.0.0.0/8).
    None,
}

impl InterfaceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InterfaceKind::Auto => "auto",
            InterfaceKind::Dummy => "dummy",
            InterfaceKind::Bridge => "bridge",
            InterfaceKind::None => "none",
        }
    }
}

impl fmt::Display for InterfaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--interface-kind` value that is not `auto`, `dummy`, `bridge` or `none`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown interface kind {0:?} (expected auto, dummy, bridge or none)")]
pub struct UnknownKind(pub String);

impl FromStr for InterfaceKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(InterfaceKind::Auto),
            "dummy" => Ok(InterfaceKind::Dummy),
            "bridge" => Ok(InterfaceKind::Bridge),
            "none" => Ok(InterfaceKind::None),
            _ => Err(UnknownKind(s.to_string())),
        }
    }
}

/// Why an interface operation failed. `main` maps [`NetifError::PermissionDenied`] to exit 2.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    #[error("{op}: permission denied (l4lb needs CAP_NET_ADMIN to manage its VIP interface)")]
    PermissionDenied { op: String },
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("this kernel does not support {0} interfaces")]
    Unsupported(InterfaceKind),
    /// The name is taken by a link l4lb must not manage (a NIC, a veth, a bridge with ports...).
    #[error("interface {name} exists but {reason}; refusing to manage its addresses")]
    Unsuitable { name: String, reason: String },
    /// The kernel refused an IPv6 VIP because IPv6 is disabled on the link (`disable_ipv6`).
    #[error("cannot add {ip} to {link}: IPv6 is disabled on this interface")]
    Ipv6Disabled { link: String, ip: IpAddr },
    #[error("interface {0} vanished")]
    Vanished(String),
    /// Another live agent manages this link (it holds the lock).
    #[error(
        "interface {link} is managed by another running l4lb (pid {holder}, lock {}); \
         stop it first or give this one another --interface",
        lock.display()
    )]
    Busy {
        link: String,
        holder: String,
        lock: std::path::PathBuf,
    },
    #[error("{op}: {source}")]
    Lock {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

/// The errno of a netlink NACK, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(Errno::from_raw(msg.raw_code().abs())),
        _ => None,
    }
}

fn nl_err(op: impl Into<String>, source: rtnetlink::Error) -> NetifError {
    let op = op.into();
    match errno(&source) {
        Some(Errno::EPERM | Errno::EACCES) => NetifError::PermissionDenied { op },
        _ => NetifError::Netlink { op, source },
    }
}

/// The link being managed (absent for [`InterfaceKind::None`]).
#[derive(Debug)]
struct Link {
    name: String,
    index: u32,
}

/// A handle on the VIP interface. Dropping it stops the netlink connection and leaves the
/// link and its addresses as they are (call [`Netif::clear`] on shutdown).
pub struct Netif {
    kind: InterfaceKind,
    link: Option<Link>,
    /// Addresses kept on the link besides the VIPs (DNS listen addresses), see [`Netif::keep`].
    kept: BTreeSet<IpAddr>,
    handle: Handle,
    conn: JoinHandle<()>,
    /// Held while this `Netif` manages the link (none for `None`).
    _lock: Option<lock::LinkLock>,
    /// A route per VIP that keeps it local while its address is missing (none for `None`,
    /// or when they cannot be set up).
    anchors: Option<anchor::Anchors>,
}

impl fmt::Debug for Netif {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netif")
            .field("kind", &self.kind)
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

impl Drop for Netif {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Netif {
    /// Open (create if missing) link `name` of `kind` and bring it up. `Auto` tries a dummy
    /// link and falls back to an empty bridge when the kernel has no dummy driver. An existing
    /// dummy or port-less bridge with that name is reused; any other existing link is refused
    /// ([`NetifError::Unsuitable`]); a link another live `Netif` holds (another agent) is
    /// refused ([`NetifError::Busy`]). `None` installs nothing. Must run inside a tokio runtime.
    pub async fn open(name: &str, kind: InterfaceKind) -> Result<Self, NetifError> {
        Self::open_with(name, kind, &Sockets::default()).await
    }

    /// [`Netif::open`], holding the link's lock through the lock file a predecessor passed
    /// in `sockets` if it did (`--take-over`), and offering it there to a successor.
    pub async fn open_with(
        name: &str,
        kind: InterfaceKind,
        sockets: &Sockets,
    ) -> Result<Self, NetifError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetifError::Socket)?;
        let conn = tokio::spawn(conn);
        let mut me = Netif {
            kind,
            link: None,
            kept: BTreeSet::new(),
            handle,
            conn,
            _lock: None,
            anchors: None,
        };
        if kind == InterfaceKind::None {
            info!(
                interface = name,
                "interface kind none: installing no VIP addresses"
            );
            return Ok(me);
        }
        // Before touching anything: a second agent on this link must not undo the first.
        let dir = std::path::Path::new(LOCK_DIR);
        let inherited = lock::lock_path(dir, name)
            .ok()
            .and_then(|p| sockets.take_lock(&p));
        let lock = match inherited {
            Some(file) => lock::LinkLock::adopt(dir, name, file)?,
            None => lock::LinkLock::acquire(dir, name)?,
        };
        debug!(lock = %lock.path().display(), "holding the link's lock");
        if let Some(fd) = lock.fd() {
            let at = lock.path().display().to_string();
            sockets.offer(
                Name {
                    kind: Kind::Lock,
                    at,
                },
                fd,
            );
        }
        me._lock = Some(lock);
        let (index, actual) = match me.find_link(name).await? {
            Some(msg) => me.check_existing(name, kind, &msg).await?,
            None => me.create(name, kind).await?,
        };
        me.bring_up(index, name).await?;
        me.kind = actual;
        me.link = Some(Link {
            name: name.to_string(),
            index,
        });
        me.anchors = match me.find_link("lo").await {
            Ok(Some(lo)) => anchor::Anchors::open(lo.header.index)
                .inspect_err(|e| warn!(error = %e, "no anchor routes for VIPs"))
                .ok(),
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "no anchor routes for VIPs");
                None
            }
        };
        harden_arp();
        Ok(me)
    }

    /// The kind in use: `Dummy`, `Bridge` or `None` (never `Auto`).
    pub fn kind(&self) -> InterfaceKind {
        self.kind
    }

    /// The link's name, or `None` for [`InterfaceKind::None`].
    pub fn name(&self) -> Option<&str> {
        self.link.as_ref().map(|l| l.name.as_str())
    }

    /// The link as [`watch`] knows it (index and name), or `None` for [`InterfaceKind::None`].
    pub fn watched(&self) -> Option<watch::Watched<'_>> {
        self.link.as_ref().map(|l| watch::Watched {
            index: l.index,
            name: &l.name,
        })
    }

    /// Addresses kept on the link besides the VIPs ([`Netif::keep`]).
    pub fn kept(&self) -> &BTreeSet<IpAddr> {
        &self.kept
    }

    /// Make sure the link exists and is up: re-create it if someone deleted it, adopt a link
    /// of its name that someone re-created (if it is one l4lb may manage, as at
    /// [`Netif::open`]), bring it up if someone set it down. Addresses are [`Netif::sync`]'s
    /// business (a re-created link has none; a link set down lost its IPv6 ones). Returns
    /// whether anything was done; a no-op for `None`.
    pub async fn heal(&mut self) -> Result<bool, NetifError> {
        let Some(link) = &self.link else {
            return Ok(false);
        };
        let (name, old) = (link.name.clone(), link.index);
        let (index, up) = match self.find_link(&name).await? {
            Some(msg) if msg.header.index == old => (old, msg.header.flags.contains(LinkFlags::Up)),
            Some(msg) => {
                let (index, kind) = self
                    .check_existing(&name, InterfaceKind::Auto, &msg)
                    .await?;
                warn!(interface = %name, index, "VIP interface was re-created by someone else; adopting it");
                self.kind = kind;
                (index, msg.header.flags.contains(LinkFlags::Up))
            }
            None => {
                warn!(interface = %name, "VIP interface was deleted; re-creating it");
                let (index, kind) = self.create(&name, self.kind).await?;
                self.kind = kind;
                (index, false)
            }
        };
        let changed = index != old || !up;
        self.link = Some(Link {
            name: name.clone(),
            index,
        });
        if !up {
            self.bring_up(index, &name).await?;
        }
        Ok(changed)
    }

    /// Make the addresses on the link exactly `want` (each /32 or /128): add the missing,
    /// remove the extra (left-overs of a previous run, or a VIP installed with another prefix
    /// length). IPv6 link-local addresses the kernel put there are left alone. Returns
    /// `(added, removed)`. A no-op for `None`. `want` is expected to hold VIPs that passed the
    /// §3 checks (never link-local). On error every other change has still been attempted.
    /// Addresses in [`Netif::keep`] are always wanted. Their anchor routes are made to match
    /// too (after the addresses); `(added, removed)` counts addresses only.
    pub async fn sync(
        &self,
        want: &BTreeSet<IpAddr>,
    ) -> Result<(Vec<IpAddr>, Vec<IpAddr>), NetifError> {
        if self.kept.is_subset(want) {
            return self.sync_exact(want).await;
        }
        let want: BTreeSet<IpAddr> = want.union(&self.kept).copied().collect();
        self.sync_exact(&want).await
    }

    /// Install `ips` now and keep them on the link through every [`Netif::sync`] until
    /// [`Netif::clear`]: addresses of l4lb's own that are not VIPs, such as the DNS listen
    /// addresses DC/OS used (198.51.100.1–3), which must be local before the DNS binds them.
    pub async fn keep(&mut self, ips: &[IpAddr]) -> Result<(), NetifError> {
        self.kept.extend(ips.iter().copied());
        self.add(ips).await
    }

    async fn sync_exact(
        &self,
        want: &BTreeSet<IpAddr>,
    ) -> Result<(Vec<IpAddr>, Vec<IpAddr>), NetifError> {
        let Some(link) = &self.link else {
            return Ok((Vec::new(), Vec::new()));
        };
        let current = self.link_addresses(link).await?;
        let nets: BTreeSet<IpNet> = current.iter().map(|(net, _)| *net).collect();
        let plan = plan(&nets, want);
        // One bad address must not keep the others off the link: try everything, then
        // report the first failure (the caller retries the whole sync).
        let mut first_err = None;
        for net in &plan.to_remove {
            if let Err(e) = self.del_one(link, *net).await {
                warn!(interface = %link.name, %net, error = %e, "removing address failed");
                first_err.get_or_insert(e);
            }
        }
        for ip in &plan.to_add {
            if let Err(e) = self.add_one(link, *ip).await {
                warn!(interface = %link.name, %ip, error = %e, "adding VIP address failed");
                first_err.get_or_insert(e);
            }
        }
        // The addresses first (they are what a flush took), then their anchors.
        if let Some(anchors) = &self.anchors {
            match anchors.sync(want).await {
                Ok((0, 0)) => {}
                Ok((added, removed)) => debug!(added, removed, "anchor routes synced"),
                Err(e) => {
                    warn!(error = %e, "syncing anchor routes failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if plan.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let removed: Vec<IpAddr> = plan.to_remove.iter().map(IpNet::addr).collect();
        info!(
            interface = %link.name,
            added = plan.to_add.len(),
            removed = removed.len(),
            "VIP addresses synced"
        );
        Ok((plan.to_add, removed))
    }

    /// Add `ips` (as /32 or /128, IPv6 without DAD so they are usable at once). Addresses
    /// already present are fine. A no-op for `None`.
    pub async fn add(&self, ips: &[IpAddr]) -> Result<(), NetifError> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        for ip in ips {
            self.add_one(link, *ip).await?;
        }
        Ok(())
    }

    /// Remove `ips` from the link, whatever prefix length they carry. Addresses already gone
    /// are fine. A no-op for `None`.
    pub async fn remove(&self, ips: &[IpAddr]) -> Result<(), NetifError> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        if ips.is_empty() {
            return Ok(());
        }
        let gone: BTreeSet<IpAddr> = ips.iter().copied().collect();
        for (net, _) in self.link_addresses(link).await? {
            if gone.contains(&net.addr()) {
                self.del_one(link, net).await?;
            }
        }
        Ok(())
    }

    /// Every address of this host's interfaces other than the VIP link, and the broadcast
    /// addresses of their IPv4 subnets: no VIP may take one (§3). For `None`: every local
    /// address.
    pub async fn host_addresses(&self) -> Result<HostAddresses, NetifError> {
        let skip = self.link.as_ref().map(|l| l.index);
        let mut out = HostAddresses::default();
        let mut dump = self.handle.address().get().execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| nl_err("listing host addresses", e))?
        {
            if Some(msg.header.index) == skip {
                continue;
            }
            if let Some(ip) = local_ip(&msg) {
                out.own.insert(ip);
                out.broadcast
                    .extend(subnet_broadcast(ip, msg.header.prefix_len));
            }
            for attr in &msg.attributes {
                if let AddressAttribute::Broadcast(b) = attr {
                    out.broadcast.insert(IpAddr::V4(*b));
                }
            }
        }
        Ok(out)
    }

    /// Let go of the link for a successor that serves it now (`--take-over`): every address,
    /// anchor and the lock file stay.
    pub fn hand_over(mut self) {
        if let Some(l) = &mut self._lock {
            l.hand_over();
        }
    }

    /// Remove every VIP address, and every kept one, from the link (shutdown); the link
    /// itself stays.
    pub async fn clear(&self) -> Result<(), NetifError> {
        self.sync_exact(&BTreeSet::new()).await.map(drop)
    }

    /// Set the link `name` (index `index`) administratively up.
    async fn bring_up(&self, index: u32, name: &str) -> Result<(), NetifError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| nl_err(format!("bringing {name} up"), e))
    }

    async fn find_link(&self, name: &str) -> Result<Option<LinkMessage>, NetifError> {
        let res = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match res {
            Ok(msg) => Ok(msg),
            Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("looking up {name}"), e)),
        }
    }

    /// Decide whether an existing link may be reused; returns its index and kind.
    async fn check_existing(
        &self,
        name: &str,
        want: InterfaceKind,
        msg: &LinkMessage,
    ) -> Result<(u32, InterfaceKind), NetifError> {
        let index = msg.header.index;
        let unsuitable = |reason: String| NetifError::Unsuitable {
            name: name.to_string(),
            reason,
        };
        let found = match link_kind(msg) {
            Some(InfoKind::Dummy) => InterfaceKind::Dummy,
            Some(InfoKind::Bridge) => InterfaceKind::Bridge,
            Some(other) => return Err(unsuitable(format!("is a {other:?} link"))),
            None => return Err(unsuitable("is a physical or unknown link".into())),
        };
        if want != InterfaceKind::Auto && want != found {
            return Err(unsuitable(format!("is a {found} link, not {want}")));
        }
        if found == InterfaceKind::Bridge {
            let mut links = self.handle.link().get().execute();
            while let Some(l) = links
                .try_next()
                .await
                .map_err(|e| nl_err("listing links", e))?
            {
                if l.attributes.contains(&LinkAttribute::Controller(index)) {
                    return Err(unsuitable("is a bridge with ports attached".into()));
                }
            }
        }
        info!(interface = name, kind = %found, "reusing existing VIP interface");
        Ok((index, found))
    }

    async fn create(
        &self,
        name: &str,
        kind: InterfaceKind,
    ) -> Result<(u32, InterfaceKind), NetifError> {
        let actual = match kind {
            InterfaceKind::Dummy | InterfaceKind::Bridge => {
                self.create_kind(name, kind).await?;
                kind
            }
            _ => match self.create_kind(name, InterfaceKind::Dummy).await {
                Ok(()) => InterfaceKind::Dummy,
                Err(NetifError::Unsupported(_)) => {
                    warn!(
                        interface = name,
                        "kernel has no dummy interface driver; using an empty bridge instead"
                    );
                    self.create_kind(name, InterfaceKind::Bridge).await?;
                    InterfaceKind::Bridge
                }
                Err(e) => return Err(e),
            },
        };
        let msg = self
            .find_link(name)
            .await?
            .ok_or_else(|| NetifError::Vanished(name.to_string()))?;
        // Created concurrently by someone else? Then it must pass the same checks.
        let found = link_kind(&msg);
        let expect = match actual {
            InterfaceKind::Dummy => InfoKind::Dummy,
            _ => InfoKind::Bridge,
        };
        if found.as_ref() != Some(&expect) {
            return self.check_existing(name, actual, &msg).await;
        }
        info!(interface = name, kind = %actual, "created VIP interface");
        Ok((msg.header.index, actual))
    }

    async fn create_kind(&self, name: &str, kind: InterfaceKind) -> Result<(), NetifError> {
        let msg = match kind {
            InterfaceKind::Dummy => LinkDummy::new(name).up().build(),
            _ => LinkBridge::new(name).up().build(),
        };
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(Errno::EEXIST) => Ok(()),
            Err(e) if errno(&e) == Some(Errno::EOPNOTSUPP) => Err(NetifError::Unsupported(kind)),
            Err(e) => Err(nl_err(format!("creating {kind} interface {name}"), e)),
        }
    }

    /// The addresses on the link with their prefix lengths, and the raw messages.
    async fn link_addresses(
        &self,
        link: &Link,
    ) -> Result<Vec<(IpNet, AddressMessage)>, NetifError> {
        let mut out = Vec::new();
        let mut dump = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| nl_err(format!("listing addresses of {}", link.name), e))?
        {
            if let Some(ip) = local_ip(&msg) {
                match IpNet::new(ip, msg.header.prefix_len) {
                    Ok(net) => out.push((net, msg)),
                    Err(_) => warn!(%ip, prefix = msg.header.prefix_len, "bad prefix length"),
                }
            }
        }
        Ok(out)
    }

    async fn add_one(&self, link: &Link, ip: IpAddr) -> Result<(), NetifError> {
        let mut req = self.handle.address().add(link.index, ip, host_prefix(ip));
        if ip.is_ipv6() {
            // A port-less bridge may have no carrier: without NODAD the address would sit in
            // "tentative" state and refuse binds.
            let m = req.message_mut();
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => {
                debug!(interface = %link.name, %ip, "VIP address added");
                Ok(())
            }
            Err(e) if errno(&e) == Some(Errno::EEXIST) => Ok(()),
            // EACCES here is `disable_ipv6`, not a missing capability (that is EPERM).
            Err(e) if ip.is_ipv6() && errno(&e) == Some(Errno::EACCES) => {
                Err(NetifError::Ipv6Disabled {
                    link: link.name.clone(),
                    ip,
                })
            }
            Err(e) => Err(nl_err(format!("adding {ip} to {}", link.name), e)),
        }
    }

    async fn del_one(&self, link: &Link, net: IpNet) -> Result<(), NetifError> {
        let msg = match net.addr() {
            IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(link.index)
                .address(a, net.prefix_len())
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(link.index)
                .address(a, net.prefix_len())
                .build(),
        };
        match self.handle.address().del(msg).execute().await {
            Ok(()) => {
                debug!(interface = %link.name, %net, "address removed");
                Ok(())
            }
            Err(e) if errno(&e) == Some(Errno::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(nl_err(format!("removing {net} from {}", link.name), e)),
        }
    }
}

fn link_kind(msg: &LinkMessage) -> Option<InfoKind> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// The local address of an address message: `IFA_LOCAL` when present (it differs from
/// `IFA_ADDRESS` on point-to-point links), else `IFA_ADDRESS`.
/// Addresses of this host no VIP may take ([`Netif::host_addresses`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddresses {
    /// The host's own addresses.
    pub own: BTreeSet<IpAddr>,
    /// The broadcast addresses of the host's IPv4 subnets.
    pub broadcast: BTreeSet<IpAddr>,
}

impl HostAddresses {
    /// One of the host's own addresses.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.own.contains(ip)
    }
}

/// The broadcast address of `ip`'s IPv4 subnet; none for IPv6, /31 and /32 (RFC 3021).
fn subnet_broadcast(ip: IpAddr, prefix_len: u8) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(v4) if prefix_len <= 30 => ipnet::Ipv4Net::new(v4, prefix_len)
            .ok()
            .map(|n| IpAddr::V4(n.broadcast())),
        _ => None,
    }
}

fn local_ip(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// VIP addresses live on every host, so no host may answer ARP for them on its real links
/// (another host's client would send VIP traffic here). As kube-proxy does in IPVS mode:
/// `arp_ignore=1` (answer only for addresses of the incoming link) and `arp_announce=2` (never
/// source ARP from a VIP). Stricter values already set are kept.
fn harden_arp() {
    for (knob, want) in [("arp_ignore", 1u8), ("arp_announce", 2u8)] {
        let path = format!("/proc/sys/net/ipv4/conf/all/{knob}");
        let Ok(cur) = std::fs::read_to_string(&path) else {
            continue;
        };
        if cur.trim().parse::<u8>().is_ok_and(|v| v >= want) {
            continue;
        }
        match std::fs::write(&path, want.to_string()) {
            Ok(()) => {
                info!(sysctl = %path, value = want, "set so that hosts never answer ARP for VIPs")
            }
            Err(e) => tracing::warn!(sysctl = %path, error = %e, "cannot harden ARP for VIPs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_parses_and_prints() {
        for (s, k) in [
            ("auto", InterfaceKind::Auto),
            ("dummy", InterfaceKind::Dummy),
            ("Bridge", InterfaceKind::Bridge),
            ("none", InterfaceKind::None),
        ] {
            assert_eq!(s.parse::<InterfaceKind>(), Ok(k));
            assert_eq!(k.to_string(), s.to_ascii_lowercase());
        }
        let err = "veth".parse::<InterfaceKind>().unwrap_err();
        assert!(err.to_string().contains("veth"));
    }

    #[test]
    fn permission_errors_name_cap_net_admin() {
        let e = NetifError::PermissionDenied {
            op: "creating dummy interface minuteman".into(),
        };
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
    }

    fn nack(errno: Errno) -> rtnetlink::Error {
        let mut msg = rtnetlink::packet_core::ErrorMessage::default();
        msg.code = std::num::NonZeroI32::new(-(errno as i32));
        rtnetlink::Error::NetlinkError(msg)
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno(&nack(Errno::EEXIST)), Some(Errno::EEXIST));
        assert_eq!(errno(&rtnetlink::Error::RequestFailed), None);
        for (code, denied) in [
            (Errno::EPERM, true),
            (Errno::EACCES, true),
            (Errno::EEXIST, false),
            (Errno::ENODEV, false),
        ] {
            let e = nl_err("op", nack(code));
            assert_eq!(
                matches!(e, NetifError::PermissionDenied { .. }),
                denied,
                "errno {code}"
            );
            assert!(e.to_string().starts_with("op: "), "{e}");
        }
    }

    #[test]
    fn subnet_broadcasts() {
        let cases = [
            ("198.18.0.1", 15, Some("198.19.255.255")),
            ("10.1.2.3", 24, Some("10.1.2.255")),
            ("10.1.2.3", 30, Some("10.1.2.3")),
            ("10.1.2.3", 31, None),
            ("10.1.2.3", 32, None),
            ("fd01::1", 64, None),
        ];
        for (ip, len, want) in cases {
            let want = want.map(|w| w.parse::<IpAddr>().unwrap());
            assert_eq!(
                subnet_broadcast(ip.parse().unwrap(), len),
                want,
                "{ip}/{len}"
            );
        }
    }

    #[test]
    fn local_ip_prefers_ifa_local() {
        let mut msg = AddressMessage::default();
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let local: IpAddr = "10.0.0.1".parse().unwrap();
        msg.attributes.push(AddressAttribute::Address(peer));
        assert_eq!(local_ip(&msg), Some(peer));
        msg.attributes.push(AddressAttribute::Local(local));
        assert_eq!(local_ip(&msg), Some(local));
        assert_eq!(local_ip(&AddressMessage::default()), None);
    }
}
