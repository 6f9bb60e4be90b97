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

use std::collections::{BTreeSet, HashMap};
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

/// What the maps hold for one VIP with a service entry. Its backends are not kept: they are
/// the table's eligible ones (see [`Planner::installed`]), 32 bytes a backend saved.
#[derive(Debug, Clone, Copy)]
struct Installed {
    set: u32,
    count: u32,
}

/// The backends health has ejected: shared by the prober's channel, the kernel path's loop and
/// the planner (one copy, however many backends failed).
pub type Ejected = Arc<BTreeSet<SocketAddr>>;

/// The counter id of each backend of each VIP of a table, in the VIP's backend order
/// ([`NO_COUNTER`]: none left). Shared, not copied, with the stats snapshot.
pub(crate) type CounterIds = HashMap<VipKey, Arc<[u32]>>;

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
    ejected: Ejected,
    installed: HashMap<VipKey, Installed>,
    /// Per VIP of `table`, its backends' counter ids (4 bytes a backend).
    counters: Arc<CounterIds>,
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
        counter_of(&self.table, &self.counters, vip, backend)
    }

    /// The backends `vip` is translated to now, in slot order (empty: not translated).
    pub(crate) fn installed(&self, vip: &VipKey) -> Vec<SocketAddr> {
        match self.installed.get(vip) {
            Some(_) => eligible_of(&self.table, vip, &self.ejected),
            None => Vec::new(),
        }
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
    pub(crate) fn plan(&mut self, table: &Arc<VipTable>, ejected: &Ejected) -> Vec<Op> {
        let prev = Arc::clone(&self.table);
        let d = diff(&prev, table);
        let mut touched: BTreeSet<VipKey> = BTreeSet::new();
        let mut freed_ids: Vec<u32> = Vec::new();
        let mut ops = Vec::new();
        let mut counters = Arc::clone(&self.counters);
        let ids = Arc::make_mut(&mut counters);

        for k in &d.removed {
            touched.insert(*k);
            freed_ids.extend(ids.remove(k).iter().flat_map(|c| c.iter().copied()));
            if let Some(v) = prev.vips.get(k) {
                let left = v.active_backends().map(|b| (*k, b.addr));
                self.moves.left_table.extend(left);
            }
        }
        for k in &d.added {
            touched.insert(*k);
            if let Some(v) = table.vips.get(k) {
                let new = v
                    .backends
                    .iter()
                    .map(|_| self.new_counter(&mut ops))
                    .collect();
                ids.insert(*k, new);
                let back = v.active_backends().map(|b| (*k, b.addr));
                self.moves.back.extend(back);
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
            if !(c.backends_added.is_empty() && c.backends_removed.is_empty())
                && let (Some(was), Some(now)) = (prev.vips.get(&c.key), table.vips.get(&c.key))
            {
                let old_ids = ids.get(&c.key).cloned().unwrap_or_default();
                let new: Arc<[u32]> = now
                    .backends
                    .iter()
                    .map(|b| match position(&was.backends, b.addr) {
                        Some(i) => old_ids.get(i).copied().unwrap_or(NO_COUNTER),
                        None => self.new_counter(&mut ops),
                    })
                    .collect();
                for (i, b) in was.backends.iter().enumerate() {
                    if position(&now.backends, b.addr).is_none() {
                        freed_ids.extend(old_ids.get(i).copied());
                    }
                }
                ids.insert(c.key, new);
            }
            for a in &c.backends_removed {
                self.moves.left_table.push((c.key, *a));
            }
            for a in &c.backends_added {
                self.moves.back.push((c.key, *a));
            }
            for (a, state) in &c.state_changed {
                match state {
                    BackendState::Active => self.moves.back.push((c.key, *a)),
                    BackendState::Draining => self.moves.left_table.push((c.key, *a)),
                }
            }
        }
        // An ejection change touches the TCP VIPs that hold the address (a scan of the
        // table: rarer than table changes, and no index of VIPs by backend to keep).
        let flipped: BTreeSet<SocketAddr> = self
            .ejected
            .symmetric_difference(ejected)
            .copied()
            .collect();
        if !flipped.is_empty() {
            let holds = |v: &crate::model::Vip| {
                v.key.protocol == crate::model::Protocol::Tcp
                    && v.backends.iter().any(|b| flipped.contains(&b.addr))
            };
            touched.extend(table.vips.values().filter(|v| holds(v)).map(|v| v.key));
        }

        touched.extend(std::mem::take(&mut self.waiting));
        let mut free_sets = Vec::new();
        for k in touched {
            let want = eligible_of(table, &k, ejected);
            // What the maps hold: the eligible backends of the table and ejections planned last.
            let old = self
                .installed
                .get(&k)
                .map(|i| (*i, eligible_of(&prev, &k, &self.ejected)));
            if old.as_ref().is_some_and(|(_, b)| *b == want) || (old.is_none() && want.is_empty()) {
                continue;
            }
            self.installed.remove(&k);
            if let Some((_, backends)) = &old {
                // `want` is in address order in a normalized table; `contains` covers one
                // that is not, and runs only for a backend that seems to have left.
                let kept = |a: &SocketAddr| want.binary_search(a).is_ok() || want.contains(a);
                let left = backends.iter().filter(|a| !kept(a));
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
                        counter: counter_of(table, &counters, &k, *addr).unwrap_or(NO_COUNTER),
                    });
                }
                ops.push(Op::PutService {
                    vip: k,
                    set,
                    count: want.len() as u32,
                });
                Some(Installed {
                    set,
                    count: want.len() as u32,
                })
            } else {
                ops.push(Op::DelService { vip: k }); // 2^32 sets in use: serve by proxy
                None
            };
            if let Some((o, _)) = old {
                self.slots -= o.count as usize;
                for slot in 0..o.count {
                    ops.push(Op::DelBackend { set: o.set, slot });
                }
                free_sets.push(o.set);
            }
            if let Some(n) = new_set {
                self.installed.insert(k, n);
            }
        }
        // Ids are reused only by later plans, after these operations have been applied.
        self.sets.free.extend(free_sets);
        let freed = freed_ids.into_iter().filter(|c| *c != NO_COUNTER);
        self.counter_ids.free.extend(freed);
        self.counters = counters;
        self.table = Arc::clone(table);
        self.ejected = Arc::clone(ejected);
        ops
    }

    /// A counter id for a backend new to a VIP, zeroed before use ([`NO_COUNTER`]: none left).
    fn new_counter(&mut self, ops: &mut Vec<Op>) -> u32 {
        let counter = self.counter_ids.take(MAX_COUNTERS).unwrap_or(NO_COUNTER);
        if counter != NO_COUNTER {
            ops.push(Op::ResetCounter { counter });
        }
        counter
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
    pub(crate) fn counters<'a>(&'a self) -> impl Iterator<Item = (&'a VipKey, SocketAddr, u32)> {
        let with_ids =
            |(k, v): (&'a VipKey, &'a Arc<crate::model::Vip>)| Some((k, v, self.counters.get(k)?));
        self.table
            .vips
            .iter()
            .filter_map(with_ids)
            .flat_map(|(k, v, ids)| {
                v.backends
                    .iter()
                    .zip(ids.iter().copied())
                    .filter(|(_, c)| *c != NO_COUNTER)
                    .map(move |(b, c)| (k, b.addr, c))
            })
    }

    /// One more than the highest counter id handed out (what the counters map holds).
    pub(crate) fn counter_ids_issued(&self) -> usize {
        self.counter_ids.next as usize
    }

    /// The table planned last and its backends' counter ids (shared, not copied).
    pub(crate) fn counter_ids(&self) -> (Arc<VipTable>, Arc<CounterIds>) {
        (Arc::clone(&self.table), Arc::clone(&self.counters))
    }

    /// Distinct backend addresses of TCP VIPs in the planned table (what health probes),
    /// sorted.
    pub(crate) fn tcp_backends(&self) -> Vec<SocketAddr> {
        let mut all: Vec<SocketAddr> = self
            .table
            .vips
            .values()
            .filter(|v| v.key.protocol == crate::model::Protocol::Tcp)
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect();
        all.sort_unstable();
        all.dedup();
        all.shrink_to_fit();
        all
    }
}

