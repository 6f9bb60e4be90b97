//! The integration tests' harness, shared by every module of the one test crate: fake sources
//! on the real payloads (a Marathon in [`marathon`], a Mesos master in [`mesos`], both served
//! by [`fake`]), a controller in the test's process following one ([`ctl`]), apps files
//! ([`apps`]), small real backends ([`backends`]), child processes killed by PID on drop
//! ([`process`]), throw-away network namespaces ([`netns`]), a whole cluster in them
//! ([`cluster`]), and DC/OS strict mode's fake ACS, keys and CA ([`acs`]).

#[macro_use]
pub mod netns;
pub mod acs;
pub mod apps;
pub mod backends;
pub mod cluster;
pub mod ctl;
pub mod fake;
pub mod marathon;
pub mod mesos;
pub mod process;

use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_l4lb");

/// Where the l4lb processes this test run spawns save their tables (`L4LB_STATE_DIR`, set by
/// [`process::Proc::spawn`] and [`netns::NetNs::command`]): a directory of this run's own under
/// Cargo's test scratch space, so a killed agent's saved table never reaches a later run
/// (agents in the host namespace would all share `/run/l4lb/minuteman.<netns>.table.json`).
/// Directories of runs that are gone are removed on first use.
pub fn state_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(entries) = std::fs::read_dir(base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("l4lb-state-")
                    && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(format!("l4lb-state-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

/// `l4lb check <args>`: it must exit 0; the table it prints, as JSON.
pub fn check_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .arg("check")
        .args(args)
        .output()
        .expect("run l4lb check");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("check prints JSON")
}

/// GET `url` and parse its JSON body; panics on any failure (the tests' one-line fetch).
pub async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    let r = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    r.json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// GET `url`: its body as text; panics on any failure.
pub async fn get_text(url: &str) -> String {
    let r = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    r.text().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Make `cmd` run the proxy data plane unless it asks for one (`--data-plane` or
/// `L4LB_DATA_PLANE`): the default (`auto`) would attach the kernel path to the host's cgroup2
/// root for every socket on the machine, under one pin directory that concurrent tests share.
/// Tests of the kernel path ask for it with `--bpf-netns-only` and a BPF filesystem of their own.
pub fn proxy_unless_asked(cmd: &mut std::process::Command) {
    let asked = cmd.get_args().any(|a| a == "--data-plane")
        || cmd.get_envs().any(|(k, _)| k == "L4LB_DATA_PLANE");
    if !asked {
        cmd.env("L4LB_DATA_PLANE", "proxy");
    }
}

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
