use std::cell::Cell;

use super::*;
use crate::model::BackendState;

fn backend(addr: &str) -> Backend {
    Backend {
        addr: addr.parse().unwrap(),
        state: BackendState::Active,
        app: "/a".into(),
        task: "a.1".into(),
    }
}

fn reasons(c: &Contribution) -> Vec<(usize, &str, &str)> {
    c.rejections
        .iter()
        .map(|r| (r.port_index, r.key.as_str(), r.reason))
        .collect()
}

#[test]
fn a_port_serves_each_parsed_label_per_protocol_and_rejects_the_rest() {
    let mut c = Contribution {
        app: "/a".into(),
        ..Contribution::default()
    };
    let calls = Cell::new(0);
    let labels = [
        ("VIP_0", LabelValue::Text("/web:80")),
        ("VIP_1", LabelValue::Text("no-port")),
        ("VIP_2", LabelValue::NotText("{\"x\":1}".into())),
        ("other", LabelValue::Text("/ignored:1")),
        ("vip_3", LabelValue::Text("198.18.9.9:53")),
    ];
    c.add_port(2, Some("udp,tcp"), labels, |c| {
        calls.set(calls.get() + 1);
        c.cluster_addrs.push("198.18.0.1".parse().unwrap());
        vec![backend("198.18.0.1:31000")]
    });
    // The backends are computed once for every label of the port.
    assert_eq!(calls.get(), 1);
    let got: Vec<(String, Protocol, usize)> = c
        .entries
        .iter()
        .map(|e| (e.value.clone(), e.protocol, e.backends.len()))
        .collect();
    assert_eq!(
        got,
        [
            ("/web:80".to_string(), Protocol::Udp, 1),
            ("/web:80".to_string(), Protocol::Tcp, 1),
            ("198.18.9.9:53".to_string(), Protocol::Udp, 1),
            ("198.18.9.9:53".to_string(), Protocol::Tcp, 1),
        ]
    );
    assert_eq!(
        reasons(&c),
        [(2, "VIP_1", "missing_port"), (2, "VIP_2", "not_a_string")]
    );
    // A port whose labels all fail never computes its backends; a bad protocol rejects all.
    c.add_port(
        3,
        Some("sctp"),
        [("VIP_0", LabelValue::Text("/x:1"))],
        |_| {
            calls.set(calls.get() + 1);
            Vec::new()
        },
    );
    assert_eq!(calls.get(), 1);
    assert_eq!(reasons(&c)[2], (3, "VIP_0", "bad_protocol"));
}

#[test]
fn legacy_labels_are_served_or_rejected_at_their_port() {
    let mut c = Contribution {
        app: "/a".into(),
        ..Contribution::default()
    };
    let labels = [
        ("VIP_PORT0", LabelValue::Text("tcp://198.18.9.1:80")),
        ("VIP_PORT1", LabelValue::Text("tcp://198.18.9.2:80")),
        ("VIP_PORTx", LabelValue::Text("tcp://198.18.9.3:80")),
        ("VIP_0", LabelValue::Text("/not-legacy:80")),
    ];
    c.add_legacy(labels, |n, _| match n {
        0 => Ok(vec![backend("198.18.0.1:31000")]),
        _ => Err(LabelError::NoTaskPort(n)),
    });
    assert_eq!(c.entries.len(), 1);
    assert_eq!(
        (c.entries[0].port_index, c.entries[0].backends.len()),
        (0, 1)
    );
    assert_eq!(
        reasons(&c),
        [
            (1, "VIP_PORT1", "no_task_port"),
            (0, "VIP_PORTx", "legacy_key")
        ]
    );
}

