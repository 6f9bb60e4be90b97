//! Batched datagram I/O: up to [`SLOTS`] datagrams per `recvmmsg(2)` and per `sendmmsg(2)`,
//! through per-thread buffers (never held across an `.await`, so an idle session or VIP
//! holds none). A slot is [`MAX_DATAGRAM`] bytes so no datagram is ever truncated; pages are
//! only touched as far as datagrams fill them.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};

/// Largest datagram relayed.
pub(super) const MAX_DATAGRAM: usize = 65_536;
/// Datagrams per batch.
pub(super) const SLOTS: usize = 32;

/// One thread's batch buffers and message headers.
pub(super) struct Batch {
    bufs: Vec<Vec<u8>>,
    /// Length and source of each datagram of the last [`Batch::recv`].
    got: Vec<(usize, Option<SocketAddr>)>,
    recv_hdrs: MultiHeaders<SockaddrStorage>,
    send_hdrs: MultiHeaders<SockaddrStorage>,
    /// Destinations of one `sendmmsg`, reused (a socket address is 128 bytes: too many to
    /// build a full batch's worth on every call).
    addrs: Vec<Option<SockaddrStorage>>,
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Run `f` on this thread's batch (allocated on first use).
pub(super) fn with_batch<R>(f: impl FnOnce(&mut Batch) -> R) -> R {
    BATCH.with_borrow_mut(|b| f(b.get_or_insert_with(Batch::new)))
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

impl Batch {
    fn new() -> Self {
        Batch {
            bufs: (0..SLOTS).map(|_| vec![0u8; MAX_DATAGRAM]).collect(),
            got: Vec::with_capacity(SLOTS),
            recv_hdrs: MultiHeaders::preallocate(SLOTS, None),
            send_hdrs: MultiHeaders::preallocate(SLOTS, None),
            addrs: Vec::with_capacity(SLOTS),
        }
    }

    /// Receive what `fd` (non-blocking) has queued, up to [`SLOTS`] datagrams: the count, or
    /// `WouldBlock` when there is none.
    pub(super) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.got.clear();
        // On the stack: no allocation per call.
        let mut bufs = self.bufs.iter_mut();
        let mut slices: [[IoSliceMut<'_>; 1]; SLOTS] =
            std::array::from_fn(|_| [IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| b))]);
        let res = recvmmsg(
            fd,
            &mut self.recv_hdrs,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        for m in res {
            let from = m.address.as_ref().and_then(to_std);
            self.got.push((m.bytes, from));
        }
        Ok(self.got.len())
    }

    /// Datagram `i` of the last [`Batch::recv`] and its source.
    pub(super) fn datagram(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let (n, from) = self.got[i];
        (&self.bufs[i][..n], from)
    }

    /// Datagrams received by the last [`Batch::recv`].
    pub(super) fn len(&self) -> usize {
        self.got.len()
    }

    /// Send every datagram of the last receive on `fd`, to `to` (see [`Batch::send`]).
    pub(super) fn send_all(&mut self, fd: RawFd, to: Option<SocketAddr>) -> io::Result<usize> {
        const ALL: [usize; SLOTS] = {
            let mut a = [0; SLOTS];
            let mut i = 0;
            while i < SLOTS {
                a[i] = i;
                i += 1;
            }
            a
        };
        let n = self.got.len();
        self.send(fd, &ALL[..n], to)
    }

    /// Send datagrams `which` (indices into the last receive) on `fd`, to `to`, or on a
    /// connected socket with `None`. Returns how many went (a prefix of `which`); an error
    /// only when the first could not.
    pub(super) fn send(
        &mut self,
        fd: RawFd,
        which: &[usize],
        to: Option<SocketAddr>,
    ) -> io::Result<usize> {
        if which.is_empty() {
            return Ok(0);
        }
        let which = &which[..which.len().min(SLOTS)];
        // On the stack: no allocation per call. Only the first `which.len()` are sent.
        let slices: [[IoSlice<'_>; 1]; SLOTS] = std::array::from_fn(|k| {
            [IoSlice::new(
                which
                    .get(k)
                    .map_or(&[][..], |&i| &self.bufs[i][..self.got[i].0]),
            )]
        });
        let dest: Option<SockaddrStorage> = to.map(SockaddrStorage::from);
        self.addrs.clear();
        self.addrs.resize(which.len(), dest);
        let none: [ControlMessage<'_>; 0] = [];
        let res = sendmmsg(
            fd,
            &mut self.send_hdrs,
            slices[..which.len()].iter(),
            &self.addrs,
            none,
            MsgFlags::MSG_DONTWAIT,
        )?;
        Ok(res.count())
    }

    /// Bytes in datagram `i`.
    pub(super) fn bytes(&self, i: usize) -> usize {
        self.got[i].0
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_batch_round_trips_many_datagrams_and_their_sources() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        echo.set_nonblocking(true).unwrap();
        with_batch(|batch| {
            assert_eq!(
                batch.recv(rx.as_raw_fd()).map_err(|e| e.kind()),
                Err(io::ErrorKind::WouldBlock)
            );
            let big = vec![9u8; 60_000];
            for i in 0..40u8 {
                let from = if i % 2 == 0 { &a } else { &b };
                let msg = if i == 7 {
                    big.clone()
                } else {
                    vec![i; 1 + i as usize]
                };
                from.send_to(&msg, rx.local_addr().unwrap()).unwrap();
            }
            let n = batch.recv(rx.as_raw_fd()).unwrap();
            assert_eq!(n, SLOTS, "one call takes a full batch");
            for i in 0..n {
                let (data, from) = batch.datagram(i);
                let want = if i % 2 == 0 { &a } else { &b };
                assert_eq!(from, Some(want.local_addr().unwrap()));
                if i == 7 {
                    assert_eq!(data.len(), 60_000, "no truncation");
                } else {
                    assert_eq!(data, vec![i as u8; 1 + i]);
                }
            }
            // Send the even ones on to `echo` in one call.
            let even: Vec<usize> = (0..n).step_by(2).collect();
            let sent = batch
                .send(a.as_raw_fd(), &even, Some(echo.local_addr().unwrap()))
                .unwrap();
            assert_eq!(sent, even.len());
            assert_eq!(batch.bytes(2), 3);
            let rest = batch.recv(rx.as_raw_fd()).unwrap();
            assert_eq!(rest, 40 - SLOTS);
            let got = batch.recv(echo.as_raw_fd()).unwrap();
            assert_eq!(got, even.len());
            assert_eq!(batch.datagram(1).0, vec![2u8; 3]);
            assert_eq!(batch.len(), even.len());
        });
    }
}
