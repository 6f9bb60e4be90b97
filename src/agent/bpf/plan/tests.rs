use std::collections::BTreeMap;

use proptest::prelude::*;

use super::Limits;
use super::*;
use crate::model::test_util::backend;
use crate::model::{Protocol, Vip};

/// The maps as the kernel would hold them after each operation.
#[derive(Debug, Default)]
struct Maps {
    services: BTreeMap<VipKey, (u32, u32)>,
    backends: BTreeMap<(u32, u32), SocketAddr>,
}

impl Maps {
    /// Apply `ops`, checking after every one that each service entry points to a complete set
    /// whose backends are all allowed for that VIP (old or new active set).
    fn apply(&mut self, ops: &[Op], allowed: &dyn Fn(&VipKey, &SocketAddr) -> bool) {
        for op in ops {
            match op {
                Op::ResetCounter { .. } => {}
                Op::PutBackend {
                    set, slot, addr, ..
                } => {
                    assert!(
                        !self.services.values().any(|(_, s)| s == set),
                        "{op:?} writes a set in use"
                    );
                    self.backends.insert((*set, *slot), *addr);
                }
                Op::PutService { vip, set, count } => {
                    self.services.insert(*vip, (*count, *set));
                }
                Op::DelService { vip } => {
                    self.services.remove(vip);
                }
                Op::DelBackend { set, slot } => {
                    self.backends.remove(&(*set, *slot));
                }
            }
            for (vip, (count, set)) in &self.services {
                assert!(*count > 0);
                for slot in 0..*count {
                    let a = self.backends.get(&(*set, slot)).unwrap_or_else(|| {
                        panic!("{vip}: set {set} slot {slot} missing after {op:?}")
                    });
                    assert!(allowed(vip, a), "{vip} -> {a} after {op:?}");
                }
            }
        }
    }

    /// The backends each VIP is translated to.
    fn view(&self) -> BTreeMap<VipKey, Vec<SocketAddr>> {
        self.services
            .iter()
            .map(|(k, (count, set))| (*k, (0..*count).map(|s| self.backends[&(*set, s)]).collect()))
            .collect()
    }
}

fn key(i: u8, protocol: Protocol) -> VipKey {
    VipKey {
        ip: format!("198.18.0.{i}").parse().unwrap(),
        port: 80,
        protocol,
    }
}

fn vip(k: VipKey, backends: &[(&str, BackendState)]) -> Vip {
    Vip {
        key: k,
        name: None,
        backends: backends.iter().map(|(a, s)| backend(a, *s)).collect(),
    }
}

fn want(table: &VipTable, ejected: &BTreeSet<SocketAddr>) -> BTreeMap<VipKey, Vec<SocketAddr>> {
    table
        .vips
        .iter()
        .map(|(k, v)| {
            // Probes eject TCP backends only: a UDP VIP keeps every active backend.
            let a: Vec<_> = v
                .active_backends()
                .map(|b| b.addr)
                .filter(|a| k.protocol == Protocol::Udp || !ejected.contains(a))
                .collect();
            (*k, a)
        })
        .filter(|(_, a)| !a.is_empty())
        .collect()
}

const A: &str = "198.18.1.1:80";
const B: &str = "198.18.1.2:80";
const C: &str = "198.18.1.3:80";
use BackendState::{Active, Draining};

