//! Which controller an agent follows first: rendezvous (highest random weight) hashing of the
//! agent's identity against each controller, so that agents given the same `--controller` list
//! spread evenly over it, each agent always prefers the same controller, and a controller
//! that leaves moves only its own agents. Pure: no sockets, no clock.

/// A 64-bit finaliser (splitmix64's): FNV alone mixes its last bytes poorly, which would make
/// controllers whose URLs differ in one digit rank alike for every agent.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The weight of `controller` for `identity`: the same in every process and version.
fn weight(identity: &str, controller: &str) -> u64 {
    let a = mix(crate::model::stable_hash(identity.as_bytes()));
    let b = mix(crate::model::stable_hash(controller.as_bytes()));
    mix(a ^ b.rotate_left(17))
}

/// Indexes into `controllers`, most preferred first, for the agent named `identity`. Ties
/// (equal keys) keep the given order.
pub fn order<S: AsRef<str>>(identity: &str, controllers: &[S]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..controllers.len()).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(weight(identity, controllers[i].as_ref())));
    idx
}

/// Where in `[0, window_ms)` this agent's return to a recovered controller falls, so that the
/// agents a controller lost come back spread over the window, not in the same second.
pub fn spread_ms(identity: &str, window_ms: u64) -> u64 {
    if window_ms == 0 {
        return 0;
    }
    mix(crate::model::stable_hash(identity.as_bytes()) ^ 0x5bd1_e995) % window_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CTL: [&str; 3] = [
        "http://10.0.0.1:62080/",
        "http://10.0.0.2:62080/",
        "http://10.0.0.3:62080/",
    ];

    fn first_counts(agents: usize, ctl: &[&str]) -> Vec<usize> {
        let mut counts = vec![0; ctl.len()];
        for a in 0..agents {
            counts[order(&format!("agent-{a}.example.com"), ctl)[0]] += 1;
        }
        counts
    }

    #[test]
    fn agents_spread_evenly_over_controllers() {
        // (agents, controllers) -> each controller's share within 10 % of the mean.
        for (agents, n) in [(3_000usize, 3usize), (5_000, 5), (10_000, 2)] {
            let ctl: Vec<String> = (0..n).map(|i| format!("http://ctl-{i}:62080/")).collect();
            let ctl: Vec<&str> = ctl.iter().map(String::as_str).collect();
            let counts = first_counts(agents, &ctl);
            let mean = agents / n;
            for c in &counts {
                assert!(c.abs_diff(mean) * 10 <= mean, "{counts:?}");
            }
        }
        // Thirty agents over three: nobody holds more than 18.
        let counts = first_counts(30, &CTL);
        assert!(counts.iter().all(|&c| c <= 18), "{counts:?}");
    }

    #[test]
    fn a_controller_that_leaves_moves_only_its_own_agents() {
        let two = [CTL[0], CTL[2]];
        for a in 0..2_000 {
            let id = format!("host-{a}");
            let all = order(&id, &CTL);
            let without = order(&id, &two);
            // Its preference among the remaining two is the same as before.
            let kept: Vec<&str> = all
                .iter()
                .map(|&i| CTL[i])
                .filter(|c| *c != CTL[1])
                .collect();
            let now: Vec<&str> = without.iter().map(|&i| two[i]).collect();
            assert_eq!(kept, now, "{id}");
        }
    }

    #[test]
    fn returns_spread_over_the_window() {
        let mut per_second = [0usize; 10];
        for a in 0..1_000 {
            per_second[(spread_ms(&format!("host-{a}"), 10_000) / 1_000) as usize] += 1;
        }
        assert!(
            per_second.iter().all(|&n| (70..=130).contains(&n)),
            "{per_second:?}"
        );
        assert_eq!(spread_ms("x", 0), 0);
    }

    proptest! {
        #[test]
        fn the_order_is_a_stable_permutation(id in ".{0,40}", n in 0usize..8) {
            let ctl: Vec<String> = (0..n).map(|i| format!("http://c{i}/")).collect();
            let o = order(&id, &ctl);
            let mut sorted = o.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            prop_assert_eq!(order(&id, &ctl), o);
        }
    }
}
