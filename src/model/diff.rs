//! The pure difference between two VIP tables, so the agent touches only what changed.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{BackendState, Vip, VipKey, VipTable};

/// What changed from one table to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDiff {
    /// VIPs only in the new table.
    pub added: Vec<VipKey>,
    /// VIPs only in the old table.
    pub removed: Vec<VipKey>,
    /// VIPs in both whose name or backends differ.
    pub changed: Vec<VipChange>,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// How one VIP present in both tables changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipChange {
    pub key: VipKey,
    pub name_changed: bool,
    pub backends_added: Vec<SocketAddr>,
    pub backends_removed: Vec<SocketAddr>,
    /// Backends in both whose state changed, with the new state.
    pub state_changed: Vec<(SocketAddr, BackendState)>,
}

/// Compute what turns `old` into `new`. Linear in the tables' sizes, and VIPs shared by
/// pointer (see [`VipTable::share_with`]) are skipped without looking inside.
pub fn diff(old: &VipTable, new: &VipTable) -> TableDiff {
    let mut out = TableDiff::default();
    let mut a = old.vips.iter().peekable();
    let mut b = new.vips.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, _)), None) => {
                out.removed.push(**ka);
                a.next();
            }
            (None, Some((kb, _))) => {
                out.added.push(**kb);
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.removed.push(**ka);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.added.push(**kb);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb)
                        && let Some(c) = vip_change(va, vb)
                    {
                        out.changed.push(c);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

fn vip_change(old: &Vip, new: &Vip) -> Option<VipChange> {
    let mut c = VipChange {
        key: new.key,
        name_changed: old.name != new.name,
        backends_added: Vec::new(),
        backends_removed: Vec::new(),
        state_changed: Vec::new(),
    };
    // Both backend lists are sorted and unique by address.
    let mut i = old.backends.iter().peekable();
    let mut j = new.backends.iter().peekable();
    loop {
        match (i.peek(), j.peek()) {
            (None, None) => break,
            (Some(x), None) => {
                c.backends_removed.push(x.addr);
                i.next();
            }
            (None, Some(y)) => {
                c.backends_added.push(y.addr);
                j.next();
            }
            (Some(x), Some(y)) => match x.addr.cmp(&y.addr) {
                std::cmp::Ordering::Less => {
                    c.backends_removed.push(x.addr);
                    i.next();
                }
                std::cmp::Ordering::Greater => {
                    c.backends_added.push(y.addr);
                    j.next();
                }
                std::cmp::Ordering::Equal => {
                    if x.state != y.state {
                        c.state_changed.push((y.addr, y.state));
                    }
                    i.next();
                    j.next();
                }
            },
        }
    }
    let changed = c.name_changed
        || !c.backends_added.is_empty()
        || !c.backends_removed.is_empty()
        || !c.state_changed.is_empty();
    changed.then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::*;
    use crate::model::{BackendState, VipName};
    use proptest::prelude::*;

    fn t(vips: Vec<Vip>) -> VipTable {
        VipTable::new(1, vips)
    }

    #[test]
    fn cases() {
        // The VIP most cases start from, and one without backends.
        let one = || vip("11.0.0.1", 80, &["10.0.0.1:1"]);
        let bare = |port| vip("11.0.0.1", port, &[]);
        let two = vip("11.0.0.1", 80, &["10.0.0.1:1", "10.0.0.2:1"]);
        let mut draining = bare(80);
        draining.backends = vec![backend("10.0.0.1:1", BackendState::Draining)];
        let mut renamed = one();
        renamed.name = Some(VipName {
            label: "x".into(),
            framework: "marathon".into(),
        });
        // name, old, new → added, removed, changed.
        let cases = [
            ("empty", vec![], vec![], (0, 0, 0)),
            ("add", vec![], vec![bare(80)], (1, 0, 0)),
            ("remove", vec![bare(80)], vec![], (0, 1, 0)),
            ("same", vec![one()], vec![one()], (0, 0, 0)),
            ("backend added", vec![one()], vec![two], (0, 0, 1)),
            ("state change", vec![one()], vec![draining], (0, 0, 1)),
            ("rename", vec![one()], vec![renamed], (0, 0, 1)),
            (
                "port differs is a different vip",
                vec![bare(80)],
                vec![bare(81)],
                (1, 1, 0),
            ),
        ];
        for (name, old, new, want) in cases {
            let d = diff(&t(old), &t(new));
            let got = (d.added.len(), d.removed.len(), d.changed.len());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn backend_level_detail() {
        let old = t(vec![vip("11.0.0.1", 80, &["10.0.0.1:1", "10.0.0.2:1"])]);
        let mut v = vip("11.0.0.1", 80, &["10.0.0.2:1", "10.0.0.3:1"]);
        v.backends[0].state = BackendState::Draining;
        let d = diff(&old, &t(vec![v]));
        let c = &d.changed[0];
        assert_eq!(c.backends_added, vec!["10.0.0.3:1".parse().unwrap()]);
        assert_eq!(c.backends_removed, vec!["10.0.0.1:1".parse().unwrap()]);
        assert_eq!(
            c.state_changed,
            vec![("10.0.0.2:1".parse().unwrap(), BackendState::Draining)]
        );
    }

    fn arb_table() -> impl Strategy<Value = VipTable> {
        prop::collection::vec((0u8..6, prop::collection::btree_set(0u8..6, 0..4)), 0..6).prop_map(
            |vs| {
                VipTable::new(
                    1,
                    vs.into_iter().map(|(ip, bs)| {
                        let addrs: Vec<String> =
                            bs.iter().map(|b| format!("10.0.0.{b}:1")).collect();
                        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
                        vip(&format!("11.0.0.{ip}"), 80, &refs)
                    }),
                )
            },
        )
    }

    proptest! {
        /// Applying the diff to the old key set gives the new key set; diff(x, x) is empty.
        #[test]
        fn diff_is_consistent(a in arb_table(), b in arb_table()) {
            prop_assert!(diff(&a, &a).is_empty());
            let d = diff(&a, &b);
            let mut keys: std::collections::BTreeSet<_> = a.vips.keys().copied().collect();
            for k in &d.removed { prop_assert!(keys.remove(k)); }
            for k in &d.added { prop_assert!(keys.insert(*k)); }
            let new: std::collections::BTreeSet<_> = b.vips.keys().copied().collect();
            prop_assert_eq!(keys, new);
            prop_assert_eq!(d.is_empty(), a.same_content(&b));
        }
    }
}
