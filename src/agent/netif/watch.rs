//! Watching the VIP link over rtnetlink, so that someone else's change (`ip addr flush dev
//! minuteman`, the link set down or deleted) is undone at once instead of at the next poll.
//!
//! A multicast socket on the link, IPv4-address and IPv6-address groups of the calling
//! thread's network namespace yields every change; the pure half reduces each message to a
//! [`Note`] ([`note`]) and says whether a note asks for a reconcile ([`verdict`]): an address
//! we want that left our link, an address we do not want that appeared on it, our link down,
//! deleted or replaced, or lost notifications. Our own adds and removals also come back as
//! notes, and [`verdict`] ignores them (the added address is wanted, the removed one is not), so
//! healing never feeds itself. The I/O shell, [`LinkWatch`], hands out notes in bursts: a flush
//! of 1,000 addresses is 1,000 messages and one reconcile. Depends on nothing else in l4lb.

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use ipnet::IpNet;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::plan::{host_prefix, is_kernel_managed};

/// A notification's operation: something appeared (or changed), or went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    New,
    Del,
}

/// One rtnetlink notification, reduced to what the watch needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// `RTM_NEWADDR`/`RTM_DELADDR`: `net` on the link with index `link`.
    Addr { op: Op, link: u32, net: IpNet },
    /// `RTM_NEWLINK`/`RTM_DELLINK` of link `index` (named `name` when the message says).
    Link {
        op: Op,
        index: u32,
        name: Option<String>,
        up: bool,
    },
    /// The socket's receive buffer overflowed (`ENOBUFS`): notifications were lost.
    Overrun,
}

/// The link being watched: its index and its name (a link re-created under the same name
/// gets another index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched<'a> {
    pub index: u32,
    pub name: &'a str,
}

/// Why a reconcile is due now. Ordered by how much it must do: the worst of a burst wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Why {
    /// An address we want left the link, or one we do not want appeared on it.
    Addresses,
    /// The link went down (the kernel drops its IPv6 addresses and every local route).
    LinkDown,
    /// The link was deleted, or a link of that name appeared with another index.
    LinkGone,
    /// Notifications were lost: nothing is known, check everything.
    Overrun,
}

impl Why {
    /// The metric and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Addresses => "addresses",
            Why::LinkDown => "link_down",
            Why::LinkGone => "link_gone",
            Why::Overrun => "overrun",
        }
    }
}

/// The [`Note`] a message carries, if it is one the watch cares about.
pub fn note(msg: &NetlinkMessage<RouteNetlinkMessage>) -> Option<Note> {
    match &msg.payload {
        NetlinkPayload::Overrun(_) => Some(Note::Overrun),
        NetlinkPayload::InnerMessage(m) => match m {
            RouteNetlinkMessage::NewAddress(a) => addr_note(Op::New, a),
            RouteNetlinkMessage::DelAddress(a) => addr_note(Op::Del, a),
            RouteNetlinkMessage::NewLink(l) => Some(link_note(Op::New, l)),
            RouteNetlinkMessage::DelLink(l) => Some(link_note(Op::Del, l)),
            _ => None,
        },
        _ => None,
    }
}

fn addr_note(op: Op, msg: &AddressMessage) -> Option<Note> {
    let ip = super::local_ip(msg)?;
    let net = IpNet::new(ip, msg.header.prefix_len).ok()?;
    Some(Note::Addr {
        op,
        link: msg.header.index,
        net,
    })
}

fn link_note(op: Op, msg: &LinkMessage) -> Note {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    });
    Note::Link {
        op,
        index: msg.header.index,
        name,
        up: msg.header.flags.contains(LinkFlags::Up),
    }
}

/// Whether `note` asks for a reconcile of `link`, and why. `wanted` says which addresses
/// belong on the link (VIPs, draining VIPs, kept addresses), each as /32 or /128.
///
/// Our own changes come back as notes too and are ignored here, so reconciling converges:
/// an address we added is wanted, one we removed is not.
pub fn verdict(note: &Note, link: Watched<'_>, wanted: impl Fn(IpAddr) -> bool) -> Option<Why> {
    match note {
        Note::Overrun => Some(Why::Overrun),
        Note::Addr { link: l, .. } if *l != link.index => None,
        Note::Addr { op, net, .. } => {
            let ip = net.addr();
            if is_kernel_managed(ip) {
                return None;
            }
            let exact = net.prefix_len() == host_prefix(ip) && wanted(ip);
            match op {
                // Gone: only a wanted one matters (an unwanted one is our own removal).
                Op::Del => exact.then_some(Why::Addresses),
                // New: a wanted one is our own add; anything else is a stranger to remove.
                Op::New => (!exact).then_some(Why::Addresses),
            }
        }
        Note::Link {
            op,
            index,
            name,
            up,
        } => {
            let ours = *index == link.index;
            let our_name = name.as_deref() == Some(link.name);
            match (op, ours) {
                (Op::Del, true) => Some(Why::LinkGone),
                (Op::New, true) if !up => Some(Why::LinkDown),
                // Renamed away: our name is free, the addresses went with the link.
                (Op::New, true) if name.is_some() && !our_name => Some(Why::LinkGone),
                // Someone made a new link with our name (after deleting ours).
                (Op::New, false) if our_name => Some(Why::LinkGone),
                _ => None,
            }
        }
    }
}

