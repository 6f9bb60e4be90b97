//! The pure planner: from the table (and the backends health has ejected) applied last to the
//! next, the map operations that take the kernel from one to the other.
//!
//! Only VIPs the table diff or an ejection change names are looked at, so a one-backend
//! change costs O(that VIP's backends) map writes however many VIPs there are. A changed VIP's
//! active backends are written as a new set that no service entry points to yet, then the
//! service entry is switched to it in one update, then the old set's slots are deleted: a
//! `connect()` sees the old set or the new one, never a half-written one. A VIP with no active
//! backend has no service entry at all: the programs leave it alone and the proxy listener on
//! the VIP address serves it (the fallback). Health ejections (from TCP probes) apply to TCP
//! VIPs only: a UDP backend is judged by the source's health alone, whatever answers TCP on
//! its port. Each plan also records which (VIP, backend) pairs left (and came back), so the
//! sockets connected through them can follow ([`Moves`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::model::{BackendState, VipKey, VipTable, diff};

/// Entries of the `counters` map (`MAX_COUNTERS` in the C source).
pub(crate) const MAX_COUNTERS: u32 = 65536;
/// Entries of the `services` map (`MAX_SERVICES`).
pub(crate) const MAX_SERVICES: usize = 65536;
/// Entries of the `backends` map (`MAX_BACKENDS`).
pub(crate) const MAX_SLOTS: usize = 262_144;
/// The counter index of a backend when every counter is taken: the programs' lookup fails
/// and nothing is counted.
pub(crate) const NO_COUNTER: u32 = u32::MAX;

/// One map operation, in the order it must be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Zero a counter before a backend first uses it.
    ResetCounter { counter: u32 },
    /// Write a slot of a set no service entry points to yet.
    PutBackend {
        set: u32,
        slot: u32,
        addr: SocketAddr,
        counter: u32,
    },
    /// Point `vip` at `set`, `count` backends: the one update that switches a VIP.
    PutService { vip: VipKey, set: u32, count: u32 },
    /// Stop translating `vip`: it goes to the VIP address (the proxy) again.
    DelService { vip: VipKey },
    /// Delete a slot of a set no service entry points to any more.
    DelBackend { set: u32, slot: u32 },
}

/// (VIP, backend) pairs a plan moved, for the sockets connected through them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Moves {
    /// No longer translated to: removed, draining, ejected, or the VIP left the kernel.
    pub(crate) left_kernel: Vec<(VipKey, SocketAddr)>,
    /// No longer an active backend of the VIP in the table (removed or draining; not ejected).
    pub(crate) left_table: Vec<(VipKey, SocketAddr)>,
    /// Active backends of the VIP in the table again.
    pub(crate) back: Vec<(VipKey, SocketAddr)>,
}

/// Why a VIP of the table has no service entry: the proxy serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotTranslated {
    /// No backend is active by the source's account.
    NoActiveBackend,
    /// Every active backend of this TCP VIP failed its probe.
    AllEjected,
    /// The maps are full.
    MapsFull,
}

/// Ids handed out from a pool, smallest free first is not needed: freed ids are reused.
#[derive(Debug, Default)]
struct IdPool {
    next: u32,
    free: Vec<u32>,
}

impl IdPool {
    fn take(&mut self, limit: u32) -> Option<u32> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        (self.next < limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

/// What the maps hold for one VIP with a service entry.
#[derive(Debug, Clone)]
struct Installed {
    set: u32,
    backends: Vec<SocketAddr>,
}

/// How many entries the maps take. A VIP that does not fit stays with the proxy (no service
/// entry) instead of failing the writes of every VIP.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) services: usize,
    /// Backend slots, counting a new set written beside the one it replaces.
    pub(crate) slots: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            services: MAX_SERVICES,
            slots: MAX_SLOTS,
        }
    }
}

/// The planner's record of what the maps hold.
#[derive(Debug, Default)]
pub(crate) struct Planner {
    limits: Limits,
    /// Backend slots written (sum of installed sets).
    slots: usize,
    /// VIPs with active backends left to the proxy because the maps were full: looked at
    /// again by every plan, so they move in when room is made.
    waiting: BTreeSet<VipKey>,
    table: Arc<VipTable>,
    ejected: BTreeSet<SocketAddr>,
    installed: HashMap<VipKey, Installed>,
    /// VIPs of `table` by backend address, to find the VIPs an ejection change touches.
    by_backend: HashMap<SocketAddr, Vec<VipKey>>,
    counters: HashMap<(VipKey, SocketAddr), u32>,
    sets: IdPool,
    counter_ids: IdPool,
    /// What the plans since the last [`Planner::take_moves`] moved.
    moves: Moves,
}

