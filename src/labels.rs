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
    #[error("legacy label key {0:?} is not VIP_PORT<n>")]
    LegacyKey(String),
    #[error("legacy label value {0:?} does not start with tcp:// or udp://")]
    LegacyScheme(String),
    #[error("VIP {0} would have {1} backends, over --max-backends-per-vip {2}")]
    TooManyBackends(String, usize, usize),
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
            LabelError::LegacyKey(_) => "legacy_key",
            LabelError::LegacyScheme(_) => "legacy_scheme",
            LabelError::TooManyBackends(..) => "too_many_backends",
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

/// Mesos-DNS mangling of a VIP or framework name into DNS labels joined by `.`: each
/// `.`-separated part through Mesos-DNS's `labels.RFC1123` (`records/labels` in
/// mesosphere/mesos-dns), empty parts dropped (`labels.DomainFrag`).
pub fn mangle(name: &str) -> String {
    let parts: Vec<String> = name
        .split('.')
        .map(rfc1123)
        .filter(|p| !p.is_empty())
        .collect();
    parts.join(".")
}

/// Longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;

/// The characters of [`rfc1123`], neither trimmed nor cut: lower-case ASCII letters and
/// digits kept, `-` `_` `.` as `-`, everything else dropped.
pub(crate) fn rfc1123_chars(name: &str) -> String {
    name.chars()
        .filter_map(|c| match c {
            'A'..='Z' => Some(c.to_ascii_lowercase()),
            'a'..='z' | '0'..='9' => Some(c),
            '-' | '_' | '.' => Some('-'),
            _ => None,
        })
        .collect()
}

/// Mesos-DNS's `RFC1123(name)`: lower-case ASCII letters and digits kept, `-` `_` (and `.`)
/// become `-`, everything else dropped; leading dashes trimmed; cut at 63. A dash run at the
/// cut is dropped and the label keeps filling from what follows the run, up to 63 characters
/// (Mesos-DNS's `trimCut`), so `a{61}--bcd` is `a{61}bc`, not `a{61}`.
///
/// One deviation, where Mesos-DNS's output is not a usable host name: a fill that ends in a
/// dash (`a{61}--b-c` would give `a{61}b-`) loses its trailing dashes. (Mesos-DNS slices past
/// the end of a short tail there, which its Go runtime may refuse; we take what there is.)
pub fn rfc1123(part: &str) -> String {
    let mapped = rfc1123_chars(part);
    let trimmed = mapped.trim_start_matches('-');
    let size = trimmed.len().min(MAX_LABEL);
    // ASCII only from here: byte indices are character indices.
    let head = trimmed[..size].trim_end_matches('-');
    if head.len() == size {
        return head.to_string();
    }
    let tail = trimmed[size..].trim_start_matches('-');
    let fill = &tail[..tail.len().min(size - head.len())];
    let mut out = format!("{head}{fill}");
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// A legacy app- or task-level label `VIP_PORT<n>: "tcp://<name-or-ip>:<port>"` (or `udp://`),
/// as minuteman and dcos-net honour it: a VIP on `<port>` whose backends are each task's
/// `n`-th port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyVip {
    /// `n`: which of the task's ports serves it.
    pub port_index: usize,
    pub protocol: crate::model::Protocol,
    pub target: VipLabel,
}

/// Is this a legacy key (`VIP_PORT…`, any case of the `VIP_PORT` prefix as minuteman reads it)?
pub fn is_legacy_key(key: &str) -> bool {
    key.len() >= 8 && key.is_char_boundary(8) && key[..8].eq_ignore_ascii_case("VIP_PORT")
}

