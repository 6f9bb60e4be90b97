use super::*;
use crate::model::VipTable;
use crate::source::entries::Rejection;
use crate::source::entries::test_util::{self, Summary, s};
use crate::source::mesos::types::parse_event;
use crate::source::state::{BuildConfig, TableState};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mesos");

fn events(file: &str) -> Vec<Event> {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{file}")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_event(l.as_bytes()).unwrap())
        .collect()
}

fn no_dns(_: &str) -> Option<IpAddr> {
    None
}

/// Publish what `applied` changed, as the sync loop does, and rebuild.
fn fold(c: &Cluster, st: &mut TableState, applied: Applied) {
    match applied {
        Applied::Full => st.replace_all(c.contributions(&mut no_dns)),
        Applied::Tasks(keys) => st.update(c.changed(keys, &mut no_dns)),
        Applied::Nothing => {}
    }
    st.rebuild(0);
}

/// The table of the cluster after every event of `file`, built twice: event by event through
/// the incremental path (only the tasks each event names), and once from scratch. Both must
/// agree; the incremental one is returned.
fn replay(file: &str) -> (Cluster, Arc<VipTable>, Vec<Rejection>) {
    replay_events(file, events(file))
}

fn replay_events(file: &str, events: Vec<Event>) -> (Cluster, Arc<VipTable>, Vec<Rejection>) {
    let mut c = Cluster::default();
    let mut inc = TableState::new(BuildConfig::default(), 1);
    for ev in events {
        let (applied, bad) = c.apply(ev);
        assert!(bad.is_empty(), "{bad:?}");
        fold(&c, &mut inc, applied);
    }
    let mut full = TableState::new(BuildConfig::default(), 1);
    full.replace_all(c.contributions(&mut no_dns));
    full.rebuild(0);
    assert!(
        inc.current().same_content(full.current()),
        "{file}: incremental {:#?}\nfull {:#?}",
        inc.current().vips,
        full.current().vips
    );
    let rejections = inc.rejections().cloned().collect();
    (c, Arc::clone(inc.current()), rejections)
}

/// The table's VIPs as text.
fn summary(t: &VipTable) -> Vec<Summary> {
    test_util::summary(t.vips.values().map(|v| &**v), false)
}

fn get_state(file: &str) -> Arc<VipTable> {
    let body = std::fs::read(format!("{FIXTURES}/{file}")).unwrap();
    let (c, bad) = Cluster::from_state(super::super::types::parse_get_state(&body).unwrap());
    assert!(bad.is_empty());
    let mut st = TableState::new(BuildConfig::default(), 1);
    st.replace_all(c.contributions(&mut no_dns));
    st.rebuild(0).table.unwrap()
}

#[test]
fn tcp_and_udp_ports_on_host_networking() {
    // One Marathon task (framework `marathon`), the label on its tcp and its udp discovery
    // port: two VIPs of one name, the agent's address and the port.
    assert_eq!(
        summary(&get_state("tcp-and-udp.json")),
        [
            s(
                "app.marathon.l4lb.thisdcos.directory",
                "80/tcp",
                &["172.17.0.3:6416 Active"]
            ),
            s(
                "app.marathon.l4lb.thisdcos.directory",
                "80/udp",
                &["172.17.0.3:6416 Active"]
            ),
        ]
    );
}

#[test]
fn a_task_whose_health_check_has_not_reported_drains_and_container_scope_uses_its_ip() {
    // The task has a health check but no status says `healthy`: unhealthy, as dcos-net reads
    // it (so draining), on its container address (network-scope container).
    assert_eq!(
        summary(&get_state("unhealthy.json")),
        [s(
            "foobar.marathon.l4lb.thisdcos.directory",
            "80/tcp",
            &["9.0.1.6:80 Draining"]
        )]
    );
}