/// The worst reason in `notes` for a reconcile of `link`, if any.
pub fn burst_verdict<'n>(
    notes: impl IntoIterator<Item = &'n Note>,
    link: Watched<'_>,
    wanted: impl Fn(IpAddr) -> bool,
) -> Option<Why> {
    notes
        .into_iter()
        .filter_map(|n| verdict(n, link, &wanted))
        .max()
}

/// Why the watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("opening an rtnetlink multicast socket: {0}")]
    Socket(#[source] std::io::Error),
}

/// How long a burst is quiet before it is handed out: long enough for `ip addr flush` to
/// finish its rounds (it dumps the link again after deleting, and deletes anything that came
/// back, up to 10 rounds), short enough that a VIP is back within a few milliseconds.
pub const QUIET: Duration = Duration::from_millis(3);

/// A burst is handed out at the latest this long after its first note, however busy.
pub const MAX_BURST: Duration = Duration::from_millis(25);

/// Notes kept per burst; past this the burst counts as an overrun (check everything).
const MAX_NOTES: usize = 65_536;

/// The receive buffer asked for (the kernel's default, ~208 KiB, holds a few hundred address
/// notifications: a flush of 1,000 VIPs would overflow it while the runtime is busy).
const RCVBUF: usize = 4 << 20;

type Messages = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// The I/O shell: an rtnetlink multicast socket on link and address changes, read by a task
/// of its own. Dropping it closes the socket.
pub struct LinkWatch {
    messages: Messages,
    /// The task reading the socket (none in unit tests, which feed `messages` themselves).
    conn: Option<JoinHandle<()>>,
    /// The burst being gathered: kept here so a cancelled [`LinkWatch::burst`] loses nothing.
    notes: Vec<Note>,
    started: Option<Instant>,
}

impl std::fmt::Debug for LinkWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWatch")
            .field("pending", &self.notes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            conn.abort();
        }
    }
}

impl LinkWatch {
    /// Subscribe to link and address changes of the calling thread's network namespace.
    /// Must run inside a tokio runtime.
    pub fn open() -> Result<Self, WatchError> {
        let (mut conn, _handle, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .map_err(WatchError::Socket)?;
        let sock = conn.socket_mut().socket_ref();
        // Past `rmem_max` with CAP_NET_ADMIN (which the agent has), else up to it.
        if nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF)
            .is_err()
            && let Err(e) = sock.set_rx_buf_sz(RCVBUF)
        {
            tracing::debug!(error = %e, "cannot grow the netlink receive buffer");
        }
        let mut w = LinkWatch::from_messages(messages);
        w.conn = Some(tokio::spawn(conn));
        Ok(w)
    }

    fn from_messages(messages: Messages) -> Self {
        LinkWatch {
            messages,
            conn: None,
            notes: Vec::new(),
            started: None,
        }
    }

    /// The next burst of notes: wait for one, then take what follows until [`QUIET`] passes
    /// with nothing new (or [`MAX_BURST`] since the first). `None` once the socket is closed
    /// (then every later call returns `None` at once). Cancel-safe: notes taken by a
    /// cancelled call are handed out by the next.
    pub async fn burst(&mut self) -> Option<Vec<Note>> {
        loop {
            let Some(started) = self.started else {
                let n = self.next_note().await?;
                self.notes.push(n);
                self.started = Some(Instant::now());
                continue;
            };
            let now = Instant::now();
            // (Checked here: a timeout polls its future first, so a steady stream of ready
            // notes would never see a deadline that has passed.)
            if now >= started + MAX_BURST {
                self.started = None;
                return Some(std::mem::take(&mut self.notes));
            }
            let deadline = (now + QUIET).min(started + MAX_BURST);
            match tokio::time::timeout_at(deadline, self.next_note()).await {
                Ok(Some(n)) if self.notes.len() < MAX_NOTES => self.notes.push(n),
                Ok(Some(_)) => {
                    self.notes.clear();
                    self.notes.push(Note::Overrun);
                }
                // Closed mid-burst: hand out what came; the next call says closed.
                Ok(None) | Err(_) => {
                    self.started = None;
                    return Some(std::mem::take(&mut self.notes));
                }
            }
        }
    }

