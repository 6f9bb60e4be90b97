//! Named-VIP address allocation (pure). Each name starts at `base + fnv1a(name) mod size` and
//! probes linearly on collision. The hash is fixed (FNV-1a, 64 bit), so any controller given the
//! same names computes the same addresses, whatever the process, platform or Rust version.
//! Allocation is sticky: a name keeps its address for as long as it is in the table.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// An address family: of a VIP address, of a backend, of the range a named VIP's address
/// comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `ip`; an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is IPv4.
    pub fn of(ip: IpAddr) -> Family {
        match ip.to_canonical() {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The other family.
    pub fn other(self) -> Family {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("VIP CIDR {0} is exhausted")]
    Exhausted(String),
}

/// [`crate::model::stable_hash`] of a name.
pub fn stable_hash(s: &str) -> u64 {
    crate::model::stable_hash(s.as_bytes())
}

/// One address pool (a CIDR), usable offsets `first..first+size`.
#[derive(Debug, Clone)]
struct Pool {
    base: u128,
    first: u128,
    size: u128,
    v6: bool,
}

impl Pool {
    fn v4(net: Ipv4Net) -> Self {
        let base = u128::from(u32::from(net.network()));
        let total = 1u128 << (32 - u32::from(net.prefix_len()));
        // Skip the network and broadcast addresses where the net has them.
        Pool::skipping(base, total, 2, false)
    }

    fn v6(net: Ipv6Net) -> Self {
        let base = u128::from(net.network());
        let bits = 128 - u32::from(net.prefix_len());
        let total = if bits >= 128 {
            u128::MAX
        } else {
            1u128 << bits
        };
        // Skip the subnet-router anycast address (offset 0).
        Pool::skipping(base, total, 1, true)
    }

    /// `total` addresses from `base`, less `reserved` of them (offset 0, and for IPv4 the
    /// last) where the net is larger than that.
    fn skipping(base: u128, total: u128, reserved: u128, v6: bool) -> Self {
        let (first, size) = if total > reserved {
            (1, total - reserved)
        } else {
            (0, total)
        };
        Pool {
            base,
            first,
            size,
            v6,
        }
    }

    fn addr(&self, offset: u128) -> IpAddr {
        let n = self.base + self.first + offset;
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(n))
        } else {
            IpAddr::V4(Ipv4Addr::from(n as u32))
        }
    }
}

/// Sticky allocator of named VIPs' addresses, for both families.
#[derive(Debug, Clone)]
pub struct VipAllocator {
    v4: Pool,
    v6: Pool,
    /// The two ranges, as configured (for [`VipAllocator::in_range`]).
    nets: (Ipv4Net, Ipv6Net),
    assigned: HashMap<(String, Family), IpAddr>,
    /// The values of `assigned`, for O(1) probing.
    used: HashSet<IpAddr>,
}

/// Result of one allocation round.
#[derive(Debug, Default)]
pub struct Assignment {
    pub addrs: HashMap<(String, Family), IpAddr>,
    pub failed: Vec<(String, Family, AllocError)>,
}

impl VipAllocator {
    pub fn new(v4: Ipv4Net, v6: Ipv6Net) -> Self {
        VipAllocator {
            v4: Pool::v4(v4.trunc()),
            v6: Pool::v6(v6.trunc()),
            nets: (v4.trunc(), v6.trunc()),
            assigned: HashMap::new(),
            used: HashSet::new(),
        }
    }

