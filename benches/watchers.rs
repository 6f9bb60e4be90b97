//! Controller fan-out: one controller API (`l4lb::api::serve` over a watch channel, as
//! tests/it/common/ctl.rs wires it) with 1,000 agents watching it through blocking queries
//! (`GET /v1/vips/delta?index=N&wait=30s` as agents do, or the whole `/v1/vips` with
//! `BENCH_FULL=1`; one HTTP/1.1 connection each, on loopback). Measures the
//! time from publishing a new version of a 10,000-VIP table to every watcher having received
//! the whole body.
//!
//! The controller runs in its own process (this bench started again with
//! `BENCH_ROLE=controller`, told on its stdin to publish each version), so that its memory is
//! measured apart from the watchers' and each side has the whole descriptor limit: 10,000
//! watchers fit under a hard limit of 20,000.
//!
//! The first fetch is a resync storm: every watcher asks for the whole table at once, as
//! after a controller restart. It reports how long until all hold it and how far the
//! controller's peak RSS rose meanwhile (`VmHWM`, reset through `clear_refs` just before), and
//! fails when either passes its bound (`BENCH_MAX_STORM_MS`, `BENCH_MAX_STORM_MIB`).
//!
//! `harness = false`: prints a summary on stderr and one JSON line on stdout.
//! `BENCH_WATCHERS`, `BENCH_VIPS`, `BENCH_BACKENDS`, `BENCH_ROUNDS` change the sizes.

#![allow(clippy::unwrap_used)] // a bench that fails should stop at once

