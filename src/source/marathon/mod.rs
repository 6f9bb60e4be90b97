//! Following Marathon: payload types, the SSE event stream, an HTTP client with fail-over
//! between masters, and the sync loop that keeps a [`TableState`](super::state::TableState)
//! current.

pub mod client;
pub mod events;
pub mod pods;
pub mod sync;
pub mod types;
