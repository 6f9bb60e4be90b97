//! The VIP label grammar (DC/OS compatible) and Mesos-DNS name mangling. Pure: strings in,
//! a parsed VIP or a reason out. No I/O, no dependency on where labels come from.

use std::net::IpAddr;

use ipnet::IpNet;

/// A successfully parsed VIP label value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipLabel {
    /// `<ip>:<port>`
    Ip { ip: IpAddr, port: u16 },
    /// `<name>:<port>`; `label` is already mangled (DNS labels joined by `.`).
    Named { label: String, port: u16 },
}

/// Why a label was rejected. `reason()` is the metric label value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("no ':' separating host and port in {0:?}")]
    MissingPort(String),
    #[error("port {0:?} is not an integer in 1..65535")]
    BadPort(String),
    #[error("name {0:?} is empty after DNS mangling")]
    EmptyName(String),
    #[error("IP VIP {0} is unspecified")]
    Unspecified(IpAddr),
    #[error("IP VIP {0} is a loopback address (allow with --allow-loopback-vips)")]
    Loopback(IpAddr),
    #[error("IP VIP {0} is link-local")]
    LinkLocal(IpAddr),
    #[error("IP VIP {0} is multicast")]
    Multicast(IpAddr),
    #[error("IP VIP {0} is the broadcast address")]
    Broadcast(IpAddr),
    #[error("IP VIP {0} is outside --allowed-vip-cidr")]
    OutsideAllowed(IpAddr),
    #[error("IP VIP {0} is an address the cluster already uses (a task host or backend)")]
    ClusterAddress(IpAddr),
    #[error("IP VIP {0} is an address of this host")]
    HostAddress(IpAddr),
    #[error(
        "IP VIP {0} is inside the range named VIPs get addresses from (--vip-cidr, --vip-cidr6)"
    )]
    NamedVipRange(IpAddr),
    #[error("label value {0} is not a string")]
    NotAString(String),
    #[error("port protocol {0:?} is not tcp, udp or udp,tcp")]
    BadProtocol(String),
    #[error("no address left for named VIP {0:?} in {1}")]
    Exhausted(String, &'static str),
    #[error("port index {0} has no host port on the task")]
    NoTaskPort(usize),
}

/// The label set of `l4lb_label_errors_total`, `[("reason", …)]`: one counter family that
/// the control plane and the agent both count into.
pub type ReasonLabel = [(&'static str, String); 1];

impl LabelError {
    /// This error's label set in `l4lb_label_errors_total`.
    pub fn metric_label(&self) -> ReasonLabel {
        [("reason", self.reason().to_string())]
    }

    /// Short, stable reason string for `l4lb_label_errors_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            LabelError::MissingPort(_) => "missing_port",
            LabelError::BadPort(_) => "bad_port",
            LabelError::EmptyName(_) => "empty_name",
            LabelError::Unspecified(_) => "unspecified",
            LabelError::Loopback(_) => "loopback",
            LabelError::LinkLocal(_) => "link_local",
            LabelError::Multicast(_) => "multicast",
            LabelError::Broadcast(_) => "broadcast",
            LabelError::OutsideAllowed(_) => "outside_allowed_cidr",
            LabelError::ClusterAddress(_) => "cluster_address",
            LabelError::HostAddress(_) => "host_address",
            LabelError::NamedVipRange(_) => "named_vip_range",
            LabelError::NotAString(_) => "not_a_string",
            LabelError::BadProtocol(_) => "bad_protocol",
            LabelError::Exhausted(..) => "exhausted",
            LabelError::NoTaskPort(_) => "no_task_port",
        }
    }
}

/// Does this label key declare a VIP? (`VIP_0`, `vip_1`, `VIP_anything`.)
pub fn is_vip_key(key: &str) -> bool {
    key.starts_with("VIP") || key.starts_with("vip")
}

/// Parse a label value `<host>:<port>`, split at the last colon.
pub fn parse_value(value: &str) -> Result<VipLabel, LabelError> {
    let value = value.trim();
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| LabelError::MissingPort(value.to_string()))?;
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(LabelError::BadPort(port.to_string())),
    };
    // `[fd01::1]:80` is accepted as well as the bare `fd01::1:80` DC/OS writes.
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        // `::ffff:198.18.5.5` is that IPv4 address: one VIP, checked and keyed as IPv4.
        let ip = ip.to_canonical();
        return Ok(VipLabel::Ip { ip, port });
    }
    let label = mangle(host);
    if label.is_empty() {
        return Err(LabelError::EmptyName(host.to_string()));
    }
    Ok(VipLabel::Named { label, port })
}

/// Mesos-DNS mangling of a VIP name into one or more DNS labels joined by `.`.
pub fn mangle(name: &str) -> String {
    let parts: Vec<String> = name
        .split('.')
        .map(mangle_part)
        .filter(|p| !p.is_empty())
        .collect();
    parts.join(".")
}

