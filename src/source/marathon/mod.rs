//! Following Marathon: payload types, apps and pods read into VIP entries, the SSE event
//! stream, an HTTP client with fail-over between masters, and the sync loop that keeps the
//! [`Publisher`](crate::source::Publisher)'s table current. Uses the sources' neutral core
//! (`http`, `entries`), never `mesos`.

pub mod apps;
pub mod client;
pub mod events;
pub mod pods;
pub mod sync;
pub mod types;
