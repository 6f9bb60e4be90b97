//! The pure half of address reconciliation: given what is on the link and what should be,
//! compute what to add and what to remove. No I/O; table-tested.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// The prefix length every VIP is installed with: /32 for IPv4, /128 for IPv6.
pub fn host_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Addresses the kernel manages on its own and that l4lb never touches: IPv6 link-local
/// (`fe80::/10`, generated when a link comes up). §3 never accepts them as VIPs.
pub fn is_kernel_managed(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => false,
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Wanted addresses not yet on the link (to add as /32 or /128).
    pub to_add: Vec<IpAddr>,
    /// Addresses on the link that must go: not wanted, or wanted but installed with another
    /// prefix length (a left-over `/24` would route a whole subnet into the VIP link).
    pub to_remove: Vec<IpNet>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.to_add.is_empty() && self.to_remove.is_empty()
    }
}

/// Compare the addresses on the link (`current`, with their prefix lengths) with `want`.
///
/// Kernel-managed addresses in `current` (see [`is_kernel_managed`]) are ignored. Both
/// output lists are sorted and free of duplicates.
pub fn plan(current: &BTreeSet<IpNet>, want: &BTreeSet<IpAddr>) -> Plan {
    let mut exact = BTreeSet::new();
    let mut to_remove = Vec::new();
    for net in current {
        let ip = net.addr();
        if is_kernel_managed(ip) {
            continue;
        }
        if want.contains(&ip) && net.prefix_len() == host_prefix(ip) {
            exact.insert(ip);
        } else {
            to_remove.push(*net);
        }
    }
    let to_add = want.difference(&exact).copied().collect();
    Plan { to_add, to_remove }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> BTreeSet<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ips(s: &[&str]) -> BTreeSet<IpAddr> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// (name, current, want, to_add, to_remove)
    type Case<'a> = (
        &'a str,
        &'a [&'a str],
        &'a [&'a str],
        &'a [&'a str],
        &'a [&'a str],
    );

    #[test]
    fn plan_table() {
        let cases: &[Case<'_>] = &[
            ("empty", &[], &[], &[], &[]),
            ("fresh link", &[], &["198.18.0.1"], &["198.18.0.1"], &[]),
            (
                "already there",
                &["198.18.0.1/32"],
                &["198.18.0.1"],
                &[],
                &[],
            ),
            (
                "left-over",
                &["198.18.0.1/32", "198.18.0.9/32"],
                &["198.18.0.1"],
                &[],
                &["198.18.0.9/32"],
            ),
            (
                "clear",
                &["198.18.0.1/32", "fd00::1/128"],
                &[],
                &[],
                &["198.18.0.1/32", "fd00::1/128"],
            ),
            (
                "wrong prefix is replaced",
                &["198.18.0.1/24"],
                &["198.18.0.1"],
                &["198.18.0.1"],
                &["198.18.0.1/24"],
            ),
            (
                "v6 wrong prefix",
                &["fd00::1/64"],
                &["fd00::1"],
                &["fd00::1"],
                &["fd00::1/64"],
            ),
            (
                "v6 ok",
                &["fd00::1/128"],
                &["fd00::1", "fd00::2"],
                &["fd00::2"],
                &[],
            ),
            (
                "link-local kept",
                &["fe80::1/64", "198.18.0.2/32"],
                &[],
                &[],
                &["198.18.0.2/32"],
            ),
            (
                "mixed",
                &["198.18.0.1/32", "198.18.0.2/32", "fd00::1/128"],
                &["198.18.0.2", "198.18.0.3", "fd00::2"],
                &["198.18.0.3", "fd00::2"],
                &["198.18.0.1/32", "fd00::1/128"],
            ),
        ];
        for (name, current, want, to_add, to_remove) in cases {
            let got = plan(&nets(current), &ips(want));
            let want_plan = Plan {
                to_add: ips(to_add).into_iter().collect(),
                to_remove: nets(to_remove).into_iter().collect(),
            };
            assert_eq!(got, want_plan, "case {name}");
        }
    }

    #[test]
    fn applying_the_plan_reaches_want() {
        let current = nets(&[
            "198.18.0.1/24",
            "198.18.0.5/32",
            "fe80::1/64",
            "fd00::7/128",
        ]);
        let want = ips(&["198.18.0.1", "fd00::7", "fd00::8"]);
        let p = plan(&current, &want);
        let mut after: BTreeSet<IpNet> = current
            .difference(&p.to_remove.iter().copied().collect())
            .copied()
            .collect();
        for ip in &p.to_add {
            after.insert(IpNet::new(*ip, host_prefix(*ip)).unwrap());
        }
        assert!(plan(&after, &want).is_empty());
        let managed: BTreeSet<IpAddr> = after
            .iter()
            .map(IpNet::addr)
            .filter(|ip| !is_kernel_managed(*ip))
            .collect();
        assert_eq!(managed, want);
    }
}
