//! Data-plane hot paths: the balancer's pick, and `Forwarder::apply` of a one-backend change
//! on an agent serving 10,000 VIPs × 10 backends (must cost O(change), not O(table)).
//!
//! The VIPs are 127.1.x.y:28080, local without privileges; the bench raises RLIMIT_NOFILE to
//! hold 10,000 listeners (with `prlimit` on itself: the crate's nix has no `resource`
//! feature).

#![allow(clippy::unwrap_used)] // a bench that fails should stop at once

mod common;
use common::raise_nofile;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use l4lb::agent::forward::balancer::{self, Candidate};
use l4lb::agent::forward::{ForwardConfig, ForwardMetrics, Forwarder};
use l4lb::model::{Backend, BackendState, Protocol, Vip, VipKey, VipTable};
use prometheus_client::registry::Registry;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio_util::sync::CancellationToken;

const VIPS: usize = 10_000;
const BACKENDS: usize = 10;
const VIP_PORT: u16 = 28080;

fn vip_ip(i: usize) -> IpAddr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8).into()
}

fn vip(i: usize, backends: usize, port_base: u16) -> Vip {
    Vip {
        key: VipKey {
            ip: vip_ip(i),
            port: VIP_PORT,
            protocol: Protocol::Tcp,
        },
        name: None,
        backends: (0..backends)
            .map(|b| Backend {
                addr: SocketAddr::new(
                    Ipv4Addr::new(198, 18, (i / 256) as u8, (i % 256) as u8).into(),
                    port_base + b as u16,
                ),
                state: BackendState::Active,
                app: format!("/app{i}").into(),
                task: format!("app{i}.{b}").into(),
            })
            .collect(),
    }
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer");
    let mut rng = SmallRng::seed_from_u64(1);
    for n in [3usize, 10, 100] {
        let cands: Vec<Candidate> = (0..n).map(|i| Candidate::active(i as u64 % 7)).collect();
        g.bench_function(format!("pick_of_{n}"), |b| {
            b.iter(|| black_box(balancer::pick(black_box(&cands), &mut rng)))
        });
    }
    let mut cands: Vec<Candidate> = (0..10).map(|i| Candidate::active(i as u64)).collect();
    for c in cands.iter_mut().take(5) {
        c.ejected = true;
    }
    g.bench_function("pick_of_10_half_ejected", |b| {
        b.iter(|| black_box(balancer::pick(black_box(&cands), &mut rng)))
    });
    let mut thread = rand::rng();
    let cands: Vec<Candidate> = (0..10).map(|i| Candidate::active(i as u64 % 7)).collect();
    g.bench_function("pick_of_10_thread_rng", |b| {
        b.iter(|| black_box(balancer::pick(black_box(&cands), &mut thread)))
    });
    g.finish();
}

fn apply(c: &mut Criterion) {
    raise_nofile(VIPS as u64 + 4096);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut reg = Registry::default();
    let metrics = ForwardMetrics::new(&mut reg);
    let shutdown = CancellationToken::new();
    let mut fwd =
        rt.block_on(async { Forwarder::new(ForwardConfig::default(), metrics, shutdown.clone()) });

    // Table A: 10,000 VIPs × 10 backends. Table B: A with one backend of one VIP replaced,
    // shared with A as the agent receives it (`share_with`).
    let a = VipTable::new(1, (0..VIPS).map(|i| vip(i, BACKENDS, 20000)));
    let mut changed = vip(VIPS / 2, BACKENDS, 20000);
    changed.backends[BACKENDS - 1].addr.set_port(30000);
    let b = VipTable::new(2, (0..VIPS).map(|i| vip(i, BACKENDS, 20000)))
        .share_with(&a)
        .with_vip(changed);
    let a = VipTable::new(3, a.vips.values().map(|v| (**v).clone())).share_with(&b);

    let t = std::time::Instant::now();
    let report = rt.block_on(fwd.apply(&a));
    eprintln!(
        "initial apply of {VIPS} VIPs x {BACKENDS} backends: {:?} ({} bound, {} failed{})",
        t.elapsed(),
        report.bound.len(),
        report.failed.len(),
        report
            .failed
            .first()
            .map(|(k, e)| format!(", e.g. {k}: {e}"))
            .unwrap_or_default()
    );

    let mut g = c.benchmark_group("forwarder");
    g.sample_size(50);
    g.measurement_time(Duration::from_secs(5));
    let mut flip = false;
    g.bench_function("apply_one_backend_change_10k_vips_x10_shared", |bch| {
        bch.iter(|| {
            flip = !flip;
            let t = if flip { &b } else { &a };
            black_box(rt.block_on(fwd.apply(t)).bound.len())
        })
    });
    // The same change when the new table was not built with `share_with`: the diff must
    // compare every VIP by value.
    let b_unshared = VipTable::new(4, b.vips.values().map(|v| (**v).clone()));
    let a_unshared = VipTable::new(5, a.vips.values().map(|v| (**v).clone()));
    g.bench_function("apply_one_backend_change_10k_vips_x10_unshared", |bch| {
        bch.iter_batched(
            || (),
            |()| {
                flip = !flip;
                let t = if flip { &b_unshared } else { &a_unshared };
                black_box(rt.block_on(fwd.apply(t)).bound.len())
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    shutdown.cancel();
    rt.block_on(fwd.shutdown(Duration::from_secs(1)));
}

/// Replace one VIP of a table, keeping the `Arc`s of every other.
trait WithVip {
    fn with_vip(self, v: Vip) -> Self;
}

impl WithVip for VipTable {
    fn with_vip(mut self, mut v: Vip) -> Self {
        v.normalize();
        self.vips.insert(v.key, Arc::new(v));
        self
    }
}

criterion_group!(benches, pick, apply);
criterion_main!(benches);
