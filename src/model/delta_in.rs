//! An agent's reading of `GET /v1/vips/delta`: the [`DeltaJson`](super::wire::DeltaJson)
//! wire shape parsed straight into model types. Each VIP entry borrows its strings from the
//! body and becomes its [`Vip`]s before the next entry is read, so no `Vec<VipJson>` of the
//! whole table is ever held beside the body (a 32 MiB delta once cost an agent 843 MiB).
//! Pure: no I/O, only `model` and serde.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, de};

use super::wire::{KeyJson, split_fqdn};
use super::{AppTasks, Backend, BackendState, Protocol, TaskRecord, Vip, VipName, VipTable};

/// A delta as an agent applies it: the same fields as the wire's `DeltaJson`, its VIPs and
/// apps already model values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Delta {
    pub from: u64,
    pub to: u64,
    pub full: bool,
    /// A dual-stack entry (`ip6`) is two VIPs here, as in the table.
    #[serde(deserialize_with = "vips")]
    pub upsert: Vec<Vip>,
    pub remove: Vec<KeyJson>,
    #[serde(default, deserialize_with = "apps")]
    pub upsert_apps: Vec<(String, Arc<AppTasks>)>,
    #[serde(default)]
    pub remove_apps: Vec<String>,
}

impl Delta {
    /// Parse an answer body.
    pub fn from_slice(body: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(body)
    }

    /// Apply to `base` (which must be version `from` unless `full`), giving version `to`.
    pub fn apply(self, base: &VipTable) -> VipTable {
        if self.full {
            return VipTable::new(self.to, self.upsert).with_apps(self.upsert_apps);
        }
        let remove = self.remove.into_iter().map(KeyJson::key);
        base.patched(
            self.to,
            remove,
            self.upsert,
            self.remove_apps,
            self.upsert_apps,
        )
    }
}

/// A string borrowed from the body when it has no escapes, owned otherwise (serde's own
/// `Cow<str>` is always owned).
#[derive(Debug, Default)]
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_string())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// One entry of `upsert`, as long as it is being read. Agent-only counters are ignored.
#[derive(Deserialize)]
struct VipIn<'a> {
    /// Required as on the wire, though the VIP is rebuilt from the other fields.
    #[serde(borrow)]
    #[allow(dead_code)]
    vip: Str<'a>,
    protocol: Protocol,
    #[serde(borrow)]
    name: Option<Str<'a>>,
    #[serde(default, borrow)]
    label: Option<Str<'a>>,
    #[serde(default, borrow)]
    framework: Option<Str<'a>>,
    ip: IpAddr,
    #[serde(default)]
    ip6: Option<IpAddr>,
    port: u16,
    #[serde(borrow)]
    backend: Vec<BackendIn<'a>>,
}

#[derive(Deserialize)]
struct BackendIn<'a> {
    ip: IpAddr,
    port: u16,
    state: BackendState,
    #[serde(default, borrow)]
    app: Str<'a>,
    #[serde(default, borrow)]
    task: Str<'a>,
}

impl VipIn<'_> {
    /// Its VIPs (one, or two for an older controller's entry with `ip6`) onto `out`. A named VIP without
    /// `label`/`framework` (a plain DC/OS payload) recovers them from `name`, as
    /// `VipJson::into_vip` does.
    fn push_into(self, out: &mut Vec<Vip>) {
        let name = match (self.label, self.framework, self.name) {
            (Some(label), Some(framework), _) => Some(VipName {
                label: label.0.into_owned(),
                framework: framework.0.into_owned(),
            }),
            (_, _, Some(fqdn)) => split_fqdn(&fqdn.0),
            _ => None,
        };
        // Backends of one VIP nearly always come from one app: share its id.
        let mut app: Arc<str> = Arc::from("");
        let backends = self
            .backend
            .into_iter()
            .map(|b| {
                if *app != *b.app.0 {
                    app = Arc::from(b.app.0.as_ref());
                }
                Backend {
                    addr: SocketAddr::new(b.ip, b.port),
                    state: b.state,
                    app: Arc::clone(&app),
                    task: Arc::from(b.task.0.as_ref()),
                }
            })
            .collect();
        let mut v = Vip::normalized((self.ip, self.port, self.protocol), name, backends);
        if let Some(ip6) = self.ip6 {
            // An older controller's dual-stack entry: each address its own family's backends.
            let mut six = v.clone();
            six.key.ip = ip6;
            let v4 = |b: &Backend| b.addr.ip().to_canonical().is_ipv4();
            let first_v4 = self.ip.to_canonical().is_ipv4();
            v.backends.retain(|b| v4(b) == first_v4);
            six.backends.retain(|b| v4(b) != first_v4);
            out.push(v);
            out.push(six);
        } else {
            out.push(v);
        }
    }
}

/// `upsert`, one entry at a time.
fn vips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vip>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Vip>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of VIPs")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Vip>, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element::<VipIn<'de>>()? {
                v.push_into(&mut out);
            }
            out.shrink_to_fit();
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

/// One app's tasks: the wire's `AppTasksJson` without `#[serde(flatten)]` (which buffers
/// every app in a generic tree first).
#[derive(Deserialize)]
struct AppIn {
    app: String,
    name: String,
    framework: String,
    tasks: Vec<TaskRecord>,
}

