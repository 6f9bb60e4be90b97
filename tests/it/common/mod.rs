//! The integration tests' harness, shared by every module of the one test crate: a fake
//! Marathon on the real payloads ([`marathon`]), a fake Mesos master ([`mesos`]), small real backends ([`backends`]), child
//! processes killed by PID on drop ([`process`]), throw-away network namespaces ([`netns`]) and
//! a whole cluster in them ([`cluster`]).

#[macro_use]
pub mod netns;
pub mod backends;
pub mod cluster;
pub mod marathon;
pub mod mesos;
pub mod process;

use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_l4lb");

/// Poll `f` every `every` until it returns `Some` or `within` passes (then panic with `what`).
#[track_caller]
pub fn wait_for<T>(
    what: &str,
    within: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}