/// Whether `b` of `k` is translated to, with `ejected` backends out (TCP VIPs only).
fn eligible(k: &VipKey, b: &crate::model::Backend, ejected: &BTreeSet<SocketAddr>) -> bool {
    b.state == BackendState::Active
        && !(k.protocol == crate::model::Protocol::Tcp && ejected.contains(&b.addr))
}

impl Planner {
    #[cfg(test)]
    pub(crate) fn with_limits(limits: Limits) -> Planner {
        Planner {
            limits,
            ..Planner::default()
        }
    }

    /// VIPs left to the proxy because the maps are full.
    pub(crate) fn over_capacity(&self) -> usize {
        self.waiting.len()
    }

    /// The counter index of `backend` of `vip`, if it has one.
    #[cfg(test)]
    pub(crate) fn counter(&self, vip: &VipKey, backend: SocketAddr) -> Option<u32> {
        self.counters
            .get(&(*vip, backend))
            .copied()
            .filter(|c| *c != NO_COUNTER)
    }

    /// The backends `vip` is translated to now, in slot order (empty: not translated).
    pub(crate) fn installed(&self, vip: &VipKey) -> &[SocketAddr] {
        self.installed
            .get(vip)
            .map_or(&[], |i| i.backends.as_slice())
    }

    /// The VIPs with a service entry.
    pub(crate) fn translated(&self) -> impl Iterator<Item = &VipKey> {
        self.installed.keys()
    }

    /// Number of VIPs with a service entry.
    pub(crate) fn installed_count(&self) -> usize {
        self.installed.len()
    }

    /// The operations that turn the maps from the last planned state into `table` with
    /// `ejected` backends left out, and record that state as planned.
    pub(crate) fn plan(
        &mut self,
        table: &Arc<VipTable>,
        ejected: &BTreeSet<SocketAddr>,
    ) -> Vec<Op> {
        let prev = Arc::clone(&self.table);
        let d = diff(&prev, table);
        let mut touched: BTreeSet<VipKey> = BTreeSet::new();
        let mut gone: Vec<(VipKey, SocketAddr)> = Vec::new();
        let mut ops = Vec::new();

        for k in &d.removed {
            touched.insert(*k);
            if let Some(v) = prev.vips.get(k) {
                for b in &v.backends {
                    self.unindex(b.addr, k);
                    gone.push((*k, b.addr));
                    if b.state == BackendState::Active {
                        self.moves.left_table.push((*k, b.addr));
                    }
                }
            }
        }
        for k in &d.added {
            touched.insert(*k);
            if let Some(v) = table.vips.get(k) {
                for b in &v.backends {
                    self.index(b.addr, *k, &mut ops);
                    if b.state == BackendState::Active {
                        self.moves.back.push((*k, b.addr));
                    }
                }
            }
        }
        for c in &d.changed {
            if c.backends_added.is_empty()
                && c.backends_removed.is_empty()
                && c.state_changed.is_empty()
            {
                continue; // a new name changes nothing in the kernel
            }
            touched.insert(c.key);
            for a in &c.backends_removed {
                self.unindex(*a, &c.key);
                gone.push((c.key, *a));
                self.moves.left_table.push((c.key, *a));
            }
            for a in &c.backends_added {
                self.index(*a, c.key, &mut ops);
                self.moves.back.push((c.key, *a));
            }
            for (a, state) in &c.state_changed {
                match state {
                    BackendState::Active => self.moves.back.push((c.key, *a)),
                    BackendState::Draining => self.moves.left_table.push((c.key, *a)),
                }
            }
        }
        for a in self.ejected.symmetric_difference(ejected) {
            if let Some(keys) = self.by_backend.get(a) {
                touched.extend(keys.iter().copied());
            }
        }

        touched.extend(std::mem::take(&mut self.waiting));
        let mut free_sets = Vec::new();
        for k in touched {
            let want: Vec<SocketAddr> = table.vips.get(&k).map_or_else(Vec::new, |v| {
                v.backends
                    .iter()
                    .filter(|b| eligible(&k, b, ejected))
                    .map(|b| b.addr)
                    .collect()
            });
            let old = self.installed.get(&k);
            if old.is_some_and(|o| o.backends == want) || (old.is_none() && want.is_empty()) {
                continue;
            }
            let old = self.installed.remove(&k);
            if let Some(o) = &old {
                let left = o.backends.iter().filter(|a| !want.contains(a));
                self.moves.left_kernel.extend(left.map(|a| (k, *a)));
            }
            // The new set is written while the old one still stands.
            let fits = self.slots + want.len() <= self.limits.slots
                && (old.is_some() || self.installed.len() < self.limits.services);
            if !want.is_empty() && !fits {
                self.waiting.insert(k);
            }
            let new_set = if want.is_empty() || !fits {
                ops.push(Op::DelService { vip: k });
                None
            } else if let Some(set) = self.sets.take(u32::MAX) {
                self.slots += want.len();
                for (slot, addr) in want.iter().enumerate() {
                    ops.push(Op::PutBackend {
                        set,
                        slot: slot as u32,
                        addr: *addr,
                        counter: self
                            .counters
                            .get(&(k, *addr))
                            .copied()
                            .unwrap_or(NO_COUNTER),
                    });
                }
                ops.push(Op::PutService {
                    vip: k,
                    set,
                    count: want.len() as u32,
                });
                Some(Installed {
                    set,
                    backends: want,
                })
            } else {
                ops.push(Op::DelService { vip: k }); // 2^32 sets in use: serve by proxy
                None
            };
            if let Some(o) = old {
                self.slots -= o.backends.len();
                for slot in 0..o.backends.len() {
                    ops.push(Op::DelBackend {
                        set: o.set,
                        slot: slot as u32,
                    });
                }
                free_sets.push(o.set);
            }
            if let Some(n) = new_set {
                self.installed.insert(k, n);
            }
        }
        // Ids are reused only by later plans, after these operations have been applied.
        self.sets.free.extend(free_sets);
        for g in gone {
            if let Some(c) = self.counters.remove(&g)
                && c != NO_COUNTER
            {
                self.counter_ids.free.push(c);
            }
        }
        self.table = Arc::clone(table);
        self.ejected = ejected.clone();
        ops
    }