    /// Whether `ip` lies in one of the ranges named VIPs are given addresses from.
    pub fn in_range(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.nets.0.contains(&v4),
            IpAddr::V6(v6) => self.nets.1.contains(&v6),
        }
    }

    /// The address of one name, allocating it if new (incremental form of [`assign`]).
    ///
    /// [`assign`]: VipAllocator::assign
    pub fn assign_one(
        &mut self,
        name: &str,
        family: Family,
        reserved: &HashSet<IpAddr>,
    ) -> Result<IpAddr, AllocError> {
        let key = (name.to_string(), family);
        if let Some(ip) = self.assigned.get(&key) {
            return Ok(*ip);
        }
        let pool = match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        };
        let ip = place(pool, name, &self.used, reserved)
            .ok_or_else(|| AllocError::Exhausted(format!("{family:?}")))?;
        self.used.insert(ip);
        self.assigned.insert(key, ip);
        Ok(ip)
    }

    /// Free a name's address (no-op if it has none).
    pub fn release(&mut self, name: &str, family: Family) {
        if let Some(ip) = self.assigned.remove(&(name.to_string(), family)) {
            self.used.remove(&ip);
        }
    }

    /// Assign addresses for exactly `wants`. Names already assigned keep their address; names
    /// no longer wanted free theirs; new names are placed in sorted order, skipping `reserved`
    /// (addresses used by IP VIPs). A name that does not fit fails alone. A name keeps its
    /// address in one family while it wants an address in either, even when it wants none
    /// in that family for a while: backends of a family that leave and come back find the
    /// same A or AAAA.
    pub fn assign(
        &mut self,
        wants: &BTreeSet<(String, Family)>,
        reserved: &HashSet<IpAddr>,
    ) -> Assignment {
        self.assigned
            .retain(|k, _| wants.contains(k) || wants.contains(&(k.0.clone(), k.1.other())));
        self.used = self.assigned.values().copied().collect();
        let used = &mut self.used;
        let mut out = Assignment::default();
        for want in wants {
            if let Some(ip) = self.assigned.get(want) {
                out.addrs.insert(want.clone(), *ip);
                continue;
            }
            let pool = match want.1 {
                Family::V4 => &self.v4,
                Family::V6 => &self.v6,
            };
            match place(pool, &want.0, used, reserved) {
                Some(ip) => {
                    used.insert(ip);
                    self.assigned.insert(want.clone(), ip);
                    out.addrs.insert(want.clone(), ip);
                }
                None => out.failed.push((
                    want.0.clone(),
                    want.1,
                    AllocError::Exhausted(format!("{:?}", want.1)),
                )),
            }
        }
        out
    }
}

