//! l4lb: a Layer-4 virtual-IP load balancer for Marathon and Mesos clusters, in the style of
//! DC/OS's minuteman.
//!
//! ```text
//! Marathon ──REST snapshot + SSE──> source ──watch<Arc<VipTable>>──> agent ──> netif (addresses)
//!   (or Mesos SUBSCRIBE,          (controller)        │                    ├─> forward (TCP splice, UDP)
//!    or an apps file)                                 │                    │
//!                                                     └──> api (/v1/vips)  └─> dns
//! ```
//!
//! Sources build immutable, versioned [`model::VipTable`]s and publish them on a
//! `tokio::sync::watch` channel; the agent applies each as a diff (address → listener → DNS);
//! the API serves tables and metrics. `source`, `agent` and `api` depend on `model` and never
//! import each other; `app` is the only place that wires them, with `node` (an agent's parts,
//! step by step) and `tasks` (the supervisor); `cli` holds the client subcommands and `exit`
//! the exit status of every failure.

pub mod agent;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod exit;
pub mod heap;
pub mod labels;
pub mod model;
pub mod node;
pub mod sd_notify;
pub mod source;
pub mod tasks;
pub mod tls;
pub mod upgrade;
pub mod vip_alloc;
