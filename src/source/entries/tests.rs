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
