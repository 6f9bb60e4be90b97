use std::collections::HashMap;

use serde_json::json;

use super::*;
use crate::labels::IpPolicy;
use crate::model::{Protocol, Vip};
use crate::source::HostCache;
use crate::source::entries::{Built, app_tasks, assemble, task_name};
use crate::source::marathon::types::parse_apps;
use crate::vip_alloc::VipAllocator;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/marathon");

fn alloc() -> VipAllocator {
    VipAllocator::new(
        "11.0.0.0/8".parse().unwrap(),
        "fd01:c::/64".parse().unwrap(),
    )
}

fn resolver() -> impl FnMut(&str) -> Option<IpAddr> {
    let known: HashMap<&str, IpAddr> = [
        ("srv4.example.com", "198.18.0.4".parse().unwrap()),
        ("agent-1", "198.18.1.1".parse().unwrap()),
    ]
    .into();
    move |h| known.get(h).copied()
}

fn build(apps_json: serde_json::Value) -> Built {
    let body = serde_json::to_vec(&apps_json).unwrap();
    let (apps, bad) = parse_apps(&body).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    let mut r = resolver();
    let contribs: Vec<Contribution> = apps.iter().map(|a| app_contribution(a, &mut r)).collect();
    assemble(&contribs, "marathon", &IpPolicy::default(), &mut alloc())
}

/// Each rejected label's key and reason.
fn reasons(b: &Built) -> Vec<(&str, &str)> {
    b.rejections
        .iter()
        .map(|r| (r.key.as_str(), r.reason))
        .collect()
}

fn backends(v: &Vip) -> Vec<(String, BackendState)> {
    v.backends
        .iter()
        .map(|b| (b.addr.to_string(), b.state))
        .collect()
}

fn task(id: &str, host: &str, ports: &[u32], state: &str) -> serde_json::Value {
    json!({"id": id, "host": host, "ports": ports, "state": state, "appId": "/x"})
}

#[test]
fn every_fixture_parses_and_builds() {
    for f in [
        "marathon-docs-examples-app_list.json",
        "marathon-lb-tests-marathon15_apps.json",
    ] {
        let body = std::fs::read(format!("{FIXTURES}/{f}")).unwrap();
        let (apps, bad) = parse_apps(&body).unwrap();
        assert!(!apps.is_empty() && bad.is_empty(), "{f}");
        let mut r = resolver();
        let c: Vec<_> = apps.iter().map(|a| app_contribution(a, &mut r)).collect();
        // No VIP labels in the raw fixtures: nothing built, nothing rejected.
        let b = assemble(&c, "marathon", &IpPolicy::default(), &mut alloc());
        assert!(b.vips.is_empty() && b.rejections.is_empty(), "{f}");
    }
    // The task-list fixtures are not app lists: the envelope is refused as a whole.
    for f in [
        "marathon-docs-examples-tasks.json",
        "marathon-docs-examples-app_tasks.json",
    ] {
        let body = std::fs::read(format!("{FIXTURES}/{f}")).unwrap();
        assert!(parse_apps(&body).is_err(), "{f}");
    }
}