fn mangle_part(part: &str) -> String {
    let lower = part.to_ascii_lowercase();
    let start = lower
        .find(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        .unwrap_or(lower.len());
    let mut out = String::with_capacity(lower.len() - start);
    for c in lower[start..].chars() {
        match c {
            'a'..='z' | '0'..='9' | '-' => out.push(c),
            '_' => out.push('-'),
            _ => {}
        }
    }
    out.truncate(63);
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// The IP-VIP rules a controller can check without knowing the hosts.
#[derive(Debug, Clone, Default)]
pub struct IpPolicy {
    pub allow_loopback: bool,
    /// Empty: any address (subject to the other rules).
    pub allowed: Vec<IpNet>,
}

impl IpPolicy {
    pub fn check(&self, ip: IpAddr) -> Result<(), LabelError> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if ip.is_unspecified() {
            return Err(LabelError::Unspecified(ip));
        }
        if ip.is_loopback() && !self.allow_loopback {
            return Err(LabelError::Loopback(ip));
        }
        if ip.is_multicast() {
            return Err(LabelError::Multicast(ip));
        }
        match ip {
            IpAddr::V4(v4) if v4.is_link_local() => return Err(LabelError::LinkLocal(ip)),
            IpAddr::V4(v4) if v4.is_broadcast() => return Err(LabelError::Broadcast(ip)),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => return Err(LabelError::LinkLocal(ip)),
            _ => {}
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|n| n.contains(&ip)) {
            return Err(LabelError::OutsideAllowed(ip));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn named(label: &str, port: u16) -> Result<VipLabel, LabelError> {
        Ok(VipLabel::Named {
            label: label.into(),
            port,
        })
    }

    #[test]
    fn grammar_cases() {
        let cases: Vec<(&str, Result<VipLabel, LabelError>)> = vec![
            ("/web:80", named("web", 80)),
            ("web:80", named("web", 80)),
            ("/api.hello-world:80", named("api.hello-world", 80)),
            ("/group/app:8080", named("groupapp", 8080)),
            ("My_App:5000", named("my-app", 5000)),
            ("--Weird..name-_:1", named("weird.name", 1)),
            ("a.b.c:53", named("a.b.c", 53)),
            (
                "198.18.5.5:80",
                Ok(VipLabel::Ip {
                    ip: "198.18.5.5".parse().unwrap(),
                    port: 80,
                }),
            ),
            (
                "fd01::1:80",
                Ok(VipLabel::Ip {
                    ip: "fd01::1".parse().unwrap(),
                    port: 80,
                }),
            ),
            (
                "[fd01::2]:443",
                Ok(VipLabel::Ip {
                    ip: "fd01::2".parse().unwrap(),
                    port: 443,
                }),
            ),
            // IPv4-mapped IPv6 is the IPv4 address.
            (
                "[::ffff:198.18.5.5]:53",
                Ok(VipLabel::Ip {
                    ip: "198.18.5.5".parse().unwrap(),
                    port: 53,
                }),
            ),
            (
                "missing-port",
                Err(LabelError::MissingPort("missing-port".into())),
            ),
            ("web:0", Err(LabelError::BadPort("0".into()))),
            ("web:70000", Err(LabelError::BadPort("70000".into()))),
            ("web:", Err(LabelError::BadPort("".into()))),
            ("web:8o", Err(LabelError::BadPort("8o".into()))),
            ("/:80", Err(LabelError::EmptyName("/".into()))),
            ("___:80", Err(LabelError::EmptyName("___".into()))),
            ("...:80", Err(LabelError::EmptyName("...".into()))),
        ];
        for (input, want) in cases {
            assert_eq!(parse_value(input), want, "input {input:?}");
        }
    }

    #[test]
    fn mangling_truncates_and_strips() {
        let long = "a".repeat(70);
        assert_eq!(mangle(&long).len(), 63);
        // Truncation that leaves a trailing '-' strips it.
        let s = format!("{}-b", "a".repeat(62));
        assert_eq!(mangle(&s), "a".repeat(62));
        assert_eq!(mangle("Ünïcode-App"), "ncode-app");
    }

    #[test]
    fn vip_keys() {
        for (k, want) in [
            ("VIP_0", true),
            ("vip_1", true),
            ("VIPx", true),
            ("HAPROXY_0_VHOST", false),
            ("Vip_0", false),
            ("", false),
        ] {
            assert_eq!(is_vip_key(k), want, "{k}");
        }
    }

    #[test]
    fn ip_policy_cases() {
        let p = IpPolicy::default();
        let cases = [
            ("198.18.5.5", Ok(())),
            ("0.0.0.0", Err("unspecified")),
            ("::", Err("unspecified")),
            ("127.0.0.1", Err("loopback")),
            ("::1", Err("loopback")),
            ("169.254.1.1", Err("link_local")),
            ("fe80::1", Err("link_local")),
            ("224.0.0.1", Err("multicast")),
            ("ff02::1", Err("multicast")),
            ("255.255.255.255", Err("broadcast")),
            ("::ffff:127.0.0.1", Err("loopback")),
        ];
        for (ip, want) in cases {
            let got = p.check(ip.parse().unwrap()).map_err(|e| e.reason());
            assert_eq!(got, want, "{ip}");
        }
        let p = IpPolicy {
            allow_loopback: true,
            allowed: vec!["198.18.0.0/15".parse().unwrap()],
        };
        assert_eq!(
            p.check("127.0.0.1".parse().unwrap())
                .map_err(|e| e.reason()),
            Err("outside_allowed_cidr")
        );
        assert!(p.check("198.19.255.1".parse().unwrap()).is_ok());
        let p = IpPolicy {
            allow_loopback: true,
            allowed: vec![],
        };
        assert!(p.check("127.0.0.5".parse().unwrap()).is_ok());
    }

    fn valid_dns_name(s: &str) -> bool {
        !s.is_empty()
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.ends_with('-')
                    && !l.starts_with('-')
            })
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = parse_value(&s);
        }

        #[test]
        fn mangled_names_are_valid_dns(s in "[\\PC]{0,100}") {
            let m = mangle(&s);
            prop_assert!(m.is_empty() || valid_dns_name(&m), "{:?} -> {:?}", s, m);
        }

        #[test]
        fn named_labels_parse_to_valid_names(name in "[a-zA-Z0-9_./-]{1,80}", port in 1u16..) {
            if let Ok(VipLabel::Named { label, port: p }) = parse_value(&format!("{name}:{port}")) {
                prop_assert!(valid_dns_name(&label));
                prop_assert_eq!(p, port);
            }
        }
    }
}