#[test]
fn cases() {
    struct Case {
        name: &'static str,
        before: Vec<Vip>,
        after: Vec<Vip>,
        ejected: Vec<&'static str>,
        /// Operations other than counter resets.
        map_ops: usize,
    }
    let t = key(1, Protocol::Tcp);
    let t2 = key(2, Protocol::Tcp);
    let u = key(1, Protocol::Udp);
    let cases = [
        Case {
            name: "nothing changes: nothing written",
            before: vec![vip(t, &[(A, Active), (B, Active)])],
            after: vec![vip(t, &[(A, Active), (B, Active)])],
            ejected: vec![],
            map_ops: 0,
        },
        Case {
            name: "new VIP: its set, then its service",
            before: vec![],
            after: vec![vip(t, &[(A, Active), (B, Active)])],
            ejected: vec![],
            map_ops: 3,
        },
        Case {
            name: "one backend added: new set of 3, switch, old set of 2 freed",
            before: vec![vip(t, &[(A, Active), (B, Active)])],
            after: vec![vip(t, &[(A, Active), (B, Active), (C, Active)])],
            ejected: vec![],
            map_ops: 3 + 1 + 2,
        },
        Case {
            name: "backend turns draining: left out of the new set",
            before: vec![vip(t, &[(A, Active), (B, Active)])],
            after: vec![vip(t, &[(A, Active), (B, Draining)])],
            ejected: vec![],
            map_ops: 1 + 1 + 2,
        },
        Case {
            name: "last active backend drains: service deleted (proxy fallback)",
            before: vec![vip(t, &[(A, Active)])],
            after: vec![vip(t, &[(A, Draining)])],
            ejected: vec![],
            map_ops: 2,
        },
        Case {
            name: "VIP removed: service, then its slots",
            before: vec![vip(t, &[(A, Active), (B, Active)]), vip(u, &[(A, Active)])],
            after: vec![vip(u, &[(A, Active)])],
            ejected: vec![],
            map_ops: 3,
        },
        Case {
            name: "ejected backend left out of every TCP VIP it serves",
            before: vec![
                vip(t, &[(A, Active), (B, Active)]),
                vip(t2, &[(A, Active), (C, Active)]),
            ],
            after: vec![
                vip(t, &[(A, Active), (B, Active)]),
                vip(t2, &[(A, Active), (C, Active)]),
            ],
            ejected: vec![A],
            map_ops: (1 + 1 + 2) * 2,
        },
        Case {
            name: "a probe's ejection does not touch a UDP VIP on the same address",
            before: vec![vip(t, &[(A, Active), (B, Active)]), vip(u, &[(A, Active)])],
            after: vec![vip(t, &[(A, Active), (B, Active)]), vip(u, &[(A, Active)])],
            ejected: vec![A],
            map_ops: 1 + 1 + 2,
        },
    ];
    for c in cases {
        let mut p = Planner::default();
        let mut maps = Maps::default();
        let before = Arc::new(VipTable::new(1, c.before));
        let any = |_: &VipKey, _: &SocketAddr| true;
        maps.apply(&p.plan(&before, &Ejected::default()), &any);
        let after = Arc::new(VipTable::new(2, c.after));
        let ejected: BTreeSet<SocketAddr> = c.ejected.iter().map(|a| a.parse().unwrap()).collect();
        let ops = p.plan(&after, &Arc::new(ejected.clone()));
        let n = ops
            .iter()
            .filter(|o| !matches!(o, Op::ResetCounter { .. }))
            .count();
        assert_eq!(n, c.map_ops, "{}: {ops:#?}", c.name);
        maps.apply(&ops, &any);
        assert_eq!(maps.view(), want(&after, &ejected), "{}", c.name);
        for (k, addrs) in maps.view() {
            assert_eq!(p.installed(&k), addrs.as_slice(), "{}", c.name);
        }
    }
}

#[test]
fn counters_survive_state_changes_and_are_freed_with_their_backend() {
    let t = key(1, Protocol::Tcp);
    let mut p = Planner::default();
    let one = Arc::new(VipTable::new(1, [vip(t, &[(A, Active), (B, Active)])]));
    let ops = p.plan(&one, &Ejected::default());
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::ResetCounter { .. }))
            .count(),
        2
    );
    let ca = p.counter(&t, A.parse().unwrap()).unwrap();
    let two = Arc::new(VipTable::new(2, [vip(t, &[(A, Draining), (B, Active)])]));
    let ops = p.plan(&two, &Ejected::default());
    assert!(!ops.iter().any(|o| matches!(o, Op::ResetCounter { .. })));
    assert_eq!(
        p.counter(&t, A.parse().unwrap()),
        Some(ca),
        "a draining backend keeps its count"
    );
    let three = Arc::new(VipTable::new(3, [vip(t, &[(B, Active)])]));
    p.plan(&three, &Ejected::default());
    assert_eq!(p.counter(&t, A.parse().unwrap()), None);
    let four = Arc::new(VipTable::new(4, [vip(t, &[(B, Active), (C, Active)])]));
    let ops = p.plan(&four, &Ejected::default());
    assert_eq!(
        ops[0],
        Op::ResetCounter { counter: ca },
        "a freed counter is zeroed on reuse"
    );
}