mod common;
use common::raise_nofile;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use l4lb::api::limits::ApiRole;
use l4lb::api::{self, ApiLimits, ApiMetrics, ApiState, INDEX_HEADER, Readiness};
use l4lb::model::{Backend, BackendState, Protocol, Vip, VipKey, VipName, VipTable};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn table(version: u64, vips: usize, backends: usize, bump: u16) -> VipTable {
    VipTable::new(
        version,
        (0..vips).map(|i| Vip {
            key: VipKey {
                ip: Ipv4Addr::from(0xc612_8000u32 + i as u32).into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            name: Some(VipName {
                label: format!("app{i}"),
                framework: "marathon".into(),
            }),
            backends: (0..backends)
                .map(|b| Backend {
                    addr: SocketAddr::new(
                        Ipv4Addr::new(198, 18, (i / 256) as u8, (i % 256) as u8).into(),
                        // One backend of VIP 0 moves with every version.
                        20000 + b as u16 + if i == 0 && b == 0 { bump } else { 0 },
                    ),
                    state: BackendState::Active,
                    app: format!("/app{i}").into(),
                    task: format!("app{i}.{b}.6ca8-11e7-beb2-0e2beceebfcc").into(),
                })
                .collect(),
        }),
    )
}

/// `VmRSS` and `VmHWM` (peak) of process `pid`, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The controller's side: serve the table on loopback, print the address, then publish
/// version `v` (one backend of VIP 0 moved) for each `v` read on stdin; end at its end.
fn controller(vips: usize, backends: usize, watchers: usize) {
    use std::io::BufRead;
    raise_nofile(watchers as u64 + 1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    rt.block_on(async move {
        let (tx, rx) = l4lb::source::table_channel();
        tx.send_replace(Arc::new(table(1, vips, backends, 0)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        // A controller's API: its cap follows the descriptor limit (a node's takes 1/8).
        let state = ApiState::new(rx, Arc::new(Registry::default()), Readiness::default())
            .with_limits(
                ApiLimits::for_role(ApiRole::Controller, None),
                ApiMetrics::default(),
            );
        #[allow(clippy::print_stdout)]
        {
            println!("{}", listener.local_addr().unwrap());
        }
        tokio::spawn(api::serve(listener, state, shutdown.clone()));
        let lines = tokio::task::spawn_blocking(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(v) = line.unwrap_or_default().trim().parse::<u64>() else {
                    break;
                };
                // As a controller publishes: the new table shares every unchanged VIP.
                let current = tx.borrow().clone();
                let next = table(v, vips, backends, v as u16).share_with(&current);
                tx.send_replace(Arc::new(next));
            }
        });
        let _ = lines.await;
        shutdown.cancel();
    });
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[allow(clippy::print_stdout)]
fn main() {
    // `cargo bench` passes `--bench`; under `cargo test` (CI) run a small smoke configuration.
    let full = std::env::args().any(|a| a == "--bench");
    let watchers = env_or("BENCH_WATCHERS", if full { 1000 } else { 20 });
    let vips = env_or("BENCH_VIPS", if full { 10_000 } else { 100 });
    let backends = env_or("BENCH_BACKENDS", 10);
    let rounds = env_or("BENCH_ROUNDS", if full { 5 } else { 2 });
    // Agents follow `/v1/vips/delta` (only the change); `BENCH_FULL=1` measures plain
    // `/v1/vips` (the whole table per change, as DC/OS clients poll it).
    let path = if std::env::var_os("BENCH_FULL").is_some() {
        "v1/vips"
    } else {
        "v1/vips/delta"
    };
    if std::env::var_os("BENCH_ROLE").is_some_and(|r| r == "controller") {
        return controller(vips, backends, watchers);
    }
    raise_nofile(watchers as u64 + 1024);
    let mut ctl = std::process::Command::new(std::env::current_exe().unwrap())
        .env("BENCH_ROLE", "controller")
        .env("BENCH_WATCHERS", watchers.to_string())
        .env("BENCH_VIPS", vips.to_string())
        .env("BENCH_BACKENDS", backends.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = ctl.id();
    let mut publish = ctl.stdin.take().unwrap();
    let addr: SocketAddr = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(ctl.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim().parse().unwrap()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    rt.block_on(async move {
        // Every watcher records the highest version it has fully received.
        let received = Arc::new(AtomicUsize::new(0));
        let target = Arc::new(AtomicU64::new(1));
        let body_len = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let client = l4lb::tls::client_builder()
            .pool_max_idle_per_host(usize::MAX)
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        // Nothing is serialised yet: like a restarted controller, the storm also builds the
        // body.
        let (ctl_base, _) = rss_kib(pid);
        let (own_base, _) = rss_kib(std::process::id());
        // From here each VmHWM is the peak since now.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let t = Instant::now();
        for _ in 0..watchers {
            let (client, received, target, body_len, errors) = (
                client.clone(),
                Arc::clone(&received),
                Arc::clone(&target),
                Arc::clone(&body_len),
                Arc::clone(&errors),
            );
            tokio::spawn(async move {
                let mut index = 0u64;
                loop {
                    let url = if index == 0 {
                        format!("http://{addr}/{path}")
                    } else {
                        format!("http://{addr}/{path}?index={index}&wait=30s")
                    };
                    let r = match client.get(url).send().await {
                        Ok(r) => r,
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("first client error: {e:?}");
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let v: u64 = r
                        .headers()
                        .get(INDEX_HEADER)
                        .and_then(|h| h.to_str().ok())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    // Stream the body and drop it chunk by chunk, as a parser would consume
                    // it; holding 1,000 copies of a 13 MiB body would measure the harness.
                    let mut r = r;
                    let mut len = 0u64;
                    let complete = loop {
                        match r.chunk().await {
                            Ok(Some(c)) => len += c.len() as u64,
                            Ok(None) => break true,
                            Err(_) => break false,
                        }
                    };
                    if !complete {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    body_len.store(len, Ordering::Relaxed);
                    if v > index {
                        index = v;
                        if v >= target.load(Ordering::Acquire) {
                            received.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
            });
        }
        // Everyone has the first version.
        while received.load(Ordering::Acquire) < watchers {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let initial = t.elapsed();
        let (_, ctl_peak) = rss_kib(pid);
        let (_, own_peak) = rss_kib(std::process::id());
        let storm_mib = ctl_peak.saturating_sub(ctl_base) as f64 / 1024.0;
        let clients_mib = own_peak.saturating_sub(own_base) as f64 / 1024.0;
        let body = body_len.load(Ordering::Relaxed);
        eprintln!(
            "resync storm: {watchers} watchers fetched the whole {vips}-VIP x {backends}-backend table ({:.1} MiB) in {:.2} s; \
             the controller's peak RSS {ctl_peak} KiB, +{storm_mib:.0} MiB ({:.1} KiB a watcher); the watchers' process +{clients_mib:.0} MiB",
            body as f64 / (1 << 20) as f64,
            initial.as_secs_f64(),
            storm_mib * 1024.0 / watchers as f64,
        );
        // Bounds that scale with the storm: its time with the bytes moved (every watcher the
        // whole body, both ends on this machine's cores), the controller's memory with the
        // watchers. Measured (debug build, 2 cores at a load of ~8 from other builds):
        // 10,000 watchers of the 1,000-VIP table (1.3 MiB) in 113 s, 8.9 ms a MiB moved; the
        // controller's peak +162 MiB, 16.6 KiB a watcher (2,000: 7.1 s, +40 MiB).
        let moved_mib = (body as f64 * watchers as f64) / f64::from(1 << 20);
        let max_ms = env_or("BENCH_MAX_STORM_MS", 5_000 + (moved_mib * 20.0) as usize);
        let max_mib = env_or("BENCH_MAX_STORM_MIB", 64 + watchers * 24 / 1024);
        assert!(
            initial.as_millis() <= max_ms as u128,
            "the resync storm took {initial:?}, over BENCH_MAX_STORM_MS={max_ms}"
        );
        assert!(
            storm_mib <= max_mib as f64,
            "the resync storm raised the controller's peak RSS {storm_mib:.0} MiB, over BENCH_MAX_STORM_MIB={max_mib}"
        );
        // Give every watcher time to park its blocking query.
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut samples = Vec::new();
        for r in 0..rounds {
            let version = 2 + r as u64;
            received.store(0, Ordering::Release);
            target.store(version, Ordering::Release);
            let t0 = Instant::now();
            {
                use std::io::Write;
                writeln!(publish, "{version}").unwrap();
                publish.flush().unwrap();
            }
            while received.load(Ordering::Acquire) < watchers
                && t0.elapsed() < Duration::from_secs(120)
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if received.load(Ordering::Acquire) < watchers {
                eprintln!(
                    "round {r}: only {} of {watchers} got version {version} within 120 s",
                    received.load(Ordering::Acquire)
                );
                break;
            }
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            eprintln!("round {r}: all {watchers} watchers had version {version} after {ms:.0} ms");
            samples.push(ms);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // (Errors after this are the watchers' connections closing with the controller.)
        let client_errors = errors.load(Ordering::Relaxed);
        drop(publish);
        let _ = ctl.wait();
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({
                "path": path,
                "watchers": watchers,
                "vips": vips,
                "backends_per_vip": backends,
                "body_bytes": body,
                "initial_fetch_ms": (initial.as_secs_f64() * 1e3).round(),
                "storm_controller_peak_rss_kib": ctl_peak,
                "storm_controller_rss_rise_mib": storm_mib.round(),
                "storm_watchers_rss_rise_mib": clients_mib.round(),
                "rounds_ms": samples.iter().map(|m| m.round()).collect::<Vec<_>>(),
                "p50_ms": percentile(&sorted, 0.5).round(),
                "max_ms": sorted.last().copied().unwrap_or(f64::NAN).round(),
                "client_errors": client_errors,
            })
        );
    });
}