fn place(
    pool: &Pool,
    name: &str,
    used: &HashSet<IpAddr>,
    reserved: &HashSet<IpAddr>,
) -> Option<IpAddr> {
    if pool.size == 0 {
        return None;
    }
    let start = u128::from(stable_hash(name)) % pool.size;
    // Linear probing finds a free slot within (taken + 1) steps, so this is bounded by the
    // number of addresses in use, not by the pool size.
    let limit = (used.len() + reserved.len()) as u128 + 1;
    for step in 0..limit.min(pool.size) {
        let ip = pool.addr((start + step) % pool.size);
        if !used.contains(&ip) && !reserved.contains(&ip) {
            return Some(ip);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alloc(v4: &str) -> VipAllocator {
        VipAllocator::new(v4.parse().unwrap(), "fd01:c::/64".parse().unwrap())
    }

    fn wants(names: &[&str]) -> BTreeSet<(String, Family)> {
        names.iter().map(|n| (n.to_string(), Family::V4)).collect()
    }

    #[test]
    fn collisions_probe_the_next_address_and_wrap_around() {
        // 198.18.0.0/29 lends .1–.6: six slots. Three names whose hash lands on the last slot
        // get .6, then (wrapping) .1, then .2, in the order they arrive.
        let names: Vec<String> = (0..)
            .map(|i| format!("svc{i}.marathon"))
            .filter(|n| stable_hash(n) % 6 == 5)
            .take(3)
            .collect();
        let mut a = alloc("198.18.0.0/29");
        let none = HashSet::new();
        let got: Vec<String> = names
            .iter()
            .map(|n| a.assign_one(n, Family::V4, &none).unwrap().to_string())
            .collect();
        assert_eq!(got, ["198.18.0.6", "198.18.0.1", "198.18.0.2"]);
        // An IP VIP's address is skipped the same way.
        let mut a = alloc("198.18.0.0/29");
        let reserved = HashSet::from(["198.18.0.6".parse().unwrap()]);
        let ip = a.assign_one(&names[0], Family::V4, &reserved).unwrap();
        assert_eq!(ip.to_string(), "198.18.0.1");
    }

    #[test]
    fn fixed_hash_values() {
        // Pinned so a change of hash (and so of every VIP address) cannot slip in unnoticed.
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        let mut a = alloc("11.0.0.0/8");
        let got = a.assign(&wants(&["web.marathon"]), &HashSet::new());
        let ip = got.addrs[&("web.marathon".to_string(), Family::V4)];
        assert_eq!(
            ip,
            a.v4.addr(u128::from(stable_hash("web.marathon")) % a.v4.size)
        );
    }

    #[test]
    fn exhaustion_fails_only_the_overflow() {
        // A /30 has two usable addresses.
        let mut a = alloc("198.18.0.0/30");
        let got = a.assign(&wants(&["a", "b", "c"]), &HashSet::new());
        assert_eq!(got.addrs.len(), 2);
        assert_eq!(got.failed.len(), 1);
        for ip in got.addrs.values() {
            assert!(
                *ip == "198.18.0.1".parse::<IpAddr>().unwrap()
                    || *ip == "198.18.0.2".parse::<IpAddr>().unwrap()
            );
        }
    }

    #[test]
    fn reserved_addresses_are_skipped() {
        let mut a = alloc("198.18.0.0/30");
        let reserved: HashSet<IpAddr> = ["198.18.0.1".parse().unwrap()].into();
        let got = a.assign(&wants(&["a"]), &reserved);
        assert_eq!(
            got.addrs[&("a".to_string(), Family::V4)],
            "198.18.0.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn v6_addresses_in_pool() {
        let mut a = alloc("11.0.0.0/8");
        let w: BTreeSet<_> = [("web".to_string(), Family::V6)].into();
        let got = a.assign(&w, &HashSet::new());
        let ip = got.addrs[&("web".to_string(), Family::V6)];
        let net: Ipv6Net = "fd01:c::/64".parse().unwrap();
        match ip {
            IpAddr::V6(v6) => assert!(net.contains(&v6)),
            IpAddr::V4(_) => panic!("v4 for v6 want"),
        }
    }

    proptest! {
        #[test]
        fn order_independent_unique_and_inside(names in prop::collection::btree_set("[a-z]{1,8}", 0..60), prefix in 24u8..30) {
            let net: Ipv4Net = format!("198.18.0.0/{prefix}").parse().unwrap();
            let w: BTreeSet<_> = names.iter().map(|n| (n.clone(), Family::V4)).collect();
            let mut a = VipAllocator::new(net, "fd01:c::/64".parse().unwrap());
            let first = a.assign(&w, &HashSet::new());
            // A fresh allocator agrees: a set is always placed in sorted order, so the insertion
            // order of the input cannot matter (this pins that design, it cannot catch a hash bug).
            let mut rev: Vec<_> = w.iter().cloned().collect();
            rev.reverse();
            let w2: BTreeSet<_> = rev.into_iter().collect();
            let second = VipAllocator::new(net, "fd01:c::/64".parse().unwrap()).assign(&w2, &HashSet::new());
            prop_assert_eq!(&first.addrs, &second.addrs);
            let uniq: HashSet<_> = first.addrs.values().collect();
            prop_assert_eq!(uniq.len(), first.addrs.len());
            for ip in first.addrs.values() {
                match ip { IpAddr::V4(v4) => prop_assert!(net.contains(v4)), IpAddr::V6(_) => prop_assert!(false) }
            }
            let usable = (1usize << (32 - prefix)) - 2;
            prop_assert_eq!(first.addrs.len(), names.len().min(usable));
        }

        #[test]
        fn adding_or_removing_others_never_moves_a_name(
            keep in prop::collection::btree_set("[a-z]{1,6}", 1..20),
            others in prop::collection::btree_set("[A-Z]{1,6}", 0..20),
        ) {
            let net: Ipv4Net = "198.18.0.0/26".parse().unwrap();
            let mut a = VipAllocator::new(net, "fd01:c::/64".parse().unwrap());
            let w: BTreeSet<_> = keep.iter().map(|n| (n.clone(), Family::V4)).collect();
            let before = a.assign(&w, &HashSet::new());
            let mut more = w.clone();
            more.extend(others.iter().map(|n| (n.clone(), Family::V4)));
            let during = a.assign(&more, &HashSet::new());
            let after = a.assign(&w, &HashSet::new());
            for k in &w {
                if let Some(ip) = before.addrs.get(k) {
                    prop_assert_eq!(during.addrs.get(k), Some(ip));
                    prop_assert_eq!(after.addrs.get(k), Some(ip));
                }
            }
        }
    }
}
