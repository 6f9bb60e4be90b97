//! The kernel path's control cost: a one-backend change on a 10,000-VIP agent, planned and
//! written to the real BPF maps. Needs root (prints a note and measures nothing otherwise).
//! The programs are attached to a cgroup this bench creates and no process joins, and
//! restricted to this process's network namespace, so nothing on the host is affected.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use l4lb::agent::bpf::{BpfConfig, Ejected, KernelPath};
use l4lb::model::{Backend, BackendState, Protocol, Vip, VipKey, VipTable};

fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr,
        state: BackendState::Active,
        app: "/app".into(),
        task: format!("app.{addr}").into(),
    }
}

fn table() -> VipTable {
    VipTable::new(
        1,
        (0..10_000u32).map(|i| Vip {
            key: VipKey {
                ip: Ipv4Addr::from(0xC612_0000 + i).into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            name: None,
            backends: (1..=3)
                .map(|b| {
                    backend(
                        format!("198.19.0.{b}:8080")
                            .parse()
                            .unwrap_or(([0, 0, 0, 0], 0).into()),
                    )
                })
                .collect(),
        }),
    )
}

fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        right
            .starts_with("cgroup2 ")
            .then(|| PathBuf::from(mount_point))
    })
}

fn bench(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bpf bench skipped: needs root");
        return;
    }
    let Some(root) = cgroup2_root() else {
        eprintln!("bpf bench skipped: no cgroup2 mount");
        return;
    };
    let tag = format!("l4lb-bench-{}", std::process::id());
    let cgroup = root.join(&tag);
    let bpffs = std::env::temp_dir().join(&tag);
    if std::fs::create_dir(&cgroup).is_err() || std::fs::create_dir(&bpffs).is_err() {
        eprintln!("bpf bench skipped: cannot create {}", cgroup.display());
        return;
    }
    let mut run = || -> Result<(), String> {
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| e.to_string())?;
        let cfg = BpfConfig {
            instance: "bench".into(),
            cgroup: Some(cgroup.clone()),
            bpffs: bpffs.clone(),
            netns_only: true,
            ..BpfConfig::default()
        };
        let mut kp = KernelPath::load(&cfg).map_err(|e| e.to_string())?;
        let none = Ejected::default();
        let mut current = Arc::new(table());
        let started = Instant::now();
        kp.apply(&current, &none).map_err(|e| e.to_string())?;
        eprintln!(
            "bpf: first apply of 10,000 VIPs x 3 backends: {:?}",
            started.elapsed()
        );
        let extra: SocketAddr = ([198, 19, 0, 9], 8080).into();
        let keys: Vec<VipKey> = current.vips.keys().copied().collect();
        let mut round = 0usize;
        c.bench_function("bpf_one_backend_change_10000_vips", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Built outside the timing, sharing every other VIP, as control-plane
                    // tables do.
                    round += 1;
                    let k = keys[round * 241 % keys.len()];
                    let mut next = (*current).clone();
                    next.version += 1;
                    if let Some(v) = next.vips.get(&k) {
                        let mut v = (**v).clone();
                        if v.backends.iter().any(|b| b.addr == extra) {
                            v.backends.retain(|b| b.addr != extra);
                        } else {
                            v.backends.push(backend(extra));
                            v.normalize();
                        }
                        next.vips.insert(k, Arc::new(v));
                    }
                    let next = Arc::new(next);
                    let started = Instant::now();
                    let _ = kp.apply(&next, &none);
                    total += started.elapsed();
                    current = next;
                }
                total
            })
        });
        kp.close().map_err(|e| e.to_string())
    };
    if let Err(e) = run() {
        eprintln!("bpf bench failed: {e}");
    }
    let _ = nix::mount::umount(&bpffs);
    let _ = std::fs::remove_dir(&bpffs);
    let _ = std::fs::remove_dir(&cgroup);
}

criterion_group!(benches, bench);
criterion_main!(benches);
