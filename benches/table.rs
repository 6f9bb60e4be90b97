//! Control-plane costs: building a table from a Marathon snapshot, re-building after one app
//! changed, and diffing two large tables.

#![allow(clippy::unwrap_used)] // a bench that fails should stop at once

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use l4lb::model::{Backend, BackendState, Protocol, Vip, VipKey, VipTable, diff};
use l4lb::source::HostCache;
use l4lb::source::marathon::apps::app_contribution;
use l4lb::source::marathon::apps::contributions;
use l4lb::source::marathon::types::{parse_app, parse_apps};
use l4lb::source::state::{BuildConfig, TableState};
use serde_json::json;

fn app(i: usize, tasks: usize) -> serde_json::Value {
    let tasks: Vec<_> = (0..tasks)
        .map(|t| {
            json!({"id": format!("app{i}.{t}"), "host": format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256),
                   "ports": [20000 + t], "state": "TASK_RUNNING", "healthCheckResults": [{"alive": true}]})
        })
        .collect();
    json!({"id": format!("/app{i}"), "healthChecks": [{"protocol": "TCP"}],
           "portDefinitions": [{"port": 0, "protocol": "tcp", "labels": {"VIP_0": format!("/app{i}:80")}}],
           "tasks": tasks})
}

fn snapshot(apps: usize, tasks: usize) -> Vec<u8> {
    let apps: Vec<_> = (0..apps).map(|i| app(i, tasks)).collect();
    serde_json::to_vec(&json!({ "apps": apps })).unwrap_or_default()
}

fn big_table(vips: usize, backends: usize) -> VipTable {
    VipTable::new(
        1,
        (0..vips).map(|i| Vip {
            key: VipKey {
                ip: std::net::Ipv4Addr::from(0x0b00_0000u32 + i as u32).into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            name: None,
            backends: (0..backends)
                .map(|b| Backend {
                    addr: std::net::SocketAddr::new(
                        std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32).into(),
                        20000 + b as u16,
                    ),
                    state: BackendState::Active,
                    app: format!("/app{i}").into(),
                    task: format!("app{i}.{b}").into(),
                })
                .collect(),
        }),
    )
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("table");
    g.sample_size(10);
    let body = snapshot(10_000, 3);
    let hosts = HostCache::default();
    g.bench_function("snapshot_10k_apps_x3_tasks", |b| {
        b.iter(|| {
            let (contribs, _) = contributions(black_box(&body), &hosts).unwrap_or_default();
            let mut st = TableState::new(BuildConfig::default(), 1);
            st.replace_all(contribs);
            black_box(st.rebuild(0).table)
        })
    });

    let (contribs, _) = contributions(&snapshot(10_000, 10), &hosts).unwrap_or_default();
    let mut st = TableState::new(BuildConfig::default(), 1);
    st.replace_all(contribs);
    let _ = st.rebuild(0);
    // Alternate between 11 and 10 tasks so every iteration is a real one-backend change.
    let versions = [
        serde_json::to_vec(&json!({"app": app(77, 10)})).unwrap_or_default(),
        serde_json::to_vec(&json!({"app": app(77, 11)})).unwrap_or_default(),
    ];
    let mut flip = 0usize;
    g.bench_function("one_app_change_on_10k_vips_x10", |b| {
        b.iter(|| {
            flip += 1;
            let a = parse_app(black_box(&versions[flip % 2])).unwrap_or_default();
            st.upsert(app_contribution(&a, &mut |_| None));
            let t = st.rebuild(0).table;
            assert!(t.is_some(), "every iteration changes the table");
            black_box(t)
        })
    });

    let old = big_table(10_000, 10);
    let mut changed = old.clone();
    let key = *changed.vips.keys().nth(5000).unwrap_or(&VipKey {
        ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
        port: 0,
        protocol: Protocol::Tcp,
    });
    if let Some(v) = changed.vips.get(&key) {
        let mut v = (**v).clone();
        v.backends.pop();
        changed.vips.insert(key, std::sync::Arc::new(v));
    }
    g.bench_function("diff_10k_vips_x10_shared", |b| {
        b.iter(|| black_box(diff(&old, &changed)))
    });
    let unshared = VipTable::new(2, changed.vips.values().map(|v| (**v).clone()));
    g.bench_function("diff_10k_vips_x10_unshared", |b| {
        b.iter(|| black_box(diff(&old, &unshared)))
    });
    let (apps, _) = parse_apps(&body).unwrap_or_default();
    g.bench_function("parse_10k_apps_x3_tasks", |b| {
        b.iter(|| black_box(parse_apps(black_box(&body)).map(|a| a.0.len())))
    });
    drop(apps);
    g.finish();
}

criterion_group!(table, benches);
criterion_main!(table);