    /// The next message that is a [`Note`]; `None` once the socket is closed. Cancel-safe.
    async fn next_note(&mut self) -> Option<Note> {
        loop {
            let (msg, _) = self.messages.next().await?;
            if let Some(n) = note(&msg) {
                return Some(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::address::AddressAttribute;
    use std::collections::BTreeSet;

    const LINK: Watched<'static> = Watched {
        index: 7,
        name: "minuteman",
    };

    fn addr(op: Op, link: u32, net: &str) -> Note {
        Note::Addr {
            op,
            link,
            net: net.parse().expect("net"),
        }
    }

    fn link(op: Op, index: u32, name: Option<&str>, up: bool) -> Note {
        Note::Link {
            op,
            index,
            name: name.map(str::to_string),
            up,
        }
    }

    #[test]
    fn verdicts() {
        let wanted: BTreeSet<IpAddr> = ["198.18.5.5", "2001:2::5"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        use Op::*;
        let cases: &[(&str, Note, Option<Why>)] = &[
            (
                "flush: a wanted VIP left",
                addr(Del, 7, "198.18.5.5/32"),
                Some(Why::Addresses),
            ),
            (
                "flush: IPv6 VIP left",
                addr(Del, 7, "2001:2::5/128"),
                Some(Why::Addresses),
            ),
            (
                "our removal of an old VIP",
                addr(Del, 7, "198.18.5.6/32"),
                None,
            ),
            ("our add of a VIP", addr(New, 7, "198.18.5.5/32"), None),
            (
                "a stranger's address",
                addr(New, 7, "198.18.5.6/32"),
                Some(Why::Addresses),
            ),
            (
                "a VIP with a wide prefix",
                addr(New, 7, "198.18.5.5/24"),
                Some(Why::Addresses),
            ),
            (
                "our removal of the wide one",
                addr(Del, 7, "198.18.5.5/24"),
                None,
            ),
            (
                "another link's address left",
                addr(Del, 3, "198.18.5.5/32"),
                None,
            ),
            (
                "another link's new address",
                addr(New, 3, "198.18.0.1/15"),
                None,
            ),
            (
                "kernel link-local appears",
                addr(New, 7, "fe80::1/64"),
                None,
            ),
            ("kernel link-local goes", addr(Del, 7, "fe80::1/64"), None),
            (
                "link deleted",
                link(Del, 7, Some("minuteman"), false),
                Some(Why::LinkGone),
            ),
            (
                "link set down",
                link(New, 7, Some("minuteman"), false),
                Some(Why::LinkDown),
            ),
            (
                "link up (ours, or a flag change)",
                link(New, 7, Some("minuteman"), true),
                None,
            ),
            (
                "link renamed away",
                link(New, 7, Some("other"), true),
                Some(Why::LinkGone),
            ),
            (
                "re-created with our name",
                link(New, 9, Some("minuteman"), true),
                Some(Why::LinkGone),
            ),
            (
                "re-created, still down",
                link(New, 9, Some("minuteman"), false),
                Some(Why::LinkGone),
            ),
            ("another link comes", link(New, 3, Some("eth0"), true), None),
            ("another link goes", link(Del, 3, Some("eth0"), false), None),
            ("another link down", link(New, 3, Some("eth0"), false), None),
            (
                "an old link of our name goes",
                link(Del, 4, Some("minuteman"), false),
                None,
            ),
            ("lost notifications", Note::Overrun, Some(Why::Overrun)),
        ];
        for (what, n, want) in cases {
            assert_eq!(verdict(n, LINK, |ip| wanted.contains(&ip)), *want, "{what}");
        }
    }

    #[test]
    fn a_burst_takes_its_worst_reason() {
        use Op::*;
        let want = |ip: IpAddr| ip == "198.18.5.5".parse::<IpAddr>().expect("ip");
        let cases: &[(&str, Vec<Note>, Option<Why>)] = &[
            ("empty", vec![], None),
            (
                "our own apply",
                vec![addr(New, 7, "198.18.5.5/32"), addr(Del, 7, "198.18.5.9/32")],
                None,
            ),
            (
                "a flush",
                vec![addr(Del, 7, "198.18.5.9/32"), addr(Del, 7, "198.18.5.5/32")],
                Some(Why::Addresses),
            ),
            (
                "link deleted: addresses then the link",
                vec![
                    addr(Del, 7, "198.18.5.5/32"),
                    link(Del, 7, Some("minuteman"), false),
                ],
                Some(Why::LinkGone),
            ),
            (
                "down then overrun",
                vec![link(New, 7, Some("minuteman"), false), Note::Overrun],
                Some(Why::Overrun),
            ),
        ];
        for (what, notes, expect) in cases {
            assert_eq!(burst_verdict(notes, LINK, want), *expect, "{what}");
        }
    }

    fn del_addr(last: u8) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut a = AddressMessage::default();
        a.header.index = 7;
        a.header.prefix_len = 32;
        a.attributes
            .push(AddressAttribute::Address(IpAddr::from([198, 18, 5, last])));
        NetlinkMessage::from(RouteNetlinkMessage::DelAddress(a))
    }

    fn feed() -> (
        futures::channel::mpsc::UnboundedSender<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
        LinkWatch,
    ) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        (tx, LinkWatch::from_messages(rx))
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_are_coalesced_bounded_and_survive_cancellation() {
        let from = SocketAddr::new(0, 0);
        let (tx, mut w) = feed();

        // A flush: many notes at once are one burst, handed out once QUIET has passed.
        for i in 0..1000u32 {
            tx.unbounded_send((del_addr(i as u8), from)).expect("send");
        }
        let t = Instant::now();
        assert_eq!(w.burst().await.expect("open").len(), 1000);
        assert_eq!(t.elapsed(), QUIET);

        // Notes further apart than QUIET are separate bursts.
        let tx2 = tx.clone();
        let sender = tokio::spawn(async move {
            for i in 0..2u8 {
                tx2.unbounded_send((del_addr(i), from)).expect("send");
                tokio::time::sleep(QUIET * 3).await;
            }
        });
        assert_eq!(w.burst().await.expect("open").len(), 1);
        assert_eq!(w.burst().await.expect("open").len(), 1);
        sender.await.expect("sender");

        // A steady stream is cut at MAX_BURST.
        let tx2 = tx.clone();
        let sender = tokio::spawn(async move {
            for i in 0..100u8 {
                tx2.unbounded_send((del_addr(i), from)).expect("send");
                tokio::time::sleep(QUIET / 3).await;
            }
        });
        let t = Instant::now();
        let n = w.burst().await.expect("open").len();
        assert!(t.elapsed() <= MAX_BURST + QUIET, "{:?}", t.elapsed());
        assert!(n < 100, "{n}");
        let mut total = n;
        while total < 100 {
            total += w.burst().await.expect("open").len();
        }
        assert_eq!(total, 100);
        sender.await.expect("sender");

        // A call cancelled mid-burst loses nothing: the next hands the notes out.
        tx.unbounded_send((del_addr(1), from)).expect("send");
        let cut = tokio::time::timeout(QUIET / 2, w.burst()).await;
        assert!(cut.is_err(), "the burst was not cut short");
        tx.unbounded_send((del_addr(2), from)).expect("send");
        assert_eq!(w.burst().await.expect("open").len(), 2);

        // Closed: what came is handed out, then `None` for good.
        tx.unbounded_send((del_addr(3), from)).expect("send");
        drop(tx);
        assert_eq!(w.burst().await.expect("last burst").len(), 1);
        assert!(w.burst().await.is_none());
        assert!(w.burst().await.is_none());
    }

    #[test]
    fn messages_become_notes() {
        let mut a = AddressMessage::default();
        a.header.index = 7;
        a.header.prefix_len = 32;
        a.attributes
            .push(AddressAttribute::Address("198.18.5.5".parse().expect("ip")));
        let inner = |m| NetlinkMessage::from(m);
        assert_eq!(
            note(&inner(RouteNetlinkMessage::DelAddress(a.clone()))),
            Some(addr(Op::Del, 7, "198.18.5.5/32"))
        );
        assert_eq!(
            note(&inner(RouteNetlinkMessage::NewAddress(a.clone()))),
            Some(addr(Op::New, 7, "198.18.5.5/32"))
        );
        // No address attribute, or an impossible prefix: nothing to say.
        assert_eq!(
            note(&inner(RouteNetlinkMessage::DelAddress(
                AddressMessage::default()
            ))),
            None
        );
        a.header.prefix_len = 40;
        assert_eq!(note(&inner(RouteNetlinkMessage::DelAddress(a))), None);

        let mut l = LinkMessage::default();
        l.header.index = 7;
        l.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
        l.attributes.push(LinkAttribute::IfName("minuteman".into()));
        assert_eq!(
            note(&inner(RouteNetlinkMessage::NewLink(l.clone()))),
            Some(link(Op::New, 7, Some("minuteman"), true))
        );
        l.header.flags = LinkFlags::empty();
        assert_eq!(
            note(&inner(RouteNetlinkMessage::DelLink(l))),
            Some(link(Op::Del, 7, Some("minuteman"), false))
        );
        assert_eq!(
            note(&NetlinkMessage::new(
                Default::default(),
                NetlinkPayload::<RouteNetlinkMessage>::Overrun(Vec::new())
            )),
            Some(Note::Overrun)
        );
        assert_eq!(
            note(&inner(RouteNetlinkMessage::NewRoute(Default::default()))),
            None
        );
    }
}
