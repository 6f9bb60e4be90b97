//! Following Marathon: payload types, HTTP client with fail-over, and the sync loop.

pub mod types;
