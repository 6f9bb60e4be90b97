//! The integration tests: one test crate (one binary to build and link), a module per area,
//! all sharing the harness in [`common`]. Root-only tests (network namespaces, real links)
//! skip with a note when not run as root.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

#[macro_use]
mod common;

mod agent;
mod cli;
mod cluster;
mod controller;
mod dns;
mod docs;
mod families;
mod fleet;
mod follow;
mod harden;
mod heal;
mod memory;
mod mesos;
mod netif;
mod ops;
mod pods;
mod resolvers;
mod strict;
mod takeover;