/// An app id, its one label and its backends.
type FamilyApp<'a> = (&'a str, &'a str, &'a [&'a str]);

/// One contribution per `(app, label, backends)`, each label on port 0 over TCP.
fn family_apps(apps: &[FamilyApp]) -> Vec<Contribution> {
    apps.iter()
        .map(|(app, label, backends)| {
            let mut c = Contribution {
                app: app.to_string(),
                ..Contribution::default()
            };
            c.add_port(0, None, [("VIP_0", LabelValue::Text(label))], |_| {
                backends.iter().map(|b| backend(b)).collect()
            });
            c
        })
        .collect()
}

#[test]
fn every_vip_address_serves_only_its_own_family() {
    // (apps as (id, label, backends)) → VIPs as "family or IP: backends", sorted.
    let cases: &[(&[FamilyApp], &[&str])] = &[
        // IP VIPs take only backends of their own family.
        (
            &[("/a", "198.18.5.5:80", &["198.18.0.1:1", "[fd00::1]:1"])],
            &["198.18.5.5: 198.18.0.1:1"],
        ),
        (
            &[("/a", "[fd01:d::4]:80", &["198.18.0.1:1", "[fd00::1]:1"])],
            &["fd01:d::4: [fd00::1]:1"],
        ),
        (
            &[("/a", "198.18.5.5:80", &["[fd00::1]:1"])],
            &["198.18.5.5: "],
        ),
        // A named VIP has an address per family among its backends, each serving its own.
        (
            &[("/a", "/web:80", &["198.18.0.1:1", "[fd00::1]:1"])],
            &["v4: 198.18.0.1:1", "v6: [fd00::1]:1"],
        ),
        (
            &[("/a", "/web:80", &["198.18.0.1:1"])],
            &["v4: 198.18.0.1:1"],
        ),
        (&[("/a", "/web:80", &["[fd00::1]:1"])], &["v6: [fd00::1]:1"]),
        // No backend at all: the A address stays (an app scaled to zero keeps its name).
        (&[("/a", "/web:80", &[])], &["v4: "]),
        // An IPv4-mapped backend is IPv4.
        (
            &[("/a", "/web:80", &["[::ffff:198.18.0.9]:1"])],
            &["v4: [::ffff:198.18.0.9]:1"],
        ),
        // Families over every app that claims the name.
        (
            &[
                ("/a", "/web:80", &["198.18.0.1:1"]),
                ("/b", "/web:80", &["[fd00::2]:2"]),
            ],
            &["v4: 198.18.0.1:1", "v6: [fd00::2]:2"],
        ),
    ];
    for (apps, want) in cases {
        let contribs = family_apps(apps);
        let mut alloc = VipAllocator::new(
            "198.18.128.0/24".parse().unwrap(),
            "fd01:c::/64".parse().unwrap(),
        );
        let b = assemble(&contribs, "marathon", &IpPolicy::default(), &mut alloc);
        assert!(b.rejections.is_empty(), "{apps:?}: {:?}", b.rejections);
        let mut got: Vec<String> = b
            .vips
            .iter()
            .map(|v| {
                let at = match (&v.name, v.key.ip) {
                    (None, ip) => ip.to_string(),
                    (Some(_), IpAddr::V4(ip)) => {
                        assert!(alloc.in_range(ip.into()), "{ip}");
                        "v4".into()
                    }
                    (Some(_), IpAddr::V6(ip)) => {
                        assert!(alloc.in_range(ip.into()), "{ip}");
                        "v6".into()
                    }
                };
                let backends: Vec<String> = v.backends.iter().map(|b| b.addr.to_string()).collect();
                format!("{at}: {}", backends.join(","))
            })
            .collect();
        got.sort();
        assert_eq!(got, *want, "{apps:?}");
    }
}

#[test]
fn a_name_keeps_its_address_in_a_family_while_it_has_backends_of_the_other() {
    let mut alloc = VipAllocator::new(
        "198.18.128.0/24".parse().unwrap(),
        "fd01:c::/64".parse().unwrap(),
    );
    let mut build = |backends: &[&str]| {
        let contribs = family_apps(&[("/a", "/web:80", backends)]);
        let b = assemble(&contribs, "marathon", &IpPolicy::default(), &mut alloc);
        b.vips.iter().map(|v| v.key.ip).collect::<Vec<_>>()
    };
    let both = build(&["198.18.0.1:1", "[fd00::1]:1"]);
    assert_eq!(both.len(), 2);
    // Only IPv6 for a while, then both again: the same A address comes back.
    assert_eq!(build(&["[fd00::1]:1"]), [both[1]]);
    assert_eq!(build(&["198.18.0.2:1"]), [both[0]]);
    assert_eq!(build(&["198.18.0.1:1", "[fd00::1]:1"]), both);
}

#[test]
fn a_range_that_runs_out_refuses_the_name_in_that_family_only() {
    // Five dual-stack names, three IPv6 addresses (a /126): every name keeps its A address,
    // three have an AAAA, the other two a rejection naming --vip-cidr6.
    let labels: Vec<String> = (0..5).map(|i| format!("/n{i}:80")).collect();
    let apps: Vec<FamilyApp> = labels
        .iter()
        .map(|l| ("/a", l.as_str(), &["198.18.0.1:1", "[fd00::1]:1"][..]))
        .collect();
    let mut alloc = VipAllocator::new(
        "198.18.128.0/24".parse().unwrap(),
        "fd01:c::/126".parse().unwrap(),
    );
    let b = assemble(
        &family_apps(&apps),
        "marathon",
        &IpPolicy::default(),
        &mut alloc,
    );
    let v4: Vec<_> = b.vips.iter().filter(|v| v.key.ip.is_ipv4()).collect();
    let v6: Vec<_> = b.vips.iter().filter(|v| v.key.ip.is_ipv6()).collect();
    assert_eq!((v4.len(), v6.len()), (5, 3));
    assert!(
        v4.iter()
            .all(|v| v.backends.len() == 1 && v.backends[0].addr.is_ipv4())
    );
    assert!(
        v6.iter()
            .all(|v| v.backends.len() == 1 && v.backends[0].addr.is_ipv6())
    );
    let reasons: Vec<(&str, bool)> = b
        .rejections
        .iter()
        .map(|r| (r.reason, r.error.contains("--vip-cidr6")))
        .collect();
    assert_eq!(reasons, [("exhausted", true), ("exhausted", true)]);
}