#[test]
fn vips_that_do_not_fit_stay_with_the_proxy_until_room_is_made() {
    let (t1, t2, t3) = (
        key(1, Protocol::Tcp),
        key(2, Protocol::Tcp),
        key(3, Protocol::Tcp),
    );
    let mut p = Planner::with_limits(Limits {
        services: 2,
        slots: 4,
    });
    let mut maps = Maps::default();
    let any = |_: &VipKey, _: &SocketAddr| true;
    let none = Ejected::default();
    let three = Arc::new(VipTable::new(
        1,
        [
            vip(t1, &[(A, Active), (B, Active)]),
            vip(t2, &[(A, Active)]),
            vip(t3, &[(C, Active)]),
        ],
    ));
    maps.apply(&p.plan(&three, &none), &any);
    assert_eq!(maps.services.len(), 2, "two services fit");
    assert_eq!(p.over_capacity(), 1);
    // A set that would not fit beside the one it replaces is not written: the VIP goes to
    // the proxy rather than to a half-written set.
    let installed: Vec<VipKey> = maps.services.keys().copied().collect();
    assert!(installed.len() == 2 && maps.backends.len() <= 4);
    // Room made by removing t1: the waiting VIP moves in.
    let two = Arc::new(VipTable::new(
        2,
        [vip(t2, &[(A, Active)]), vip(t3, &[(C, Active)])],
    ));
    maps.apply(&p.plan(&two, &none), &any);
    assert_eq!(maps.view(), want(&two, &none));
    assert_eq!(p.over_capacity(), 0);
}

fn arb_table() -> impl Strategy<Value = Vec<Vip>> {
    let addrs = [
        "198.18.1.1:80",
        "198.18.1.2:80",
        "198.18.1.3:81",
        "[fd00::1]:80",
    ];
    prop::collection::vec(
        (
            1u8..5,
            prop::bool::ANY,
            prop::collection::vec((0usize..4, prop::bool::ANY), 0..5),
        ),
        0..6,
    )
    .prop_map(move |vs| {
        vs.into_iter()
            .map(|(i, udp, bs)| {
                let k = key(i, if udp { Protocol::Udp } else { Protocol::Tcp });
                let bs: Vec<_> = bs
                    .into_iter()
                    .map(|(a, active)| (addrs[a], if active { Active } else { Draining }))
                    .collect();
                vip(k, &bs)
            })
            .collect()
    })
}

fn arb_ejected() -> impl Strategy<Value = BTreeSet<SocketAddr>> {
    prop::collection::btree_set(
        prop::sample::select(vec!["198.18.1.1:80", "198.18.1.2:80", "[fd00::1]:80"])
            .prop_map(|a| a.parse::<SocketAddr>().unwrap()),
        0..3,
    )
}

proptest! {
    /// Whatever sequence of tables and ejections: after each plan the maps hold exactly the
    /// active, non-ejected backends of every VIP; no service entry ever points to an
    /// incomplete set or to a backend that is in neither the old nor the new set; ids in use
    /// are unique.
    #[test]
    fn maps_follow_any_sequence(steps in prop::collection::vec((arb_table(), arb_ejected()), 1..8)) {
        let mut p = Planner::default();
        let mut maps = Maps::default();
        let mut prev_want: BTreeMap<VipKey, Vec<SocketAddr>> = BTreeMap::new();
        for (i, (vips, ejected)) in steps.into_iter().enumerate() {
            let mut table = VipTable::new(i as u64 + 1, vips);
            table = table.share_with(&p.table);
            let table = Arc::new(table);
            let now_want = want(&table, &ejected);
            let ops = p.plan(&table, &Arc::new(ejected.clone()));
            let allowed = |k: &VipKey, a: &SocketAddr| {
                prev_want.get(k).is_some_and(|v| v.contains(a))
                    || now_want.get(k).is_some_and(|v| v.contains(a))
            };
            maps.apply(&ops, &allowed);
            prop_assert_eq!(maps.view(), now_want.clone());
            let live: usize = maps.services.values().map(|(c, _)| *c as usize).sum();
            prop_assert_eq!(maps.backends.len(), live, "no orphan slots");
            let mut ids: Vec<u32> = p.counters().map(|(_, _, c)| c).collect();
            let n = ids.len();
            ids.sort_unstable();
            ids.dedup();
            prop_assert_eq!(ids.len(), n, "counter ids unique");
            prop_assert_eq!(n, table.backend_count());
            prev_want = now_want;
        }
    }
}

