//! Mesos source costs at 10,000 tasks: reading the `SUBSCRIBED` state into a table, and one
//! `TASK_UPDATED` (a health flip) through the incremental path, with the task's name shared by
//! 3 tasks and by all 10,000.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use l4lb::source::mesos::cluster::{Applied, Cluster};
use l4lb::source::mesos::types::parse_event;
use l4lb::source::state::{BuildConfig, TableState};
use serde_json::json;

const TASKS: usize = 10_000;
const AGENTS: usize = 100;

/// A `SUBSCRIBED` with `TASKS` running tasks on `AGENTS` agents, `per_name` tasks a VIP name.
fn subscribed(per_name: usize) -> Vec<u8> {
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            json!({"name": format!("app{}", i / per_name), "task_id": {"value": format!("t{i}")},
                   "framework_id": {"value": "fw-marathon"}, "agent_id": {"value": format!("a{}", i % AGENTS)},
                   "state": "TASK_RUNNING", "statuses": [{"state": "TASK_RUNNING", "healthy": true}],
                   "discovery": {"name": format!("app{}", i / per_name), "ports": {"ports": [{"number": 20000 + i % 10000, "protocol": "tcp",
                       "labels": {"labels": [{"key": "VIP_0", "value": format!("/app{}:80", i / per_name)}]}}]}}})
        })
        .collect();
    let agents: Vec<_> = (0..AGENTS)
        .map(|a| json!({"agent_info": {"id": {"value": format!("a{a}")}, "hostname": format!("10.0.{}.{}", a / 256, a % 256)}}))
        .collect();
    serde_json::to_vec(&json!({"type": "SUBSCRIBED", "subscribed": {"get_state": {
        "get_tasks": {"tasks": tasks}, "get_agents": {"agents": agents},
        "get_frameworks": {"frameworks": [{"framework_info": {"id": {"value": "fw-marathon"}, "name": "marathon"}}]}}}}))
    .unwrap_or_default()
}

fn updated(task: usize, healthy: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({"type": "TASK_UPDATED", "task_updated": {"framework_id": {"value": "fw-marathon"},
        "state": "TASK_RUNNING", "status": {"task_id": {"value": format!("t{task}")}, "state": "TASK_RUNNING", "healthy": healthy}}}))
    .unwrap_or_default()
}

fn no_dns(_: &str) -> Option<std::net::IpAddr> {
    None
}

fn loaded(body: &[u8]) -> (Cluster, TableState) {
    let mut c = Cluster::default();
    let mut st = TableState::new(BuildConfig::default(), 1);
    if let Ok(ev) = parse_event(body) {
        c.apply(ev);
    }
    st.replace_all(c.contributions(&mut no_dns));
    st.rebuild(0);
    (c, st)
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("mesos");
    g.sample_size(10);
    let body = subscribed(3);
    g.bench_function("subscribed_10k_tasks_to_table", |b| {
        b.iter(|| {
            let (_, st) = loaded(black_box(&body));
            black_box(st.current().vips.len())
        })
    });
    for (label, per_name) in [("3_tasks_a_name", 3), ("10k_tasks_one_name", TASKS)] {
        let (mut cluster, mut st) = loaded(&subscribed(per_name));
        let flips = [updated(TASKS / 2, false), updated(TASKS / 2, true)];
        let mut i = 0usize;
        g.bench_function(format!("task_updated_of_10k_{label}"), |b| {
            b.iter(|| {
                i += 1;
                let Ok(ev) = parse_event(&flips[i % 2]) else {
                    return;
                };
                if let (Applied::Tasks(keys), _) = cluster.apply(ev) {
                    st.update(cluster.changed(keys, &mut no_dns));
                }
                black_box(st.rebuild(0).table.map(|t| t.version));
            })
        });
    }
    g.finish();
}

criterion_group!(mesos, benches);
criterion_main!(mesos);
