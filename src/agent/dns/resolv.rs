//! The host's resolver configuration (resolv.conf(5)): the upstreams l4lb forwards to when
//! `--dns-upstream` is not given (the nameservers the host listed, never l4lb's own listen
//! addresses), and a resolv.conf that l4lb may manage so the host's programs use it
//! unchanged, put back as it was on exit ([`ManagedResolvConf`]).
//!
//! Parsing is pure ([`parse`], [`upstreams`]); only [`read_host`] and [`ManagedResolvConf`]
//! touch files. Depends on nothing else in l4lb.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::{Path, PathBuf};

/// The first line of a resolv.conf that l4lb wrote: such a file names l4lb, not the
/// upstreams, so the original (in [`backup_path`]) is read instead.
pub const MARKER: &str = "# Written by l4lb (--dns-manage-resolv-conf).";

/// Why the host's resolver configuration could not be read or managed.
#[derive(Debug, thiserror::Error)]
pub enum ResolvError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("writing {0}: {1}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("no --dns-listen address on port 53: nothing to point the host's resolv.conf at")]
    NoPort53,
}

/// What l4lb uses of a resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` addresses, in order (port 53; a numeric IPv6 scope kept).
    pub nameservers: Vec<SocketAddr>,
    /// The `search` (or `domain`) line's domains: the last such line wins, as in glibc.
    pub search: Vec<String>,
    /// The words of every `options` line, in order.
    pub options: Vec<String>,
    /// `nameserver` values that are not addresses (skipped, logged by the caller).
    pub skipped: Vec<String>,
}

/// Parse resolv.conf text as glibc does: a line starting with `#` or `;` is a comment; the
/// keyword is the first word; a `nameserver` value ends at the first blank (so a trailing
/// comment is ignored); unknown keywords are ignored. Never fails.
pub fn parse(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        if line.starts_with(['#', ';']) {
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword {
            "nameserver" => {
                let Some(value) = words.next() else { continue };
                match nameserver(value) {
                    Some(addr) => conf.nameservers.push(addr),
                    None => conf.skipped.push(value.to_string()),
                }
            }
            "search" | "domain" => {
                conf.search = words
                    .take_while(|w| !w.starts_with(['#', ';']))
                    .map(str::to_string)
                    .collect();
            }
            "options" => conf.options.extend(
                words
                    .take_while(|w| !w.starts_with(['#', ';']))
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    conf
}

/// One `nameserver` value: an IPv4 or IPv6 address, the latter with an optional numeric scope
/// (`fe80::1%2`). A named scope (`%eth0`) is not resolved here: `None`.
fn nameserver(value: &str) -> Option<SocketAddr> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip.to_canonical(), 53));
    }
    let (ip, scope) = value.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope: u32 = scope.parse().ok()?;
    Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope)))
}

/// The upstreams of `conf`: its nameservers, minus every one that is l4lb itself (`own`: the
/// addresses it listens on). A wildcard listen address on port 53 is every address of its
/// family; of those only loopback ones are known here to be this host's, so they are dropped
/// (`--dns-upstream` names others). Duplicates dropped, order kept.
pub fn upstreams(conf: &ResolvConf, own: &[SocketAddr]) -> Vec<SocketAddr> {
    let is_own = |ns: &SocketAddr| {
        own.iter().any(|l| {
            l.port() == ns.port()
                && (l.ip().to_canonical() == ns.ip()
                    || (l.ip().is_unspecified()
                        && l.is_ipv4() == ns.is_ipv4()
                        && ns.ip().is_loopback()))
        })
    };
    let mut out: Vec<SocketAddr> = Vec::new();
    for ns in &conf.nameservers {
        if !is_own(ns) && !out.contains(ns) {
            out.push(*ns);
        }
    }
    out
}

/// Where a managed resolv.conf keeps the original: `<path>.l4lb-orig`.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".l4lb-orig");
    PathBuf::from(p)
}

