//! Anchor routes: each VIP address also has a `local` route of its own on `lo` (table local,
//! `proto 76`, metric 1024), so the kernel keeps delivering a VIP's traffic to this host even
//! while its address is missing from the VIP link: someone's `ip addr flush dev minuteman`
//! costs no connection in the milliseconds before the watch ([`super::watch`]) puts it back.
//!
//! Measured before writing this: with the address gone, a SYN to the VIP follows whatever
//! other route covers it (on a node subnet it waits for an ARP answer that never comes, and
//! fails after 3 s); with the anchor it is answered. The route is on `lo`, not on the VIP
//! link, because the kernel drops every route of a link when its last address goes. The
//! kernel's own local route for the address (metric 0) wins while the address is there.
//! Our routes are found by their protocol number, so a restart finds a crashed run's.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use nix::errno::Errno;
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::task::JoinHandle;
use tracing::debug;

use super::{NetifError, errno, host_prefix, nl_err};

/// The routing protocol number of l4lb's anchor routes (`proto 76` in `ip route`; 76 is 'L').
pub const ANCHOR_PROTO: u8 = 76;

/// Behind the kernel's own local route of an address (metric 0).
const ANCHOR_METRIC: u32 = 1024;

/// `RT_TABLE_LOCAL`.
const LOCAL_TABLE: u8 = 255;

/// The anchors of the calling thread's network namespace, over a netlink connection of their
/// own with strict checking, so that a dump is filtered by the kernel (table, protocol,
/// link) and stays small on a host with a large routing table.
pub(super) struct Anchors {
    handle: Handle,
    conn: JoinHandle<()>,
    lo: u32,
}

impl Drop for Anchors {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Anchors {
    /// Open, finding `lo` by its index `lo`. Must run inside a tokio runtime.
    pub(super) fn open(lo: u32) -> Result<Self, NetifError> {
        let (conn, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(NetifError::Socket)?;
        Ok(Anchors {
            handle,
            conn: tokio::spawn(conn),
            lo,
        })
    }

    /// Make the anchors exactly `want`; returns how many were added and removed. On error
    /// every other change has still been attempted.
    pub(super) async fn sync(&self, want: &BTreeSet<IpAddr>) -> Result<(usize, usize), NetifError> {
        let have = self.list().await?;
        let mut first_err = None;
        let (mut added, mut removed) = (0, 0);
        for ip in have.difference(want) {
            match self.change(*ip, false).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for ip in want.difference(&have) {
            match self.change(*ip, true).await {
                Ok(()) => added += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((added, removed)),
        }
    }

    /// The addresses that have an anchor now.
    pub(super) async fn list(&self) -> Result<BTreeSet<IpAddr>, NetifError> {
        let mut out = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut filter = RouteMessage::default();
            filter.header.address_family = family;
            filter.header.table = LOCAL_TABLE;
            filter.header.protocol = RouteProtocol::Other(ANCHOR_PROTO);
            filter.header.kind = RouteType::Local;
            filter.header.scope = RouteScope::Universe;
            filter.attributes.push(RouteAttribute::Oif(self.lo));
            let mut dump = self.handle.route().get(filter).execute();
            while let Some(r) = dump
                .try_next()
                .await
                .map_err(|e| nl_err("listing anchor routes", e))?
            {
                if let Some(ip) = anchor_of(&r, self.lo) {
                    out.insert(ip);
                }
            }
        }
        Ok(out)
    }

    async fn change(&self, ip: IpAddr, add: bool) -> Result<(), NetifError> {
        let msg = message(ip, self.lo);
        let res = if add {
            self.handle.route().add(msg).execute().await
        } else {
            self.handle.route().del(msg).execute().await
        };
        match res {
            Ok(()) => {
                debug!(%ip, add, "anchor route changed");
                Ok(())
            }
            Err(e) if add && errno(&e) == Some(Errno::EEXIST) => Ok(()),
            Err(e) if !add && errno(&e) == Some(Errno::ESRCH) => Ok(()),
            Err(e) => {
                let op = if add { "adding" } else { "removing" };
                Err(nl_err(format!("{op} the anchor route of {ip}"), e))
            }
        }
    }
}

/// The anchor route of `ip` on link `lo`.
fn message(ip: IpAddr, lo: u32) -> RouteMessage {
    let mut msg = match ip {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, host_prefix(ip))
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, host_prefix(ip))
            .build(),
    };
    msg.header.table = LOCAL_TABLE;
    msg.header.protocol = RouteProtocol::Other(ANCHOR_PROTO);
    msg.header.kind = RouteType::Local;
    msg.header.scope = RouteScope::Host;
    msg.attributes.push(RouteAttribute::Oif(lo));
    msg.attributes.push(RouteAttribute::Priority(ANCHOR_METRIC));
    msg
}

/// The address `r` anchors, if it is one of ours: a host route of our protocol, of type
/// local, in the local table, on `lo` (checked here too, in case the kernel did not filter).
fn anchor_of(r: &RouteMessage, lo: u32) -> Option<IpAddr> {
    let h = &r.header;
    if h.table != LOCAL_TABLE
        || h.protocol != RouteProtocol::Other(ANCHOR_PROTO)
        || h.kind != RouteType::Local
    {
        return None;
    }
    let mut dst = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_ip(d),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let ip = dst?;
    (oif == Some(lo) && h.destination_prefix_length == host_prefix(ip)).then_some(ip)
}

fn route_ip(a: &netlink_packet_route::route::RouteAddress) -> Option<IpAddr> {
    use netlink_packet_route::route::RouteAddress;
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_anchor_messages_are_recognised_and_nothing_else() {
        for ip in ["198.18.5.5", "2001:2::5"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let m = message(ip, 1);
            assert_eq!(anchor_of(&m, 1), Some(ip), "{ip}");
            assert_eq!(anchor_of(&m, 2), None, "{ip} on another link");
            let mut k = m.clone();
            k.header.protocol = RouteProtocol::Kernel;
            assert_eq!(anchor_of(&k, 1), None, "{ip}: the kernel's own route");
            let mut t = m.clone();
            t.header.table = 254;
            assert_eq!(anchor_of(&t, 1), None, "{ip}: main table");
            let mut u = m.clone();
            u.header.kind = RouteType::Unicast;
            assert_eq!(anchor_of(&u, 1), None, "{ip}: unicast");
            let mut p = m;
            p.header.destination_prefix_length = 24;
            assert_eq!(anchor_of(&p, 1), None, "{ip}: not a host route");
        }
    }
}
