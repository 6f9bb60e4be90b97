//! l4lb: a Layer-4 virtual-IP load balancer for Marathon clusters.
#![warn(clippy::unwrap_used)]
pub mod agent;
pub mod alloc;
pub mod api;
pub mod app;
pub mod config;
pub mod labels;
pub mod model;
pub mod source;
pub mod tls;
