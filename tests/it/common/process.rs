//! Child processes of the tests: [`Proc`] starts one with its stderr collected in a [`Log`]
//! (searchable while it runs, printed if the test panics) and SIGKILLs and reaps it by PID on
//! drop, so no test leaves a process behind whatever fails.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A child process (usually `ip netns exec <ns> prog`, which execs: the PID is the program's)
/// whose stderr is collected; SIGKILLed and reaped on drop.
pub struct Proc {
    pub what: String,
    child: Child,
    exited: Option<ExitStatus>,
    log: Log,
}

impl Proc {
    pub fn spawn(what: &str, mut cmd: impl std::borrow::BorrowMut<Command>) -> Proc {
        let cmd = cmd.borrow_mut();
        super::proxy_unless_asked(cmd);
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("L4LB_STATE_DIR", super::state_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let log = Log::capture(&mut child);
        Proc {
            what: what.to_string(),
            child,
            exited: None,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status, if it has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().unwrap();
            if self.exited.is_some() {
                self.log.wait_end(Duration::from_secs(2));
            }
        }
        self.exited
    }

    /// Send `sig` unless the process has already been reaped (its PID may be reused).
    pub fn signal(&mut self, sig: Signal) {
        if self.try_exit().is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }

    #[track_caller]
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.what);
        super::wait_for(&what, within, Duration::from_millis(10), || self.try_exit())
    }

    /// The stderr lines collected so far (a handle that stays valid after the process ends).
    pub fn log(&self) -> Log {
        self.log.clone()
    }

    pub fn log_has(&self, needle: &str) -> bool {
        self.log.count(needle) > 0
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// SIGTERM, then require a clean exit (code 0) within `within`, showing the log if not.
    #[track_caller]
    pub fn stop_cleanly(&mut self, within: Duration) {
        self.signal(Signal::SIGTERM);
        self.expect_exit(0, within);
    }

    /// Require an exit with `code` within `within`, showing the log if not.
    #[track_caller]
    pub fn expect_exit(&mut self, code: i32, within: Duration) {
        let status = self.exit_within(within);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(code),
            "{}:\n{}",
            self.what,
            self.log_text()
        );
    }

    /// Wait for exit up to `within`; `None` if it is still running then.
    pub fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if start.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[track_caller]
    pub fn wait_log(&mut self, needle: &str, within: Duration) {
        let what = format!("logging {needle:?}");
        self.wait_alive(&what, within, Duration::from_millis(10), |p| {
            p.log_has(needle)
        });
    }

    /// Poll `done` every `every` until it holds; panic with the log if the process exits
    /// first or `within` passes.
    #[track_caller]
    pub fn wait_alive(
        &mut self,
        what: &str,
        within: Duration,
        every: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) {
        let start = Instant::now();
        while !done(self) {
            if let Some(st) = self.try_exit() {
                panic!(
                    "{} exited ({st}) before {what}:\n{}",
                    self.what,
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < within,
                "{}: not {what} within {within:?}:\n{}",
                self.what,
                self.log_text()
            );
            std::thread::sleep(every);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.what, self.log_text());
        }
    }
}

/// Lines a child writes to stderr, collected by a thread, searchable while it runs.
/// (The second field is set once the child's stderr reached its end.)
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>, Arc<AtomicBool>);

impl Log {
    /// Start collecting `child`'s stderr (which must be piped).
    pub fn capture(child: &mut Child) -> Log {
        let log = Log::default();
        let stderr = child.stderr.take().expect("stderr piped");
        let (lines, ended) = (log.0.clone(), log.1.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("L4LB_TEST_ECHO").is_some() {
                    eprintln!("{line}");
                }
                lines.lock().expect("log lock").push(line);
            }
            ended.store(true, Ordering::SeqCst);
        });
        log
    }

    /// Wait up to `within` for the end of the child's stderr: after its exit, what it wrote
    /// last may still be on its way through the pipe. (A grandchild holding the pipe keeps it
    /// open; the wait is bounded for that.)
    fn wait_end(&self, within: Duration) {
        let start = Instant::now();
        while !self.1.load(Ordering::SeqCst) && start.elapsed() < within {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The `addr=` value of the first line containing `marker`, waiting up to `within`.
    pub fn addr(&self, marker: &str, within: Duration) -> SocketAddr {
        let line = self.wait_for(marker, within);
        line.split("addr=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr= in {line:?}"))
    }

    /// Wait for a line containing `marker`.
    pub fn wait_for(&self, marker: &str, within: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self
                .0
                .lock()
                .expect("log lock")
                .iter()
                .find(|l| l.contains(marker))
            {
                return l.clone();
            }
            if t.elapsed() > within {
                panic!(
                    "no log line with {marker:?} within {within:?}; log:\n{}",
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn count(&self, marker: &str) -> usize {
        self.0
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(marker))
            .count()
    }

    pub fn text(&self) -> String {
        self.0.lock().expect("log lock").join("\n")
    }
}