#[test]
fn bridge_fixture_uses_host_port_not_bridge_ip() {
    let body = std::fs::read(format!("{FIXTURES}/marathon-lb-tests-marathon15_apps.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["apps"][0]["container"]["portMappings"][0]["labels"] = json!({"VIP_0": "/pywebserver:80"});
    let b = build(v);
    assert_eq!(b.vips.len(), 1);
    let vip = &b.vips[0];
    assert_eq!(
        vip.name.as_ref().unwrap().fqdn(),
        "pywebserver.marathon.l4lb.thisdcos.directory"
    );
    assert_eq!(
        backends(vip),
        vec![("10.0.2.148:1565".into(), BackendState::Active)]
    );
}

#[test]
fn host_networking_with_health_checks_and_states() {
    let b = build(json!({"apps": [{
        "id": "/web",
        "healthChecks": [{"protocol": "HTTP"}],
        "portDefinitions": [{"port": 10000, "protocol": "tcp", "labels": {"VIP_0": "/web:80"}}],
        "tasks": [
            {"id": "t1", "host": "198.18.0.1", "ports": [31001], "state": "TASK_RUNNING",
             "healthCheckResults": [{"alive": true}]},
            {"id": "t2", "host": "198.18.0.2", "ports": [31002], "state": "TASK_RUNNING",
             "healthCheckResults": [{"alive": false}]},
            {"id": "t3", "host": "198.18.0.3", "ports": [31003], "state": "TASK_RUNNING"},
            {"id": "t4", "host": "198.18.0.4", "ports": [31004], "state": "TASK_KILLING",
             "healthCheckResults": [{"alive": true}]},
            {"id": "t5", "host": "198.18.0.5", "ports": [31005], "state": "TASK_STAGING"},
            {"id": "t6", "host": "198.18.0.6", "ports": [31006], "state": "TASK_FAILED"}
        ]
    }, {
        // Two checks: active only once both have reported, alive.
        "id": "/two",
        "healthChecks": [{"protocol": "HTTP"}, {"protocol": "TCP"}],
        "portDefinitions": [{"port": 10001, "protocol": "tcp", "labels": {"VIP_0": "/two:80"}}],
        "tasks": [
            {"id": "u1", "host": "198.18.0.1", "ports": [32001], "state": "TASK_RUNNING",
             "healthCheckResults": [{"alive": true}]},
            {"id": "u2", "host": "198.18.0.2", "ports": [32002], "state": "TASK_RUNNING",
             "healthCheckResults": [{"alive": true}, {"alive": true}]}
        ]
    }]}));
    assert_eq!(b.vips.len(), 2);
    let web = b
        .vips
        .iter()
        .find(|v| v.key.port == 80 && backends(v).len() == 4)
        .unwrap();
    assert_eq!(
        backends(web),
        vec![
            ("198.18.0.1:31001".into(), BackendState::Active),
            ("198.18.0.2:31002".into(), BackendState::Draining),
            ("198.18.0.3:31003".into(), BackendState::Draining),
            ("198.18.0.4:31004".into(), BackendState::Draining),
        ]
    );
    let two = b.vips.iter().find(|v| backends(v).len() == 2).unwrap();
    assert_eq!(
        backends(two),
        vec![
            ("198.18.0.1:32001".into(), BackendState::Draining),
            ("198.18.0.2:32002".into(), BackendState::Active),
        ]
    );
}

#[test]
fn container_networking_modes() {
    let b = build(json!({"apps": [
        {   // container mode, no host port: task IP and container port.
            "id": "/c1", "networks": [{"mode": "container", "name": "dcos"}],
            "container": {"type": "MESOS", "portMappings": [
                {"containerPort": 8080, "protocol": "tcp", "labels": {"VIP_0": "/c1:80"}}]},
            "tasks": [{"id": "c1.a", "host": "198.18.1.1", "ports": [], "state": "TASK_RUNNING",
                       "ipAddresses": [{"ipAddress": "9.0.0.1", "protocol": "IPv4"}]}]
        },
        {   // container mode with a host port on the second mapping only: task.ports[0] is it.
            "id": "/c2", "networks": [{"mode": "container", "name": "dcos"}],
            "container": {"type": "MESOS", "portMappings": [
                {"containerPort": 7000, "protocol": "tcp"},
                {"containerPort": 8080, "hostPort": 0, "protocol": "tcp", "labels": {"VIP_0": "/c2:80"}}]},
            "tasks": [{"id": "c2.a", "host": "198.18.1.2", "ports": [31555], "state": "TASK_RUNNING",
                       "ipAddresses": [{"ipAddress": "9.0.0.2", "protocol": "IPv4"}]}]
        },
        {   // older docker USER network with container.docker.portMappings.
            "id": "/c3",
            "container": {"type": "DOCKER", "docker": {"network": "USER", "portMappings": [
                {"containerPort": 9090, "protocol": "tcp", "labels": {"VIP_0": "/c3:90"}}]}},
            "tasks": [{"id": "c3.a", "host": "198.18.1.3", "ports": [], "state": "TASK_RUNNING",
                       "ipAddresses": [{"ipAddress": "9.0.0.3"}, {"ipAddress": "fd00::3"}]}]
        },
        {   // older docker BRIDGE network: host port, never the bridge IP.
            "id": "/c4",
            "container": {"type": "DOCKER", "docker": {"network": "BRIDGE", "portMappings": [
                {"containerPort": 80, "hostPort": 0, "protocol": "tcp", "labels": {"VIP_0": "/c4:80"}}]}},
            "tasks": [{"id": "c4.a", "host": "agent-1", "ports": [31444], "state": "TASK_RUNNING",
                       "ipAddresses": [{"ipAddress": "172.17.0.2"}]}]
        }
    ]}));
    let by_label: HashMap<String, Vec<(String, BackendState)>> = b
        .vips
        .iter()
        .filter(|v| v.key.ip.is_ipv4())
        .map(|v| (v.name.as_ref().unwrap().label.clone(), backends(v)))
        .collect();
    let active = BackendState::Active;
    assert_eq!(by_label["c1"], vec![("9.0.0.1:8080".into(), active)]);
    assert_eq!(by_label["c2"], vec![("198.18.1.2:31555".into(), active)]);
    assert_eq!(by_label["c3"], vec![("9.0.0.3:9090".into(), active)]);
    assert_eq!(by_label["c4"], vec![("198.18.1.1:31444".into(), active)]);
    // c3 has an IPv6 backend, so it also gets an address from the v6 pool, which serves
    // that backend alone.
    let v6: Vec<_> = b.vips.iter().filter(|v| v.key.ip.is_ipv6()).collect();
    assert_eq!(v6.len(), 1);
    assert_eq!(v6[0].name.as_ref().unwrap().label, "c3");
    assert_eq!(backends(v6[0]), vec![("[fd00::3]:9090".into(), active)]);
}

#[test]
fn multi_port_udp_tcp_and_shared_vips() {
    let b = build(json!({"apps": [
        {
            "id": "/dns",
            "portDefinitions": [
                {"port": 0, "protocol": "udp,tcp", "labels": {"VIP_0": "/dns:53"}},
                {"port": 0, "protocol": "tcp", "labels": {"VIP_1": "/dns:8080", "vip_2": "198.18.9.9:8080"}}
            ],
            "tasks": [task("dns.1", "198.18.0.1", &[31001, 31002], "TASK_RUNNING")]
        },
        {   // blue/green: same VIP, other app.
            "id": "/dns-green",
            "portDefinitions": [{"port": 0, "protocol": "tcp", "labels": {"VIP_0": "dns:53"}}],
            "tasks": [task("dns-green.1", "198.18.0.2", &[32001], "TASK_RUNNING")]
        }
    ]}));
    let find = |port: u16, proto: Protocol, named: bool| {
        b.vips
            .iter()
            .find(|v| v.key.port == port && v.key.protocol == proto && v.name.is_some() == named)
            .unwrap_or_else(|| panic!("no vip {port}/{proto} named={named}"))
    };
    assert_eq!(
        backends(find(53, Protocol::Tcp, true)),
        vec![
            ("198.18.0.1:31001".into(), BackendState::Active),
            ("198.18.0.2:32001".into(), BackendState::Active)
        ]
    );
    assert_eq!(backends(find(53, Protocol::Udp, true)).len(), 1);
    assert_eq!(
        backends(find(8080, Protocol::Tcp, true)),
        vec![("198.18.0.1:31002".into(), BackendState::Active)]
    );
    assert_eq!(
        find(8080, Protocol::Tcp, false).key.ip,
        "198.18.9.9".parse::<IpAddr>().unwrap()
    );
    assert_eq!(b.vips.len(), 4);
    // The TCP and UDP VIPs of one name share the name's address.
    assert_eq!(
        find(53, Protocol::Tcp, true).key.ip,
        find(53, Protocol::Udp, true).key.ip
    );
}

#[test]
fn bad_labels_drop_only_themselves() {
    let b = build(json!({"apps": [{
        "id": "/mixed",
        "portDefinitions": [{"port": 0, "labels": {
            "VIP_0": "/ok:80", "VIP_1": "missing-port", "VIP_2": "web:0", "VIP_3": "web:70000",
            "VIP_4": "127.0.0.1:80", "VIP_5": "198.18.0.1:80", "VIP_6": 42, "OTHER": "x",
            "VIP_7": "11.0.0.9:80", "VIP_8": "fd01:c::9:80", "VIP_9": "::ffff:198.18.0.1:80",
            "VIP_10": "198.18.9.5:80"
        }}],
        "tasks": [task("m.1", "198.18.0.1", &[31001], "TASK_RUNNING")]
    }, {
        // No labels; its container address is still the cluster's.
        "id": "/db",
        "container": {"type": "MESOS", "portMappings": [{"containerPort": 5432}]},
        "networks": [{"mode": "container", "name": "dcos"}],
        "tasks": [{"id": "db.1", "host": "198.18.0.3", "ports": [],
                   "ipAddresses": [{"ipAddress": "198.18.9.5", "protocol": "IPv4"}],
                   "state": "TASK_STAGING"}]
    }]}));
    assert_eq!(b.vips.len(), 1);
    let reasons = reasons(&b);
    assert_eq!(
        reasons,
        vec![
            ("VIP_1", "missing_port"),
            // A container address of a task of an unlabelled app, not yet running (keys sort
            // as strings).
            ("VIP_10", "cluster_address"),
            ("VIP_2", "bad_port"),
            ("VIP_3", "bad_port"),
            ("VIP_4", "loopback"),
            ("VIP_5", "cluster_address"),
            ("VIP_6", "not_a_string"),
            // Inside the named-VIP ranges (the defaults, 11.0.0.0/8 and fd01:c::/64).
            ("VIP_7", "named_vip_range"),
            ("VIP_8", "named_vip_range"),
            // IPv4-mapped: checked as the IPv4 task host it is.
            ("VIP_9", "cluster_address"),
        ]
    );
}

#[test]
fn hostnames_resolve_once_and_unresolvable_hosts_are_skipped() {
    let body = serde_json::to_vec(&json!({"apps": [{
        "id": "/h",
        "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/h:80"}}, {"port": 0, "labels": {"VIP_0": "/h:81"}}],
        "tasks": [
            task("h.1", "srv4.example.com", &[31001, 31002], "TASK_RUNNING"),
            task("h.2", "srv4.example.com", &[31003, 31004], "TASK_RUNNING"),
            task("h.3", "nowhere.invalid", &[31005, 31006], "TASK_RUNNING")
        ]
    }]}))
    .unwrap();
    let (apps, _) = parse_apps(&body).unwrap();
    let mut calls = 0;
    let mut inner = resolver();
    let mut counting = |h: &str| {
        calls += 1;
        inner(h)
    };
    let c = app_contribution(&apps[0], &mut counting);
    assert_eq!(calls, 2, "one lookup per distinct host");
    assert_eq!(c.unresolved_hosts, vec!["nowhere.invalid".to_string()]);
    let b = assemble([&c], "marathon", &IpPolicy::default(), &mut alloc());
    assert_eq!(b.vips.len(), 2);
    for v in &b.vips {
        assert_eq!(v.backends.len(), 2);
        assert!(
            v.backends
                .iter()
                .all(|b| b.addr.ip() == "198.18.0.4".parse::<IpAddr>().unwrap())
        );
    }
}