fn apps<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, Arc<AppTasks>)>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, Arc<AppTasks>)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of apps")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(a) = seq.next_element::<AppIn>()? {
                let tasks = AppTasks {
                    name: a.name,
                    framework: a.framework,
                    tasks: a.tasks,
                };
                out.push((a.app, Arc::new(tasks)));
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::*;
    use crate::model::wire::DeltaJson;
    use crate::model::{TaskPort, VipTable};
    use proptest::prelude::*;

    fn apps(n: u32) -> Vec<(String, Arc<AppTasks>)> {
        (0..n)
            .map(|i| {
                let t = AppTasks {
                    name: format!("app{i}"),
                    framework: "marathon".into(),
                    tasks: vec![TaskRecord {
                        id: format!("app{i}.t\"{i}"),
                        host: Some([198, 18, 0, i as u8].into()),
                        container: vec![],
                        ports: vec![TaskPort {
                            port: 31000,
                            protocol: Protocol::Udp,
                            name: Some("dns".into()),
                        }],
                    }],
                };
                (format!("/app{i}"), Arc::new(t))
            })
            .collect()
    }

    /// Both readings of `body` applied to `base` give the same table.
    fn same_as_wire(body: &str, base: &VipTable) {
        let wire: DeltaJson = serde_json::from_str(body).unwrap();
        let ours = Delta::from_slice(body.as_bytes()).unwrap();
        assert_eq!(ours.apply(base), wire.apply(base), "{body}");
    }

    #[test]
    fn reads_what_the_wire_reader_reads() {
        let mut dual = named("db", "11.1.2.3", 9042, Protocol::Tcp);
        let mut six = named("db", "fd01:c::7", 9042, Protocol::Tcp);
        let b = ["198.18.1.2:9042", "[fd00::2]:9042"];
        dual.backends = vip("11.1.2.3", 1, &b).backends;
        six.backends = dual.backends.clone();
        let old = VipTable::new(3, [vip("198.18.5.5", 80, &["198.18.1.3:1"])]).with_apps(apps(3));
        let new = VipTable::new(
            4,
            [
                dual,
                six,
                vip("198.18.5.6", 80, &["198.18.1.3:1", "198.18.1.4:1"]),
            ],
        )
        .with_apps(apps(2));
        // Full, delta, and a delta that only removes.
        same_as_wire(
            &serde_json::to_string(&DeltaJson::between(None, &new)).unwrap(),
            &VipTable::default(),
        );
        same_as_wire(
            &serde_json::to_string(&DeltaJson::between(Some(&old), &new)).unwrap(),
            &old,
        );
        same_as_wire(
            &serde_json::to_string(&DeltaJson::between(Some(&new), &old)).unwrap(),
            &new,
        );
        // A plain DC/OS entry: no label/framework, escapes in strings, counters to ignore.
        let dcos = r#"{"from":0,"to":9,"full":true,"remove":[],"upsert":[{"vip":"web.marathon.l4lb.thisdcos.directory:80",
            "protocol":"tcp","name":"web.marathon.l4lb.thisdcos.directory","ip":"11.0.0.1","port":80,
            "connections_ok":5,"backend":[{"ip":"198.18.0.1","port":8080,"state":"draining","app":"/w\u0065b",
            "task":"w\"1","connections":3,"ejected":true}]}]}"#;
        same_as_wire(dcos, &VipTable::default());
    }

    #[test]
    fn refuses_what_the_wire_reader_refuses() {
        for body in [
            r#"{"from":0,"to":1,"full":true,"remove":[]}"#,
            r#"{"from":0,"to":1,"full":true,"remove":[],"upsert":[{"protocol":"tcp","name":null,"ip":"11.0.0.1","port":80,"backend":[]}]}"#,
            r#"{"from":0,"to":1,"full":true,"remove":[],"upsert":[{"vip":"x","protocol":"sctp","name":null,"ip":"11.0.0.1","port":80,"backend":[]}]}"#,
            r#"{"from":0,"to":1,"full":true,"remove":[],"upsert":{}}"#,
            r#"{"from":0,"to":1,"full":true,"remove":[],"upsert":[],"upsert_apps":[{"app":"/a","name":"a","tasks":[]}]}"#,
        ] {
            assert!(serde_json::from_str::<DeltaJson>(body).is_err(), "{body}");
            assert!(Delta::from_slice(body.as_bytes()).is_err(), "{body}");
        }
    }

    proptest! {
        /// Any change between two random tables reads back the same through both readers.
        #[test]
        fn any_delta_reads_the_same(
            a in proptest::collection::vec((0u8..6, 1u16..4, proptest::collection::vec(0u8..5, 0..4)), 0..6),
            b in proptest::collection::vec((0u8..6, 1u16..4, proptest::collection::vec(0u8..5, 0..4)), 0..6),
        ) {
            let table = |v: u64, spec: &[(u8, u16, Vec<u8>)]| {
                let vips = spec.iter().map(|(ip, port, bs)| {
                    let bs: Vec<String> = bs.iter().map(|b| format!("198.18.1.{b}:31000")).collect();
                    let bs: Vec<&str> = bs.iter().map(String::as_str).collect();
                    vip(&format!("11.0.0.{ip}"), *port, &bs)
                });
                VipTable::new(v, vips).with_apps(apps(spec.len() as u32))
            };
            let (old, new) = (table(1, &a), table(2, &b));
            same_as_wire(&serde_json::to_string(&DeltaJson::between(Some(&old), &new)).unwrap(), &old);
            same_as_wire(&serde_json::to_string(&DeltaJson::between(None, &new)).unwrap(), &old);
        }
    }
}