/// operator-api.json carries no VIP labels: give every discovery port of every task one
/// (`/<task name>-<port index>:80`) to see where each networking mode's backends land.
fn labelled(file: &str) -> Vec<Event> {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{file}")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(t) = v.pointer_mut("/task_added/task") {
                let name = t["name"].as_str().unwrap().to_string();
                if let Some(ports) = t.pointer_mut("/discovery/ports/ports") {
                    for (i, p) in ports.as_array_mut().unwrap().iter_mut().enumerate() {
                        let label =
                            serde_json::json!({"key": "VIP_0", "value": format!("/{name}-{i}:80")});
                        match p.pointer_mut("/labels/labels") {
                            Some(ls) => ls.as_array_mut().unwrap().push(label),
                            None => p["labels"] = serde_json::json!({"labels": [label]}),
                        }
                    }
                }
            }
            serde_json::from_value(v).unwrap()
        })
        .collect()
}

#[test]
fn every_networking_mode_of_a_marathon_task() {
    let (c, t, r) = replay_events("operator-api.json", labelled("operator-api.json"));
    assert_eq!(c.task_count(), 12);
    assert!(r.is_empty(), "{r:?}");
    let m = |n: &str| format!("{n}.marathon.l4lb.thisdcos.directory");
    assert_eq!(
        summary(&t),
        [
            // Three tasks of one app name: host, overlay (container IP and port), bridge.
            s(
                &m("app-0"),
                "80/tcp",
                &[
                    "9.0.1.3:8080 Active",
                    "172.17.0.3:2254 Active",
                    "172.17.0.4:28064 Active"
                ]
            ),
            // Docker bridge: the agent and the host port, not the bridge address.
            s(
                &m("docker-on-bridge-0"),
                "80/tcp",
                &["172.17.0.4:20560 Active"]
            ),
            // Overlay: the address of the latest status with one, not the agent's.
            s(&m("docker-on-dcos-0"), "80/tcp", &["9.0.2.130:8080 Active"]),
            s(
                &m("docker-on-host-0"),
                "80/tcp",
                &["172.17.0.4:31168 Active"]
            ),
            // Dual-stack overlay: both addresses, so the name has an IPv4 and an IPv6 VIP,
            // each serving its own family.
            s(
                &m("docker-on-ipv6-0"),
                "80/tcp",
                &["172.19.0.2:8080 Active"]
            ),
            s(
                &m("docker-on-ipv6-0"),
                "80/tcp",
                &["[fd01:b::2:8000:0:2]:8080 Active"]
            ),
            // A container port 0 (none given): no backend.
            s(&m("none-on-dcos-0"), "80/tcp", &[]),
            s(&m("none-on-host-0"), "80/tcp", &["172.17.0.4:13977 Active"]),
            // UCR bridge: the agent and the host port, not 172.31.254.3.
            s(
                &m("ucr-on-bridge-0"),
                "80/tcp",
                &["172.17.0.3:15263 Active"]
            ),
            s(&m("ucr-on-dcos-0"), "80/tcp", &[]),
            s(&m("ucr-on-host-0"), "80/tcp", &["172.17.0.3:10323 Active"]),
        ]
    );
    // The dual-stack task's addresses, both families, are its task name's A and AAAA.
    let ipv6_task = t
        .apps
        .values()
        .flat_map(|a| &a.tasks)
        .find(|t| t.container.iter().any(|ip| ip.is_ipv6()))
        .expect("a task with an IPv6 container address");
    let ips: Vec<String> = ipv6_task.container.iter().map(|i| i.to_string()).collect();
    assert_eq!(ips, ["172.19.0.2", "fd01:b::2:8000:0:2"]);
}

/// The table after each event of `file`.
fn tables(file: &str) -> Vec<Vec<Summary>> {
    let mut c = Cluster::default();
    let mut st = TableState::new(BuildConfig::default(), 1);
    let mut out = Vec::new();
    for ev in events(file) {
        let applied = c.apply(ev).0;
        fold(&c, &mut st, applied);
        out.push(summary(st.current()));
    }
    out
}