#[test]
fn unexpected_fields_and_broken_apps() {
    // One app with a wrong type somewhere we read is skipped; the others stay.
    let body = br#"{"apps": [
        {"id": "/good", "newField": {"x": [1,2]}, "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/good:80"}}],
         "tasks": [{"id": "g.1", "host": "198.18.0.1", "ports": [31001], "state": "TASK_RUNNING", "extra": true}]},
        {"id": "/bad", "portDefinitions": "not-a-list"}
    ]}"#;
    let (apps, bad) = parse_apps(body).unwrap();
    assert_eq!(apps.len(), 1);
    assert_eq!(bad.len(), 1);
    assert!(bad[0].contains("/bad"));
    for broken in [&b"{\"apps\": ["[..], b"<html>502</html>", b"{}", b"[]"] {
        assert!(parse_apps(broken).is_err());
    }
}

#[test]
fn named_vip_addresses_are_stable_across_builds() {
    let mut a = alloc();
    let mk = |names: &[&str]| -> Vec<Contribution> {
        let apps: Vec<serde_json::Value> = names
            .iter()
            .map(|n| json!({"id": format!("/{n}"), "portDefinitions": [{"port": 0, "labels": {"VIP_0": format!("/{n}:80")}}],
                           "tasks": [task(&format!("{n}.1"), "198.18.0.1", &[31001], "TASK_RUNNING")]}))
            .collect();
        let body = serde_json::to_vec(&json!({"apps": apps})).unwrap();
        let (apps, _) = parse_apps(&body).unwrap();
        let mut r = resolver();
        apps.iter().map(|x| app_contribution(x, &mut r)).collect()
    };
    let first = assemble(&mk(&["a", "b"]), "marathon", &IpPolicy::default(), &mut a);
    let second = assemble(
        &mk(&["z", "b", "c", "a"]),
        "marathon",
        &IpPolicy::default(),
        &mut a,
    );
    for v in &first.vips {
        assert!(
            second
                .vips
                .iter()
                .any(|w| w.name == v.name && w.key == v.key)
        );
    }
}

