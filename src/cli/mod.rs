//! The client subcommands: `l4lb check` (the table an apps or Mesos state file yields) and
//! `l4lb vips` (a running instance's table, for people). They read, print and exit; they start
//! no task and touch nothing on the host.

mod check;
mod vips;

pub use check::check;
pub use vips::{render_vips, vips};