    fn index(&mut self, addr: SocketAddr, k: VipKey, ops: &mut Vec<Op>) {
        // A `Vec`: most addresses back one VIP or a few, and an empty `BTreeSet`'s first
        // node alone is ~300 bytes (per backend address, on an agent with 100,000).
        let keys = self.by_backend.entry(addr).or_default();
        if !keys.contains(&k) {
            keys.push(k);
        }
        let counter = self.counter_ids.take(MAX_COUNTERS).unwrap_or(NO_COUNTER);
        if counter != NO_COUNTER {
            ops.push(Op::ResetCounter { counter });
        }
        self.counters.insert((k, addr), counter);
    }

    fn unindex(&mut self, addr: SocketAddr, k: &VipKey) {
        if let Some(keys) = self.by_backend.get_mut(&addr) {
            keys.retain(|x| x != k);
            if keys.is_empty() {
                self.by_backend.remove(&addr);
            }
        }
    }

    /// The pairs moved since the last call.
    pub(crate) fn take_moves(&mut self) -> Moves {
        std::mem::take(&mut self.moves)
    }

    /// Why `vip` of the table planned last has no service entry (`None`: it has one, or it is
    /// not in the table).
    pub(crate) fn not_translated(&self, vip: &VipKey) -> Option<NotTranslated> {
        if self.installed.contains_key(vip) {
            return None;
        }
        let v = self.table.vips.get(vip)?;
        Some(if self.waiting.contains(vip) {
            NotTranslated::MapsFull
        } else if v.backends.iter().any(|b| b.state == BackendState::Active) {
            NotTranslated::AllEjected
        } else {
            NotTranslated::NoActiveBackend
        })
    }

    /// [`Planner::not_translated`] of every VIP of the table that has no service entry.
    pub(crate) fn not_translated_all(&self) -> std::collections::BTreeMap<VipKey, NotTranslated> {
        self.table
            .vips
            .keys()
            .filter_map(|k| Some((*k, self.not_translated(k)?)))
            .collect()
    }

    /// Every counter index in use, with its VIP and backend.
    pub(crate) fn counters(&self) -> impl Iterator<Item = (&VipKey, SocketAddr, u32)> {
        self.counters
            .iter()
            .filter(|(_, c)| **c != NO_COUNTER)
            .map(|((k, a), c)| (k, *a, *c))
    }

    /// Distinct backend addresses of TCP VIPs in the planned table (what health probes).
    pub(crate) fn tcp_backends(&self) -> HashSet<SocketAddr> {
        self.table
            .vips
            .values()
            .filter(|v| v.key.protocol == crate::model::Protocol::Tcp)
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect()
    }
}

#[cfg(test)]
mod tests;