#[test]
fn ipv6_exhaustion_rejects_the_ipv6_only_names_that_ran_out() {
    // Five names with IPv6 backends, a /126 for their IPv6 addresses: some run out.
    let apps: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            json!({
                "id": format!("/v6-{i}"),
                "portDefinitions": [{"port": 0, "labels": {"VIP_0": format!("/v6-{i}:80")}}],
                "tasks": [task(&format!("t{i}"), &format!("fd00::{}", i + 1), &[31000], "TASK_RUNNING")]
            })
        })
        .collect();
    let body = serde_json::to_vec(&json!({ "apps": apps })).unwrap();
    let (apps, _) = parse_apps(&body).unwrap();
    let contribs: Vec<Contribution> = apps
        .iter()
        .map(|a| app_contribution(a, &mut resolver()))
        .collect();
    let mut a = VipAllocator::new(
        "198.18.128.0/24".parse().unwrap(),
        "fd01:c::/126".parse().unwrap(),
    );
    let b = assemble(&contribs, "marathon", &IpPolicy::default(), &mut a);
    let v4 = b.vips.iter().filter(|v| v.key.ip.is_ipv4()).count();
    let v6 = b.vips.iter().filter(|v| v.key.ip.is_ipv6()).count();
    // IPv6 backends only: no name has an IPv4 address, and a /126 lends three IPv6 ones.
    assert_eq!(v4, 0, "no IPv4 VIP for IPv6-only names");
    assert_eq!(v6, 3, "{v6} IPv6 VIPs");
    assert_eq!(b.rejections.len(), 5 - v6);
    for r in &b.rejections {
        assert_eq!(r.reason, "exhausted");
        assert!(r.error.contains("--vip-cidr6"), "{}", r.error);
    }
}

