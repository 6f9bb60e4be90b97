//! UDP forwarding: a pure session table ([`flows`]) and the socket shell that drives it
//! (`io`), which moves datagrams in `recvmmsg`/`sendmmsg` batches (`batch`).

mod batch;
pub mod flows;
pub(super) mod io;
