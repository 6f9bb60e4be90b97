//! Propagation delay, end to end: a Marathon event at a fake Marathon → the first client
//! connection through the VIP served by the new backend, measured against the real `l4lb run
//! --marathon` binary on loopback (`--interface-kind none`, a 127.0.0.0/8 IP VIP). Each change
//! moves the app's only task to the other of two backends and emits a `status_update_event`;
//! a client then connects through the VIP in a tight loop until the new backend answers.
//!
//! `harness = false`: prints one JSON line (`p50_ms`, `p99_ms`, …) last, for scripts/bench.sh.
//! `BENCH_CHANGES` sets the number of changes (default 100); `L4LB_BIN` overrides the binary.

#![allow(clippy::unwrap_used)] // a bench that fails should stop at once

// The fake Marathon of the integration tests and the server it runs on (a bench cannot
// import a test crate); this bench uses a part of them.
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/it/common/fake.rs"]
mod fake;
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/it/common/marathon.rs"]
mod marathon;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use marathon::{FakeMarathon, add_task, host_app, task};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A child process killed on drop, with the directory it saves its table in.
struct Proc {
    child: Child,
    /// Removed after the child is gone (fields drop after `drop`).
    _state: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend that writes its one-byte id to every client and closes.
async fn backend(id: u8) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(&[id]).await;
            });
        }
    });
    addr
}

/// Which backend answers through the VIP right now, if any.
async fn probe(vip: SocketAddr) -> Option<u8> {
    let mut s = TcpStream::connect(vip).await.ok()?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut b)).await {
        Ok(Ok(_)) => Some(b[0]),
        _ => None,
    }
}

fn app_on(vip: SocketAddr, backend: SocketAddr, n: usize) -> serde_json::Value {
    let label = vip.to_string();
    let mut app = host_app("/prop", &[label.as_str()], "tcp");
    add_task(
        &mut app,
        task(
            "/prop",
            n,
            &backend.ip().to_string(),
            &[backend.port()],
            "TASK_RUNNING",
        ),
    );
    app
}

fn start_l4lb(marathon: &str) -> Proc {
    let bin = std::env::var("L4LB_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_l4lb").to_string());
    // Killed at the end: its saved table must not reach a later agent in this namespace.
    let state = tempfile::tempdir().expect("a state directory");
    let mut child = Command::new(bin)
        .args([
            "--worker-threads",
            "1",
            "run",
            "--marathon",
            marathon,
            // The proxy: the kernel path would attach to the host's cgroup2 root and act on
            // every socket of the machine (and a killed agent's pins keep it attached).
            "--data-plane",
            "proxy",
            "--interface-kind",
            "none",
            "--allow-loopback-vips",
            "--api-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
            "--vip-cidr",
            "198.18.128.0/17",
        ])
        .env("RUST_LOG", "info")
        .env("L4LB_STATE_DIR", state.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start l4lb");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("first table applied; ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("l4lb never logged 'first table applied; ready'");
    Proc {
        child,
        _state: state,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[allow(clippy::print_stdout)]
fn main() {
    let changes: usize = std::env::var("BENCH_CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let backends = [backend(b'A').await, backend(b'B').await];
        // A free port on the VIP address (loopback: local without any setup).
        let vip: SocketAddr = {
            let l = std::net::TcpListener::bind("127.77.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let fake = FakeMarathon::start().await;
        fake.put_app(app_on(vip, backends[0], 0));
        let _l4lb = start_l4lb(&fake.url());
        // Wait until the VIP serves the first backend.
        let t = Instant::now();
        while probe(vip).await != Some(b'A') {
            assert!(t.elapsed() < Duration::from_secs(10), "VIP never served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut samples = Vec::with_capacity(changes);
        let mut timeouts = 0;
        for n in 1..=changes {
            let which = n % 2;
            let want = [b'A', b'B'][which];
            let app = app_on(vip, backends[which], n);
            let task_id = app["tasks"][0]["id"].as_str().unwrap_or("").to_string();
            fake.put_app(app);
            let t0 = Instant::now();
            fake.emit_status("/prop", &task_id, "TASK_RUNNING");
            loop {
                if probe(vip).await == Some(want) {
                    samples.push(t0.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                if t0.elapsed() > Duration::from_secs(5) {
                    timeouts += 1;
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            // Let the old backend's draining connections and the sync loop settle.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        samples.sort_by(f64::total_cmp);
        let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
        eprintln!(
            "propagation over {} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {timeouts} timeouts",
            samples.len(),
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            samples.last().copied().unwrap_or(f64::NAN)
        );
        println!(
            "{}",
            serde_json::json!({
                "changes": changes,
                "measured": samples.len(),
                "timeouts": timeouts,
                "p50_ms": (percentile(&samples, 0.5) * 100.0).round() / 100.0,
                "p99_ms": (percentile(&samples, 0.99) * 100.0).round() / 100.0,
                "max_ms": (samples.last().copied().unwrap_or(f64::NAN) * 100.0).round() / 100.0,
                "mean_ms": (mean * 100.0).round() / 100.0,
            })
        );
    });
}