#[test]
fn an_sdk_scheduler_task_is_drained_killed_and_replaced() {
    replay("hello-world.json");
    let t = tables("hello-world.json");
    let name = "api.hello-world.marathon.l4lb.thisdcos.directory";
    let old = "172.17.0.4:21872";
    assert_eq!(t[0], [s(name, "80/tcp", &[&format!("{old} Active")])]);
    // TASK_KILLING drains; TASK_KILLED forgets the task, and with it the name: through
    // Mesos a name lives while a task carrying it does (as in dcos-net).
    assert_eq!(t[1], [s(name, "80/tcp", &[&format!("{old} Draining")])]);
    assert_eq!(t[2], []);
    // The replacement is added: the name is back (staging: not yet a backend), then runs.
    assert_eq!(t[3], [s(name, "80/tcp", &[])]);
    let new = t[6][0].2.clone();
    assert_eq!(new.len(), 1);
    assert!(
        new[0].ends_with(" Active") && !new[0].starts_with(old),
        "{new:?}"
    );
    // Killed at the end: nothing left to serve, and the name is gone with its last task.
    assert_eq!(t.last().unwrap(), &Vec::new());
}

#[test]
fn an_sdk_service_on_an_overlay_names_under_its_framework() {
    let (c, t, r) = replay("hello-overlay.json");
    assert_eq!(c.task_count(), 4);
    assert!(r.is_empty(), "{r:?}");
    assert_eq!(
        summary(&t),
        [
            s(
                "api.hello-world.marathon.l4lb.thisdcos.directory",
                "80/tcp",
                &["10.0.0.49:19630 Active"]
            ),
            // The SDK's host-networked task: the agent's address.
            s(
                "host-vip.hello-world.l4lb.thisdcos.directory",
                "80/tcp",
                &["10.0.0.49:4044 Active"]
            ),
            // The overlay task (network-scope container): its container address.
            s(
                "overlay-vip.hello-world.l4lb.thisdcos.directory",
                "80/tcp",
                &["9.0.2.3:4044 Active"]
            ),
        ]
    );
}

#[test]
fn tasks_on_recovered_agents_are_served_after_a_master_fail_over() {
    let (c, t, _) = replay("recovered-agents.json");
    assert_eq!(c.task_count(), 1);
    assert_eq!(
        summary(&t),
        [s(
            "web.marathon.l4lb.thisdcos.directory",
            "10080/tcp",
            &["172.17.0.4:16424 Active"]
        )]
    );
}