proptest! {
    /// With maps too small for the tables: never more entries than the maps hold (a new set
    /// counted beside the old one), every installed VIP has exactly its active backends, and
    /// every VIP with active backends is either installed or counted as waiting.
    #[test]
    fn maps_never_overflow(
        services in 1usize..4,
        slots in 1usize..8,
        steps in prop::collection::vec((arb_table(), arb_ejected()), 1..8),
    ) {
        let mut p = Planner::with_limits(Limits { services, slots });
        let mut maps = Maps::default();
        for (i, (vips, ejected)) in steps.into_iter().enumerate() {
            let table = Arc::new(VipTable::new(i as u64 + 1, vips).share_with(&p.table));
            let now_want = want(&table, &ejected);
            let ops = p.plan(&table, &Arc::new(ejected.clone()));
            let mut peak = maps.backends.len();
            for op in &ops {
                maps.apply(std::slice::from_ref(op), &|_, _| true);
                peak = peak.max(maps.backends.len());
                prop_assert!(maps.services.len() <= services);
            }
            prop_assert!(peak <= slots, "{peak} slots > {slots}");
            for (k, addrs) in maps.view() {
                prop_assert_eq!(Some(&addrs), now_want.get(&k));
            }
            prop_assert_eq!(maps.services.len() + p.over_capacity(), now_want.len());
        }
    }
}

#[test]
fn moves_name_the_pairs_that_left_and_came_back() {
    let (t, u) = (key(1, Protocol::Tcp), key(1, Protocol::Udp));
    let (a, b): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
    let mut p = Planner::default();
    let none = Ejected::default();
    let one = Arc::new(VipTable::new(
        1,
        [
            vip(t, &[(A, Active), (B, Active)]),
            vip(u, &[(A, Active), (B, Active)]),
        ],
    ));
    p.plan(&one, &none);
    let m = p.take_moves();
    assert!(m.left_kernel.is_empty() && m.left_table.is_empty());
    assert_eq!(m.back.len(), 4, "every backend of a new VIP arrives");

    // A is ejected: it leaves the TCP VIP's set (not the table), and the UDP VIP keeps it.
    p.plan(&one, &Arc::new(BTreeSet::from([a])));
    let m = p.take_moves();
    assert_eq!(m.left_kernel, vec![(t, a)]);
    assert!(m.left_table.is_empty());
    assert_eq!(p.not_translated(&u), None);

    // B is removed from both, A turns draining in the UDP VIP.
    let two = Arc::new(VipTable::new(
        2,
        [vip(t, &[(A, Active)]), vip(u, &[(A, Draining)])],
    ));
    p.plan(&two, &Arc::new(BTreeSet::from([a])));
    let mut m = p.take_moves();
    m.left_kernel.sort();
    m.left_table.sort();
    assert_eq!(m.left_kernel, vec![(t, b), (u, a), (u, b)]);
    assert_eq!(m.left_table, vec![(t, b), (u, a), (u, b)]);
    assert_eq!(p.not_translated(&t), Some(NotTranslated::AllEjected));
    assert_eq!(p.not_translated(&u), Some(NotTranslated::NoActiveBackend));

    // A is active in the UDP VIP again; the TCP VIP goes.
    let three = Arc::new(VipTable::new(3, [vip(u, &[(A, Active)])]));
    p.plan(&three, &none);
    let m = p.take_moves();
    assert_eq!(m.back, vec![(u, a)]);
    assert_eq!(m.left_table, vec![(t, a)]);
    assert!(m.left_kernel.is_empty(), "the TCP VIP had no set left");
    assert_eq!(p.not_translated(&t), None, "not in the table");
}
