//! UDP forwarding: a pure session table ([`flows`]) and the socket shell that drives it
//! (`io`).

pub mod flows;
pub(super) mod io;