#[test]
fn an_unknown_port_protocol_rejects_its_labels_only() {
    let b = build(json!({"apps": [{
        "id": "/p",
        "portDefinitions": [
            {"port": 0, "protocol": "sctp", "labels": {"VIP_0": "/p:80"}},
            {"port": 0, "protocol": "UDP,tcp", "labels": {"VIP_0": "/q:53"}}
        ],
        "tasks": [task("p.1", "198.18.0.1", &[31001, 31002], "TASK_RUNNING")]
    }]}));
    let reasons: Vec<_> = b
        .rejections
        .iter()
        .map(|r| (r.port_index, r.reason))
        .collect();
    assert_eq!(reasons, [(0, "bad_protocol")]);
    let mut got: Vec<_> = b
        .vips
        .iter()
        .map(|v| (v.name.as_ref().unwrap().label.clone(), v.key.protocol))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [("q".into(), Protocol::Tcp), ("q".into(), Protocol::Udp)]
    );
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// Any JSON leaf, plausible or not.
    fn leaf() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::from),
            Just(Value::Array(vec![])),
            Just(serde_json::json!({})),
        ]
        .boxed()
    }

    fn pick(options: &'static [&'static str]) -> BoxedStrategy<Value> {
        prop::sample::select(options).prop_map(Value::from).boxed()
    }

    /// An object whose fields are mostly what Marathon sends, sometimes absent, sometimes
    /// garbage of another type.
    fn object(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
        let per_field: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
            .into_iter()
            .map(|(k, good)| {
                prop_oneof![
                    8 => good.prop_map(move |v| Some((k.to_string(), v))),
                    1 => Just(None),
                    1 => leaf().prop_map(move |v| Some((k.to_string(), v))),
                ]
                .boxed()
            })
            .collect();
        per_field
            .prop_map(|kv| Value::Object(kv.into_iter().flatten().collect()))
            .boxed()
    }

    fn array(item: BoxedStrategy<Value>, max: usize) -> BoxedStrategy<Value> {
        prop::collection::vec(item, 0..max)
            .prop_map(Value::Array)
            .boxed()
    }

    fn port() -> BoxedStrategy<Value> {
        prop_oneof![(0u32..70_000).prop_map(Value::from), Just(Value::from(-1))].boxed()
    }

    fn labels() -> BoxedStrategy<Value> {
        let value = pick(&[
            "/web:80",
            "web:80",
            "/g/api:8080",
            "198.18.5.5:80",
            "11.0.0.9:80",
            "fd00::1:80",
            "[fd00::5]:53",
            "::ffff:198.18.0.1:80",
            "127.0.0.1:80",
            "x:0",
            "web:70000",
            ":",
            "",
        ]);
        prop::collection::vec(
            (
                pick(&["VIP_0", "VIP_1", "vip_x", "OTHER"]),
                prop_oneof![4 => value, 1 => leaf()],
            ),
            0..3,
        )
        .prop_map(|kv| {
            Value::Object(
                kv.into_iter()
                    .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v))
                    .collect(),
            )
        })
        .boxed()
    }

    fn mapping() -> BoxedStrategy<Value> {
        object(vec![
            ("containerPort", port()),
            ("hostPort", port()),
            ("protocol", pick(&["tcp", "udp", "udp,tcp", "sctp"])),
            ("labels", labels()),
        ])
    }

    fn task() -> BoxedStrategy<Value> {
        object(vec![
            ("id", pick(&["t.1", "t.2", "t.3"])),
            (
                "host",
                pick(&["198.18.0.1", "198.18.0.2", "fd00::2", "nowhere.invalid", ""]),
            ),
            ("ports", array(port(), 3)),
            (
                "state",
                pick(&[
                    "TASK_RUNNING",
                    "TASK_KILLING",
                    "TASK_STAGING",
                    "TASK_FAILED",
                ]),
            ),
            (
                "ipAddresses",
                array(
                    object(vec![(
                        "ipAddress",
                        pick(&["9.0.0.1", "fd00::9", "198.18.5.5", "not an ip"]),
                    )]),
                    3,
                ),
            ),
            (
                "healthCheckResults",
                array(
                    object(vec![("alive", any::<bool>().prop_map(Value::from).boxed())]),
                    3,
                ),
            ),
        ])
    }

    /// One Marathon app, every part of it perturbed now and then.
    fn app() -> BoxedStrategy<Value> {
        object(vec![
            ("id", pick(&["/a", "/b", "/g/c", ""])),
            (
                "portDefinitions",
                array(
                    object(vec![
                        ("port", port()),
                        ("protocol", pick(&["tcp", "udp", "udp,tcp", "sctp"])),
                        ("labels", labels()),
                    ]),
                    3,
                ),
            ),
            (
                "container",
                object(vec![
                    ("type", pick(&["MESOS", "DOCKER"])),
                    ("portMappings", array(mapping(), 3)),
                    (
                        "docker",
                        object(vec![
                            ("network", pick(&["BRIDGE", "USER", "HOST"])),
                            ("portMappings", array(mapping(), 3)),
                        ]),
                    ),
                ]),
            ),
            (
                "networks",
                array(
                    object(vec![(
                        "mode",
                        pick(&["host", "container", "container/bridge"]),
                    )]),
                    2,
                ),
            ),
            (
                "healthChecks",
                array(object(vec![("protocol", pick(&["HTTP", "TCP"]))]), 3),
            ),
            ("tasks", array(task(), 4)),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Nothing Marathon sends can panic the controller: a payload parses or is refused,
        /// a malformed app is skipped, and whatever is built is a valid table.
        #[test]
        fn any_marathon_shaped_payload_builds_without_panic(
            apps in prop::collection::vec(app(), 0..4),
        ) {
            let body = serde_json::to_vec(&serde_json::json!({ "apps": apps })).unwrap();
            let Ok((apps, _bad)) = parse_apps(&body) else { return Ok(()) };
            let contribs: Vec<Contribution> = apps.iter().map(|a| app_contribution(a, &mut |_| None)).collect();
            // A tiny pool, so exhaustion is exercised too.
            let mut a = VipAllocator::new("11.0.0.0/30".parse().unwrap(), "fd01:c::/126".parse().unwrap());
            let b = assemble(&contribs, "marathon", &IpPolicy::default(), &mut a);
            for v in &b.vips {
                prop_assert!(v.key.port != 0);
                prop_assert!(!v.key.ip.is_unspecified() && !v.key.ip.is_loopback());
                let sorted = v.backends.windows(2).all(|w| w[0].addr < w[1].addr);
                prop_assert!(sorted, "backends sorted and unique");
            }
        }

        /// Nor can arbitrary bytes.
        #[test]
        fn any_bytes_are_refused_or_parsed(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_apps(&body);
            let _ = crate::source::marathon::types::parse_app(&body);
        }
    }
}

#[test]
fn legacy_app_labels_use_each_tasks_nth_port() {
    let b = build(json!({"apps": [{
        "id": "/legacy",
        "labels": {
            "VIP_PORT1": "tcp://198.18.7.7:5000",
            "VIP_PORT0": "udp:///legacy-dns:53",
            "VIP_PORT5": "tcp://far:80",
            "VIP_PORTx": "tcp://web:80",
            "VIP_PORT2": "web:80",
            "HAPROXY_GROUP": "external"
        },
        "portDefinitions": [{"port": 0}, {"port": 0}],
        "tasks": [
            task("l.1", "198.18.0.1", &[31001, 31002], "TASK_RUNNING"),
            task("l.2", "agent-1", &[31003, 31004], "TASK_KILLING"),
            task("l.3", "198.18.0.2", &[31005], "TASK_RUNNING"),
            task("l.4", "198.18.0.3", &[31007, 31008], "TASK_STAGING")
        ]
    }]}));
    let by_key: HashMap<String, &Vip> = b.vips.iter().map(|v| (v.key.to_string(), v)).collect();
    let ip = by_key["198.18.7.7:5000/tcp"];
    assert!(ip.name.is_none());
    // The second port of each running or draining task; l.3 has no second port.
    assert_eq!(
        backends(ip),
        [
            ("198.18.0.1:31002".to_string(), BackendState::Active),
            ("198.18.1.1:31004".to_string(), BackendState::Draining)
        ]
    );
    let dns = b
        .vips
        .iter()
        .find(|v| v.key.protocol == Protocol::Udp)
        .unwrap();
    assert_eq!(
        dns.name.as_ref().unwrap().fqdn(),
        "legacy-dns.marathon.l4lb.thisdcos.directory"
    );
    assert_eq!(dns.key.port, 53);
    assert_eq!(backends(dns).len(), 3);
    // No task has a sixth port: a VIP without backends, as for a port label.
    let far = b
        .vips
        .iter()
        .find(|v| v.name.as_ref().is_some_and(|n| n.label == "far"))
        .unwrap();
    assert!(far.backends.is_empty());
    let reasons = reasons(&b);
    assert_eq!(
        reasons,
        [("VIP_PORT2", "legacy_scheme"), ("VIP_PORTx", "legacy_key")]
    );
}

#[test]
fn apps_of_other_frameworks_get_their_own_names() {
    let body = serde_json::to_vec(&json!({"apps": [
        {"id": "/a", "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/db:5432"}}],
         "tasks": [task("a.1", "198.18.0.1", &[31001], "TASK_RUNNING")]},
        {"id": "/b", "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/db:5432"}}],
         "tasks": [task("b.1", "198.18.0.2", &[31002], "TASK_RUNNING")]},
        {"id": "/c", "portDefinitions": [{"port": 0, "labels": {"VIP_0": "/db:5432"}}],
         "tasks": [task("c.1", "198.18.0.3", &[31003], "TASK_RUNNING")]}
    ]}))
    .unwrap();
    let (apps, _) = parse_apps(&body).unwrap();
    let mut contribs: Vec<Contribution> = apps
        .iter()
        .map(|a| app_contribution(a, &mut |_| None))
        .collect();
    contribs[1].framework = Some("cassandra".into());
    let b = assemble(&contribs, "marathon", &IpPolicy::default(), &mut alloc());
    let mut names: Vec<(String, usize)> = b
        .vips
        .iter()
        .map(|v| (v.name.as_ref().unwrap().fqdn(), v.backends.len()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("db.cassandra.l4lb.thisdcos.directory".to_string(), 1),
            ("db.marathon.l4lb.thisdcos.directory".to_string(), 2)
        ]
    );
    assert_ne!(b.vips[0].key.ip, b.vips[1].key.ip);
}

