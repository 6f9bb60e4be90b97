//! Network-namespace helpers for root end-to-end tests (test harness only, not product code).
//!
//! Built on the `ip` command. Include with `#[path = "common/netns.rs"] mod netns;`.
//! [`NetNs`] is a throw-away namespace deleted on drop, [`Switch`] joins namespaces through a
//! bridge over veth pairs, [`NetNs::run`] runs an async closure inside a namespace, and
//! `skip_unless_root!` lets a test pass with a note when not root.

use std::fs::File;
use std::future::Future;
use std::io;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Return early from a test, with a note on stderr, unless running as root.
macro_rules! skip_unless_root {
    () => {
        if !::nix::unistd::Uid::effective().is_root() {
            eprintln!(
                "note: skipping {}:{}: needs root (network namespaces)",
                file!(),
                line!()
            );
            return;
        }
    };
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Run a command to completion and panic with its output if it fails.
#[track_caller]
pub(crate) fn run_ok(args: &[&str]) -> Output {
    let (prog, rest) = args.split_first().expect("empty command");
    let out = Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A uniquely named network namespace (`l4lb-<prefix>-<pid>-<n>`) with `lo` up. Dropping it
/// kills the processes started with [`NetNs::spawn`] and deletes the namespace.
#[derive(Debug)]
pub(crate) struct NetNs {
    name: String,
    pids: Mutex<Vec<u32>>,
}

impl NetNs {
    #[track_caller]
    pub(crate) fn new(prefix: &str) -> NetNs {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("l4lb-{prefix}-{}-{n}", std::process::id());
        run_ok(&["ip", "netns", "add", &name]);
        let ns = NetNs {
            name,
            pids: Mutex::new(Vec::new()),
        };
        run_ok(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A namespace whose host address `cidr` (e.g. `198.18.0.1/15`) is on a bridge `eth0`,
    /// up (a bridge, because this kernel has no dummy links).
    pub(crate) fn with_eth0(prefix: &str, cidr: &str) -> NetNs {
        let ns = NetNs::new(prefix);
        ns.exec_ok(&["ip", "link", "add", "eth0", "type", "bridge"]);
        ns.exec_ok(&["ip", "addr", "add", cidr, "dev", "eth0"]);
        ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        ns
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Run `args` inside the namespace and wait for it (does not check the exit status).
    #[track_caller]
    pub(crate) fn exec(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawning {args:?} in {}: {e}", self.name))
    }

    /// GET `url` with curl inside the namespace (2 s at most): the JSON body, if any.
    pub(crate) fn get_json(&self, url: &str) -> Option<serde_json::Value> {
        let out = self.exec(&["curl", "-sS", "--max-time", "2", url]);
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `dig +short` inside the namespace for `name` of `qtype` at 127.0.0.1:`port`: the
    /// answer's lines.
    pub(crate) fn dig_short(&self, port: u16, name: &str, qtype: &str) -> Vec<String> {
        let port = port.to_string();
        let out = self.exec_ok(&[
            "dig",
            "+short",
            "+tries=1",
            "+time=2",
            "-p",
            &port,
            "@127.0.0.1",
            name,
            qtype,
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Like [`NetNs::exec`] but panics, with the output, unless the command succeeds.
    #[track_caller]
    pub(crate) fn exec_ok(&self, args: &[&str]) -> Output {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed ({}): {}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A command that runs `program` inside the namespace (`ip netns exec <ns> program`);
    /// add arguments, environment and stdio, then [`NetNs::spawn`] or run it.
    pub(crate) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .env("L4LB_STATE_DIR", super::state_dir());
        super::proxy_unless_asked(&mut cmd);
        cmd
    }

    /// Spawn `cmd` (normally from [`NetNs::command`]) and remember its PID so that dropping
    /// the namespace kills it. `ip netns exec` execs the program, so the PID is the program's.
    pub(crate) fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let child = cmd.spawn()?;
        self.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(child)
    }

    /// Run `f` inside the namespace on a fresh thread with a current-thread tokio runtime and
    /// return its output (a panic in `f` is propagated). Call from a plain `#[test]`.
    pub(crate) fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            setns(&fd, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a tokio runtime")
                .block_on(f())
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let pids = std::mem::take(self.pids.get_mut().unwrap_or_else(|e| e.into_inner()));
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                // Already gone (ESRCH) is fine.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // What killed agents left under /run/l4lb for this namespace (lock files, saved
        // tables): named by the namespace's inode, which no later namespace is sure not to get.
        if let Ok(m) = std::fs::metadata(format!("/run/netns/{}", self.name)) {
            let tag = format!(".{}.", std::os::unix::fs::MetadataExt::ino(&m));
            for dir in ["/run/l4lb".into(), super::state_dir().to_path_buf()] {
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if e.file_name().to_string_lossy().contains(&tag) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: deleting netns {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("warning: deleting netns {}: {e}", self.name),
        }
    }
}

/// A namespace holding one bridge `br0`: a layer-2 segment that hosts join with
/// [`Switch::attach`]. Only use addresses in 198.18.0.0/15.
#[derive(Debug)]
pub(crate) struct Switch {
    ns: NetNs,
}

impl Switch {
    #[track_caller]
    pub(crate) fn new(prefix: &str) -> Switch {
        let ns = NetNs::new(prefix);
        ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
        Switch { ns }
    }

    /// Join `host` to the switch with a veth pair and give the host end `addr_cidr`
    /// (e.g. `"198.18.0.2/15"`). Returns the host-side interface name (`vh<n>`).
    #[track_caller]
    pub(crate) fn attach(&self, host: &NetNs, addr_cidr: &str) -> String {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (sw_end, host_end) = (format!("vs{n}"), format!("vh{n}"));
        self.ns.exec_ok(&[
            "ip",
            "link",
            "add",
            &sw_end,
            "type",
            "veth",
            "peer",
            "name",
            &host_end,
            "netns",
            host.name(),
        ]);
        self.ns
            .exec_ok(&["ip", "link", "set", &sw_end, "master", "br0", "up"]);
        host.exec_ok(&["ip", "addr", "add", addr_cidr, "dev", &host_end]);
        host.exec_ok(&["ip", "link", "set", &host_end, "up"]);
        host_end
    }
}