/// The backends of `vip` in `table` that are translated to with `ejected` out, in the table's
/// (address) order.
fn eligible_of(table: &VipTable, vip: &VipKey, ejected: &BTreeSet<SocketAddr>) -> Vec<SocketAddr> {
    table.vips.get(vip).map_or_else(Vec::new, |v| {
        v.backends
            .iter()
            .filter(|b| eligible(vip, b, ejected))
            .map(|b| b.addr)
            .collect()
    })
}

/// Where `addr` is among `backends` (sorted by address in every normalized table; a linear
/// search covers one that is not).
pub(crate) fn position(backends: &[crate::model::Backend], addr: SocketAddr) -> Option<usize> {
    backends
        .binary_search_by(|b| b.addr.cmp(&addr))
        .ok()
        .or_else(|| backends.iter().position(|b| b.addr == addr))
}

/// The counter id of `backend` of `vip`, by `ids` made for `table`.
pub(crate) fn counter_of(
    table: &VipTable,
    ids: &CounterIds,
    vip: &VipKey,
    backend: SocketAddr,
) -> Option<u32> {
    let i = position(&table.vips.get(vip)?.backends, backend)?;
    ids.get(vip)?.get(i).copied().filter(|c| *c != NO_COUNTER)
}

#[cfg(test)]
mod tests;