/// Parse a legacy label. The caller checked [`is_legacy_key`].
pub fn parse_legacy(key: &str, value: &str) -> Result<LegacyVip, LabelError> {
    let index = key.get(8..).unwrap_or_default();
    let port_index = match index.parse::<usize>() {
        Ok(n) if !index.starts_with('+') => n,
        _ => return Err(LabelError::LegacyKey(key.to_string())),
    };
    let value = value.trim();
    let (scheme, rest) = value
        .split_once("://")
        .ok_or_else(|| LabelError::LegacyScheme(value.to_string()))?;
    let protocol = match scheme.to_ascii_lowercase().as_str() {
        "tcp" => crate::model::Protocol::Tcp,
        "udp" => crate::model::Protocol::Udp,
        _ => return Err(LabelError::LegacyScheme(value.to_string())),
    };
    Ok(LegacyVip {
        port_index,
        protocol,
        target: parse_value(rest)?,
    })
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
    fn mangling_equals_mesos_dns() {
        let a = |n: usize| "a".repeat(n);
        // (input, Mesos-DNS `DomainFrag(input, ".", RFC1123)`), worked through its `trimCut`.
        let cases: Vec<(String, String)> = vec![
            ("web".into(), "web".into()),
            ("My_App".into(), "my-app".into()),
            ("--lead".into(), "lead".into()),
            ("0day".into(), "0day".into()),
            ("trail--".into(), "trail".into()),
            ("Ünïcode-App".into(), "ncode-app".into()),
            ("a.b..c".into(), "a.b.c".into()),
            ("hello world!".into(), "helloworld".into()),
            (a(70), a(63)),
            (a(63), a(63)),
            // A dash at the cut: dropped, and the label fills up again from what follows.
            (format!("{}-b", a(62)), format!("{}b", a(62))),
            (format!("{}--bcd", a(61)), format!("{}bc", a(61))),
            (format!("{}_-_xyz", a(60)), format!("{}xyz", a(60))),
            // Only dashes after the cut: the head alone.
            (format!("{}---", a(62)), a(62)),
            // A short tail: what there is.
            (format!("{}--b", a(61)), format!("{}b", a(61))),
            // The fill itself ends in a dash: dropped (a host name may not end in one).
            (format!("{}--b-c", a(61)), format!("{}b", a(61))),
            // Dashes inside the label stay.
            (
                format!("{}-{}", a(30), a(40)),
                format!("{}-{}", a(30), a(32)),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(mangle(&input), want, "input {input:?}");
        }
    }

    #[test]
    fn legacy_labels() {
        use crate::model::Protocol::{Tcp, Udp};
        let ok = |i, p, t: VipLabel| {
            Ok(LegacyVip {
                port_index: i,
                protocol: p,
                target: t,
            })
        };
        let cases: Vec<(&str, &str, Result<LegacyVip, LabelError>)> = vec![
            (
                "VIP_PORT0",
                "tcp://198.18.5.5:80",
                ok(
                    0,
                    Tcp,
                    VipLabel::Ip {
                        ip: "198.18.5.5".parse().unwrap(),
                        port: 80,
                    },
                ),
            ),
            (
                "VIP_PORT2",
                "udp://dns.corp:53",
                ok(
                    2,
                    Udp,
                    VipLabel::Named {
                        label: "dns.corp".into(),
                        port: 53,
                    },
                ),
            ),
            (
                "vip_port1",
                "TCP:///web:8080",
                ok(
                    1,
                    Tcp,
                    VipLabel::Named {
                        label: "web".into(),
                        port: 8080,
                    },
                ),
            ),
            (
                "VIP_PORT",
                "tcp://web:80",
                Err(LabelError::LegacyKey("VIP_PORT".into())),
            ),
            (
                "VIP_PORTx",
                "tcp://web:80",
                Err(LabelError::LegacyKey("VIP_PORTx".into())),
            ),
            (
                "VIP_PORT+1",
                "tcp://web:80",
                Err(LabelError::LegacyKey("VIP_PORT+1".into())),
            ),
            (
                "VIP_PORT0",
                "web:80",
                Err(LabelError::LegacyScheme("web:80".into())),
            ),
            (
                "VIP_PORT0",
                "sctp://web:80",
                Err(LabelError::LegacyScheme("sctp://web:80".into())),
            ),
            (
                "VIP_PORT0",
                "tcp://web",
                Err(LabelError::MissingPort("web".into())),
            ),
        ];
        for (key, value, want) in cases {
            assert!(is_legacy_key(key), "{key}");
            assert_eq!(parse_legacy(key, value), want, "{key}={value}");
        }
        for key in ["VIP_0", "VIP_POR", "PORT0", "VIP_PÖRT0", ""] {
            assert!(!is_legacy_key(key), "{key}");
        }
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
        fn never_panics(s in ".*", k in ".*") {
            let _ = parse_value(&s);
            if is_legacy_key(&k) {
                let _ = parse_legacy(&k, &s);
            }
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