#[test]
fn running_tasks_of_every_app_become_task_records() {
    let body = serde_json::to_vec(&json!({"apps": [
        {"id": "/a/b/web",
         "portDefinitions": [
            {"port": 0, "protocol": "udp,tcp", "name": "dns"},
            {"port": 0, "name": "http", "labels": {"VIP_0": "/web:80"}}],
         "tasks": [
            task("a_b_web.2", "agent-1", &[31002, 31003], "TASK_RUNNING"),
            task("a_b_web.1", "198.18.1.2", &[31000, 31001], "TASK_RUNNING"),
            task("a_b_web.3", "198.18.1.3", &[31004, 31005], "TASK_STAGING"),
            task("a_b_web.4", "198.18.1.4", &[31006, 31007], "TASK_KILLING"),
            task("a_b_web.5", "nowhere", &[31008, 31009], "TASK_RUNNING")]},
        {"id": "/db",
         "container": {"type": "DOCKER", "portMappings": [
            {"containerPort": 5432, "name": "pg"},
            {"containerPort": 9187, "hostPort": 0, "protocol": "tcp", "name": "metrics"}]},
         "networks": [{"mode": "container", "name": "overlay"}],
         "tasks": [{"id": "db.1", "host": "198.18.1.5", "ports": [31010], "state": "TASK_RUNNING",
                    "ipAddresses": [{"ipAddress": "9.0.0.7", "protocol": "IPv4"},
                                    {"ipAddress": "fd00::7", "protocol": "IPv6"}]}]},
        {"id": "/bridged",
         "container": {"type": "DOCKER", "docker": {"network": "BRIDGE",
            "portMappings": [{"containerPort": 80, "hostPort": 0}]}},
         "tasks": [{"id": "bridged.1", "host": "198.18.1.6", "ports": [31011], "state": "TASK_RUNNING",
                    "ipAddresses": [{"ipAddress": "172.17.0.2", "protocol": "IPv4"}]}]},
        {"id": "/idle", "tasks": []}
    ]}))
    .unwrap();
    let (apps, bad) = parse_apps(&body).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    let mut r = resolver();
    let contribs: Vec<Contribution> = apps.iter().map(|a| app_contribution(a, &mut r)).collect();
    let tasks = app_tasks(&contribs, "marathon");
    assert_eq!(
        tasks.keys().collect::<Vec<_>>(),
        ["/a/b/web", "/bridged", "/db"]
    );
    // Bridge networking: the docker bridge address is no task address (§4).
    assert_eq!(
        tasks["/bridged"].tasks[0].container,
        Vec::<IpAddr>::new(),
        "{:?}",
        tasks["/bridged"]
    );
    assert_eq!(tasks["/bridged"].tasks[0].ports.len(), 1);
    let port = |port, protocol, name: &str| TaskPort {
        port,
        protocol,
        name: Some(name.into()),
    };
    let web = &tasks["/a/b/web"];
    assert_eq!(
        (web.name.as_str(), web.framework.as_str()),
        ("web.b.a", "marathon")
    );
    // Running only (staging and killing are not instances to list), sorted by id; an
    // unresolvable host leaves the task out; "udp,tcp" is two ports.
    let record = |id: &str, host: &str, first: u16| TaskRecord {
        id: id.into(),
        host: Some(host.parse().unwrap()),
        container: vec![],
        ports: vec![
            port(first, Protocol::Udp, "dns"),
            port(first, Protocol::Tcp, "dns"),
            port(first + 1, Protocol::Tcp, "http"),
        ],
    };
    assert_eq!(
        web.tasks,
        vec![
            record("a_b_web.1", "198.18.1.2", 31000),
            record("a_b_web.2", "198.18.1.1", 31002),
        ]
    );
    // Container networking: container addresses, and only the mapping with a host port.
    assert_eq!(
        tasks["/db"].tasks,
        vec![TaskRecord {
            id: "db.1".into(),
            host: Some("198.18.1.5".parse().unwrap()),
            container: vec!["9.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
            ports: vec![port(31010, Protocol::Tcp, "metrics")],
        }]
    );
    assert_eq!(task_name("/"), "");
    assert_eq!(task_name("web"), "web");
    assert_eq!(task_name("/x/y/z/"), "z.y.x");
}

const TWO_APPS: &str = r#"{"apps":[
    {"id":"/a","portDefinitions":[{"port":0,"labels":{"VIP_0":"/a:80"}}],"tasks":[
        {"id":"a1","host":"node-1.example","ports":[31001],"state":"TASK_RUNNING"},
        {"id":"a2","host":"gone.example","ports":[31002],"state":"TASK_RUNNING"}]},
    {"id":"/b","portDefinitions":[{"port":0,"labels":{"VIP_0":"/b:80"}}],"tasks":[
        {"id":"b1","host":"node-1.example","ports":[31003],"state":"TASK_RUNNING"},
        {"id":"b2","host":"gone.example","ports":[31004],"state":"TASK_RUNNING"}]}]}"#;