/// Read the host's resolver configuration from `path`. If l4lb wrote that file (it starts
/// with [`MARKER`]: l4lb manages it, or a previous run ended without restoring it) and the
/// original is in [`backup_path`], the original is read instead.
pub fn read_host(path: &Path) -> Result<ResolvConf, ResolvError> {
    let text = std::fs::read_to_string(path).map_err(|e| ResolvError::Read(path.into(), e))?;
    if text.starts_with(MARKER) {
        let backup = backup_path(path);
        match std::fs::read_to_string(&backup) {
            Ok(orig) => return Ok(parse(&orig)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ResolvError::Read(backup, e)),
        }
    }
    Ok(parse(&text))
}

/// The resolv.conf text that points the host at l4lb: `nameserver` per address in `listen`
/// on port 53 (specific addresses; a wildcard stands for loopback), at most three (glibc's
/// limit), then the original's `search` and `options` lines.
pub fn render(listen: &[SocketAddr], original: &ResolvConf) -> Result<String, ResolvError> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for l in listen.iter().filter(|l| l.port() == 53) {
        let ip = match l.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(ResolvError::NoPort53);
    }
    let mut text = format!(
        "{MARKER}\n# The original is restored on exit and kept meanwhile in <this file>.l4lb-orig.\n"
    );
    for ip in ips.iter().take(3) {
        text.push_str(&format!("nameserver {ip}\n"));
    }
    if !original.search.is_empty() {
        text.push_str(&format!("search {}\n", original.search.join(" ")));
    }
    if !original.options.is_empty() {
        text.push_str(&format!("options {}\n", original.options.join(" ")));
    }
    Ok(text)
}

/// A resolv.conf l4lb wrote; [`ManagedResolvConf::restore`] puts the original back, and so
/// does dropping it (an early return, a panic). A process killed outright leaves l4lb's file,
/// which the next start recognises.
#[derive(Debug)]
pub struct ManagedResolvConf {
    path: PathBuf,
    backup: PathBuf,
    /// The file could not be renamed (a bind mount, as in containers): it was rewritten in
    /// place and is restored the same way.
    in_place: bool,
    restored: bool,
}

impl Drop for ManagedResolvConf {
    fn drop(&mut self) {
        if !self.restored
            && let Err(e) = self.put_back()
        {
            tracing::error!(error = %e, "cannot restore resolv.conf");
        }
    }
}