#[test]
fn health_killing_and_legacy_task_labels() {
    let state_hc = |healthy: &str, state: &str, labels: &str, check: bool| {
        let check = if check {
            r#""health_check":{"type":"TCP"},"#
        } else {
            ""
        };
        format!(
            r#"{{"type":"GET_STATE","get_state":{{
            "get_frameworks":{{"frameworks":[{{"framework_info":{{"id":{{"value":"f1"}},"name":"Data_Cassandra"}}}}]}},
            "get_agents":{{"agents":[{{"agent_info":{{"id":{{"value":"a1"}},"hostname":"node-1"}}}}]}},
            "get_tasks":{{"tasks":[{{{check}"name":"node-0","task_id":{{"value":"t1"}},"framework_id":{{"value":"f1"}},
              "agent_id":{{"value":"a1"}},"state":"{state}",
              "statuses":[{{"state":"{state}"{healthy}}}],
              "resources":[{{"name":"ports","type":"RANGES","ranges":{{"range":[{{"begin":9042,"end":9043}}]}}}}],
              "labels":{{"labels":[{labels}]}},
              "discovery":{{"name":"node","ports":{{"ports":[{{"number":9042,"protocol":"tcp",
                "labels":{{"labels":[{{"key":"VIP_0","value":"node:9042"}}]}}}}]}}}}}}]}}}}}}"#
        )
    };
    let state = |healthy: &str, st: &str, labels: &str| state_hc(healthy, st, labels, false);
    let build = |body: String| {
        let (c, _) =
            Cluster::from_state(super::super::types::parse_get_state(body.as_bytes()).unwrap());
        let mut st = TableState::new(BuildConfig::default(), 1);
        // The agent's hostname is a name: resolved through the function given.
        st.replace_all(
            c.contributions(&mut |h| (h == "node-1").then(|| "198.18.0.7".parse().unwrap())),
        );
        st.rebuild(0);
        let r: Vec<_> = st.rejections().map(|r| (r.key.clone(), r.reason)).collect();
        (summary(st.current()), r)
    };
    // `Data_Cassandra` is served as Mesos-DNS mangles it.
    let n = "node.data-cassandra.l4lb.thisdcos.directory";
    let cases = [
        ("", "TASK_RUNNING", "Active"),
        (r#","healthy":true"#, "TASK_RUNNING", "Active"),
        (r#","healthy":false"#, "TASK_RUNNING", "Draining"),
        ("", "TASK_KILLING", "Draining"),
    ];
    for (healthy, st, want) in cases {
        let (t, _) = build(state(healthy, st, ""));
        assert_eq!(
            t,
            [s(n, "9042/tcp", &[&format!("198.18.0.7:9042 {want}")])],
            "{healthy} {st}"
        );
    }
    let (t, _) = build(state("", "TASK_STAGING", ""));
    assert_eq!(t, [s(n, "9042/tcp", &[])]);
    // With a health check: no answer yet is unhealthy (dcos-net), an answer counts.
    for (healthy, want) in [
        ("", "Draining"),
        (r#","healthy":true"#, "Active"),
        (r#","healthy":false"#, "Draining"),
    ] {
        let (t, _) = build(state_hc(healthy, "TASK_RUNNING", "", true));
        let backend = format!("198.18.0.7:9042 {want}");
        assert_eq!(t, [s(n, "9042/tcp", &[&backend])], "check, {healthy}");
    }
    // Legacy task labels: the task's n-th port resource on the agent; bad ones rejected.
    let (t, r) = build(state(
        "",
        "TASK_RUNNING",
        r#"{"key":"VIP_PORT1","value":"udp://198.18.9.9:7000"},{"key":"VIP_PORT7","value":"tcp://x:1"},{"key":"VIP_PORT0","value":"seeds:7000"}"#,
    ));
    assert_eq!(
        t,
        [
            s("198.18.9.9", "7000/udp", &["198.18.0.7:9043 Active"]),
            s(n, "9042/tcp", &["198.18.0.7:9042 Active"]),
        ]
    );
    assert_eq!(
        r,
        [
            ("VIP_PORT0".to_string(), "legacy_scheme"),
            ("VIP_PORT7".to_string(), "no_task_port")
        ]
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// One synthetic event over a small world (3 frameworks, 3 agents, 6 tasks, 3 names), so
    /// that events collide: the same task added twice, updates of unknown tasks, agents and
    /// frameworks leaving under their tasks.
    #[derive(Debug, Clone)]
    enum Ev {
        Added {
            task: u8,
            fw: u8,
            agent: u8,
            name: u8,
            container: bool,
            v6: bool,
        },
        Updated {
            task: u8,
            fw: u8,
            state: u8,
            healthy: Option<bool>,
        },
        AgentAdded(u8),
        AgentRemoved(u8),
        FrameworkAdded {
            fw: u8,
            name: u8,
        },
        FrameworkRemoved(u8),
        Subscribed,
    }

    fn arb_ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            4 => (0u8..6, 0u8..3, 0u8..3, 0u8..3, any::<bool>(), prop::bool::weighted(0.2))
                .prop_map(|(task, fw, agent, name, container, v6)| Ev::Added { task, fw, agent, name, container, v6 }),
            4 => (0u8..6, 0u8..3, 0u8..5, prop::option::of(any::<bool>()))
                .prop_map(|(task, fw, state, healthy)| Ev::Updated { task, fw, state, healthy }),
            1 => (0u8..3).prop_map(Ev::AgentAdded),
            1 => (0u8..3).prop_map(Ev::AgentRemoved),
            1 => (0u8..3, 0u8..2).prop_map(|(fw, name)| Ev::FrameworkAdded { fw, name }),
            1 => (0u8..3).prop_map(Ev::FrameworkRemoved),
            1 => Just(Ev::Subscribed),
        ]
    }

    const STATES: [&str; 5] = [
        "TASK_STAGING",
        "TASK_RUNNING",
        "TASK_KILLING",
        "TASK_KILLED",
        "TASK_UNREACHABLE",
    ];

    fn to_event(ev: &Ev) -> Event {
        let v = match ev {
            Ev::Added {
                task,
                fw,
                agent,
                name,
                container,
                v6,
            } => {
                let mut labels = vec![json!({"key": "VIP_0", "value": format!("/svc{name}:80")})];
                if *container {
                    labels.push(json!({"key": "network-scope", "value": "container"}));
                }
                let ip = if *v6 {
                    format!("fd00::{task}")
                } else {
                    format!("198.18.9.{task}")
                };
                json!({"type": "TASK_ADDED", "task_added": {"task": {
                    "name": format!("t{task}"), "task_id": {"value": format!("t{task}")},
                    "framework_id": {"value": format!("f{fw}")}, "agent_id": {"value": format!("a{agent}")},
                    "state": "TASK_RUNNING",
                    "statuses": [{"state": "TASK_RUNNING", "container_status": {"network_infos": [{"ip_addresses": [{"ip_address": ip}]}]}}],
                    "discovery": {"ports": {"ports": [{"number": 8000 + u32::from(*task), "protocol": "tcp", "labels": {"labels": labels}}]}}}}})
            }
            Ev::Updated {
                task,
                fw,
                state,
                healthy,
            } => {
                let mut status = json!({"task_id": {"value": format!("t{task}")}, "state": STATES[*state as usize]});
                if let Some(h) = healthy {
                    status["healthy"] = json!(h);
                }
                json!({"type": "TASK_UPDATED", "task_updated": {"framework_id": {"value": format!("f{fw}")},
                       "state": STATES[*state as usize], "status": status}})
            }
            Ev::AgentAdded(a) => json!({"type": "AGENT_ADDED", "agent_added": {"agent": {
                "agent_info": {"id": {"value": format!("a{a}")}, "hostname": format!("198.18.0.{a}")}}}}),
            Ev::AgentRemoved(a) => {
                json!({"type": "AGENT_REMOVED", "agent_removed": {"agent_id": {"value": format!("a{a}")}}})
            }
            Ev::FrameworkAdded { fw, name } => {
                json!({"type": "FRAMEWORK_ADDED", "framework_added": {"framework": {
                "framework_info": {"id": {"value": format!("f{fw}")}, "name": format!("Frame_{name}")}}}})
            }
            Ev::FrameworkRemoved(fw) => json!({"type": "FRAMEWORK_REMOVED", "framework_removed": {
                "framework_info": {"id": {"value": format!("f{fw}")}, "name": "x"}}}),
            // A fresh state with one agent and one framework, no tasks.
            Ev::Subscribed => json!({"type": "SUBSCRIBED", "subscribed": {"get_state": {
                "get_agents": {"agents": [{"agent_info": {"id": {"value": "a0"}, "hostname": "198.18.0.0"}}]},
                "get_frameworks": {"frameworks": [{"framework_info": {"id": {"value": "f0"}, "name": "marathon"}}]}}}}),
        };
        serde_json::from_value(v).unwrap()
    }

    proptest! {
        /// Whatever the events, publishing only the tasks each event names gives the table a
        /// rebuild of every task from the final state gives.
        #[test]
        fn events_applied_incrementally_equal_a_full_rebuild(evs in prop::collection::vec(arb_ev(), 1..40)) {
            let mut c = Cluster::default();
            let cfg = BuildConfig { vip_cidr: "198.18.128.0/26".parse().unwrap(), ..BuildConfig::default() };
            let mut inc = TableState::new(cfg.clone(), 1);
            inc.rebuild(0);
            for ev in &evs {
                let applied = c.apply(to_event(ev)).0;
                fold(&c, &mut inc, applied);
                let mut full = TableState::new(cfg.clone(), 1);
                full.replace_all(c.contributions(&mut no_dns));
                full.rebuild(0);
                prop_assert!(inc.current().same_content(full.current()),
                    "after {:?}\nincremental {:?}\nfull {:?}", ev, inc.current().vips, full.current().vips);
            }
        }
    }
}

#[test]
fn an_update_without_healthy_keeps_the_last_answer_and_scope_defaults_to_the_task_address() {
    let ev = |v: serde_json::Value| -> Event { serde_json::from_value(v).unwrap() };
    let mut c = Cluster::default();
    c.apply(ev(serde_json::json!({"type": "SUBSCRIBED", "subscribed": {"get_state": {
        "get_frameworks": {"frameworks": [{"framework_info": {"id": {"value": "f"}, "name": "svc"}}]},
        "get_agents": {"agents": [{"agent_info": {"id": {"value": "a"}, "hostname": "198.18.0.1"}}]},
        "get_tasks": {"tasks": [{"name": "t", "task_id": {"value": "t"}, "framework_id": {"value": "f"},
            "agent_id": {"value": "a"}, "state": "TASK_RUNNING", "health_check": {"type": "HTTP"},
            // Out of order: the newest (by timestamp) says healthy, on a container address.
            "statuses": [
                {"state": "TASK_RUNNING", "timestamp": 2.0, "healthy": true,
                 "container_status": {"network_infos": [{"ip_addresses": [{"ip_address": "9.0.0.5"}]}]}},
                {"state": "TASK_STARTING", "timestamp": 1.0}],
            // No network-scope: the task's own address (dcos-net), not the agent's.
            "discovery": {"ports": {"ports": [{"number": 80, "protocol": "tcp",
                "labels": {"labels": [{"key": "VIP_0", "value": "web:80"}]}}]}}}]}}}})));
    let backends = |c: &Cluster| {
        let a = c.contribution("f/t", &mut no_dns).unwrap();
        a.entries[0]
            .backends
            .iter()
            .map(|b| format!("{} {:?}", b.addr, b.state))
            .collect::<Vec<_>>()
    };
    assert_eq!(backends(&c), ["9.0.0.5:80 Active"]);
    let update = |healthy: Option<bool>| {
        let mut status = serde_json::json!({"task_id": {"value": "t"}, "state": "TASK_RUNNING"});
        if let Some(h) = healthy {
            status["healthy"] = serde_json::json!(h);
        }
        ev(serde_json::json!({"type": "TASK_UPDATED", "task_updated": {
            "framework_id": {"value": "f"}, "state": "TASK_RUNNING", "status": status}}))
    };
    c.apply(update(Some(false)));
    assert_eq!(backends(&c), ["9.0.0.5:80 Draining"]);
    c.apply(update(None));
    assert_eq!(
        backends(&c),
        ["9.0.0.5:80 Draining"],
        "no answer keeps the last one"
    );
    c.apply(update(Some(true)));
    assert_eq!(backends(&c), ["9.0.0.5:80 Active"]);
}

#[test]
fn running_mesos_tasks_get_task_records_under_their_own_name_and_framework() {
    // Task names list every running instance, healthy or not (Mesos-DNS), under the task's
    // own Mesos name and its framework, with the agent and the container addresses.
    for (file, name, framework) in [
        ("tcp-and-udp.json", "app", "marathon"),
        ("unhealthy.json", "app", "marathon"),
    ] {
        let t = get_state(file);
        let records: Vec<_> = t.apps.values().collect();
        assert_eq!(records.len(), 1, "{file}: {records:?}");
        let a = records[0];
        assert_eq!(
            (a.name.as_str(), a.framework.as_str()),
            (name, framework),
            "{file}"
        );
        assert_eq!(a.tasks.len(), 1, "{file}");
        let task = &a.tasks[0];
        assert!(task.host.is_some(), "{file}: {task:?}");
        assert!(!task.ports.is_empty(), "{file}: {task:?}");
    }
    // A task that ends leaves the names with it.
    let (_, t, _) = replay("hello-world.json");
    assert!(
        t.apps.is_empty(),
        "every task of the stream ended: {:?}",
        t.apps
    );
}