fn counting(ttl: std::time::Duration) -> (HostCache, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let cache = HostCache::with_lookup(
        move |h| {
            c.fetch_add(1, Ordering::SeqCst);
            (h == "node-1.example").then(|| "198.18.0.1".parse().unwrap())
        },
        ttl,
    );
    (cache, calls)
}

#[test]
fn hosts_are_looked_up_once_across_apps_and_builds_failures_included() {
    use std::sync::atomic::Ordering;
    let (cache, calls) = counting(std::time::Duration::from_secs(30));
    let (contribs, _) = contributions(TWO_APPS.as_bytes(), &cache).unwrap();
    // Two names, each looked up once for both apps, the failure too.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    for c in &contribs {
        assert_eq!(c.unresolved_hosts, ["gone.example"]);
        assert_eq!(c.entries[0].backends.len(), 1);
        assert_eq!(c.entries[0].backends[0].addr.ip().to_string(), "198.18.0.1");
    }
    // The next build within the TTL asks nothing.
    contributions(TWO_APPS.as_bytes(), &cache).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn expired_answers_are_asked_again() {
    use std::sync::atomic::Ordering;
    let (cache, calls) = counting(std::time::Duration::ZERO);
    contributions(TWO_APPS.as_bytes(), &cache).unwrap();
    contributions(TWO_APPS.as_bytes(), &cache).unwrap();
    // With no TTL nothing is shared: 2 builds × 2 apps × 2 names (one app asks each of
    // its names once).
    assert_eq!(calls.load(Ordering::SeqCst), 8);
}