impl ManagedResolvConf {
    /// Point `path` at l4lb (see [`render`]). The original is moved to [`backup_path`] (a
    /// symlink stays a symlink) unless a backup is already there (a previous run that did not
    /// restore: that backup is the real original and is kept). Returns the guard and the
    /// original configuration (whose nameservers are the upstreams).
    pub fn install(
        path: &Path,
        listen: &[SocketAddr],
    ) -> Result<(ManagedResolvConf, ResolvConf), ResolvError> {
        let original = read_host(path)?;
        let text = render(listen, &original)?;
        let backup = backup_path(path);
        let have_backup = backup.symlink_metadata().is_ok();
        let tmp = {
            let mut p = path.as_os_str().to_owned();
            p.push(".l4lb-tmp");
            PathBuf::from(p)
        };
        let mut in_place = false;
        if !have_backup && let Err(e) = std::fs::rename(path, &backup) {
            // EBUSY (a bind mount) or EXDEV: keep a copy, rewrite in place.
            tracing::debug!(error = %e, "cannot move resolv.conf aside; copying it");
            let orig = std::fs::read(path).map_err(|e| ResolvError::Read(path.into(), e))?;
            std::fs::write(&backup, orig).map_err(|e| ResolvError::Write(backup.clone(), e))?;
            in_place = true;
        }
        let written = if in_place {
            std::fs::write(path, &text)
        } else {
            std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, path))
        };
        if let Err(e) = written {
            // Could not replace it: try writing in place before giving up.
            if in_place || std::fs::write(path, &text).is_err() {
                let _ = std::fs::remove_file(&tmp);
                return Err(ResolvError::Write(path.into(), e));
            }
            in_place = true;
        }
        Ok((
            ManagedResolvConf {
                path: path.into(),
                backup,
                in_place,
                restored: false,
            },
            original,
        ))
    }

    /// Put the original back: move the backup over the file (or, in place, copy its content
    /// back and remove it).
    pub fn restore(mut self) -> Result<(), ResolvError> {
        self.restored = true;
        self.put_back()
    }

    /// Leave the file and its backup as they are: a successor that took over this agent's
    /// sockets manages them now (and restores the original when it stops).
    pub fn hand_over(mut self) {
        self.restored = true;
    }

    fn put_back(&self) -> Result<(), ResolvError> {
        if self.in_place {
            let orig = std::fs::read(&self.backup)
                .map_err(|e| ResolvError::Read(self.backup.clone(), e))?;
            std::fs::write(&self.path, orig)
                .map_err(|e| ResolvError::Write(self.path.clone(), e))?;
            std::fs::remove_file(&self.backup)
                .map_err(|e| ResolvError::Write(self.backup.clone(), e))
        } else {
            std::fs::rename(&self.backup, &self.path)
                .map_err(|e| ResolvError::Write(self.path.clone(), e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn parses_like_glibc() {
        let text = "\
# comment
; another
nameserver 198.18.0.1
nameserver   198.18.0.2   # trailing comment
nameserver\t2001:db8::53
nameserver fe80::1%2
nameserver fe80::2%eth0
nameserver not-an-address
nameserver
 nameserver 198.18.0.3
domain first.example
search b.example c.example ; comment
options ndots:2 timeout:1
options use-vc
sortlist 130.155.160.0/255.255.240.0
nameserver ::ffff:198.18.0.4
garbage line here
";
        let c = parse(text);
        assert_eq!(
            c.nameservers,
            vec![
                sa("198.18.0.1:53"),
                sa("198.18.0.2:53"),
                sa("[2001:db8::53]:53"),
                SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().expect("ip"), 53, 0, 2)),
                sa("198.18.0.3:53"),
                sa("198.18.0.4:53"),
            ]
        );
        assert_eq!(c.skipped, vec!["fe80::2%eth0", "not-an-address"]);
        assert_eq!(c.search, vec!["b.example", "c.example"]);
        assert_eq!(c.options, vec!["ndots:2", "timeout:1", "use-vc"]);
        assert_eq!(parse(""), ResolvConf::default());
        assert_eq!(
            parse("\u{0}\u{ff}\n\n  \n#nameserver 1.2.3.4"),
            ResolvConf::default()
        );
    }

    #[test]
    fn upstreams_never_include_l4lb_itself() {
        let c = parse(
            "nameserver 198.51.100.1\nnameserver 127.0.0.1\nnameserver 198.18.0.1\n\
             nameserver 127.0.0.53\nnameserver ::1\nnameserver 198.18.0.1\n",
        );
        // (own listen addresses, upstreams left)
        let cases: &[(&[&str], &[&str])] = &[
            (
                &[],
                &[
                    "198.51.100.1:53",
                    "127.0.0.1:53",
                    "198.18.0.1:53",
                    "127.0.0.53:53",
                    "[::1]:53",
                ],
            ),
            // The default listen address is on another port: not the same server.
            (
                &["127.0.0.1:5454"],
                &[
                    "198.51.100.1:53",
                    "127.0.0.1:53",
                    "198.18.0.1:53",
                    "127.0.0.53:53",
                    "[::1]:53",
                ],
            ),
            (
                &["198.51.100.1:53", "127.0.0.1:53"],
                &["198.18.0.1:53", "127.0.0.53:53", "[::1]:53"],
            ),
            // A v4 wildcard on 53 is every v4 loopback address; ::1 is another family.
            (
                &["0.0.0.0:53"],
                &["198.51.100.1:53", "198.18.0.1:53", "[::1]:53"],
            ),
            (
                &["0.0.0.0:53", "[::]:53"],
                &["198.51.100.1:53", "198.18.0.1:53"],
            ),
        ];
        for (own, want) in cases {
            let own: Vec<SocketAddr> = own.iter().map(|s| sa(s)).collect();
            let want: Vec<SocketAddr> = want.iter().map(|s| sa(s)).collect();
            assert_eq!(upstreams(&c, &own), want, "{own:?}");
        }
    }

    #[test]
    fn render_points_at_port_53_listeners_and_keeps_search_and_options() {
        let orig = parse("nameserver 198.18.0.1\nsearch a.example\noptions ndots:1 use-vc\n");
        let listen = [
            sa("127.0.0.1:5454"),
            sa("198.51.100.1:53"),
            sa("198.51.100.2:53"),
            sa("198.51.100.2:53"),
            sa("198.51.100.3:53"),
            sa("0.0.0.0:53"),
        ];
        let text = render(&listen, &orig).expect("renders");
        assert!(text.starts_with(MARKER));
        let back = parse(&text);
        assert_eq!(
            back.nameservers,
            vec![
                sa("198.51.100.1:53"),
                sa("198.51.100.2:53"),
                sa("198.51.100.3:53")
            ]
        );
        assert_eq!(back.search, orig.search);
        assert_eq!(back.options, orig.options);
        assert!(matches!(
            render(&[sa("127.0.0.1:5454")], &orig),
            Err(ResolvError::NoPort53)
        ));
        let wild = parse(&render(&[sa("[::]:53")], &ResolvConf::default()).expect("renders"));
        assert_eq!(wild.nameservers, vec![sa("[::1]:53")]);
    }

    #[test]
    fn a_handed_over_file_stays_for_the_successor_to_restore() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 192.0.2.53\nsearch example.com\n").expect("write");
        let listen: Vec<SocketAddr> = vec!["127.0.0.1:53".parse().expect("addr")];
        let (old, _) = ManagedResolvConf::install(&path, &listen).expect("install");
        // The successor installs over the running agent's file: the original stays the one
        // backed up, read as the upstreams.
        let (new, original) = ManagedResolvConf::install(&path, &listen).expect("successor");
        assert_eq!(
            original.nameservers,
            ["192.0.2.53:53".parse::<SocketAddr>().expect("a")]
        );
        old.hand_over();
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with(MARKER), "{text}");
        new.restore().expect("restore");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "nameserver 192.0.2.53\nsearch example.com\n");
        assert!(!backup_path(&path).exists());
    }

    #[test]
    fn managed_file_is_restored_and_a_left_over_is_recognised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("stub-resolv.conf");
        let orig = "nameserver 198.18.0.1\nsearch a.example\n";
        std::fs::write(&target, orig).expect("write");
        // A symlink, as systemd-resolved's /etc/resolv.conf: it must come back a symlink.
        let path = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let listen = [sa("198.51.100.1:53")];

        let (guard, original) = ManagedResolvConf::install(&path, &listen).expect("install");
        assert_eq!(original.nameservers, vec![sa("198.18.0.1:53")]);
        let now = std::fs::read_to_string(&path).expect("read");
        assert_eq!(parse(&now).nameservers, listen);
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            orig,
            "target untouched"
        );
        // Upstreams read while managed come from the original.
        assert_eq!(
            read_host(&path).expect("read").nameservers,
            original.nameservers
        );
        guard.restore().expect("restore");
        assert!(path.symlink_metadata().expect("meta").is_symlink());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), orig);
        assert!(!backup_path(&path).exists());

        // Dropped without restore(): restored all the same.
        let (guard, _) = ManagedResolvConf::install(&path, &listen).expect("install");
        drop(guard);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), orig);
        // A run killed outright: its file and backup are there; the next run keeps the
        // backup as the original and restores it.
        let (guard, _) = ManagedResolvConf::install(&path, &listen).expect("install");
        std::mem::forget(guard);
        let (guard, original) = ManagedResolvConf::install(&path, &listen).expect("again");
        assert_eq!(original.nameservers, vec![sa("198.18.0.1:53")]);
        guard.restore().expect("restore");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), orig);

        assert!(matches!(
            ManagedResolvConf::install(&dir.path().join("missing"), &listen),
            Err(ResolvError::Read(..))
        ));
    }
}
