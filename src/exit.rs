//! How `l4lb` fails and the exit status each kind of failure gets: bad configuration 64,
//! missing privilege 2, anything else 1. Errors keep their chain (`anyhow` context over the
//! components' `thiserror` types); [`chain`] prints it once, however the layers below
//! repeat their sources in their own messages.

use std::error::Error;

use crate::agent::bpf::BpfError;
use crate::agent::netif::NetifError;
use crate::config::ConfigError;

/// How `l4lb` failed, which decides its exit status ([`AppError::code`]).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A flag, a combination of flags or a file they name is wrong: exit 64.
    #[error("{}", chain(.0))]
    Config(#[from] ConfigError),
    /// The process may not do what it must (`EPERM`, `EACCES`): exit 2.
    #[error("{}", chain(.0.as_ref()))]
    Privilege(anyhow::Error),
    /// Anything else: exit 1.
    #[error("{}", chain(.0.as_ref()))]
    Other(#[from] anyhow::Error),
}

impl AppError {
    /// The process's exit status for this failure.
    pub fn code(&self) -> u8 {
        match self {
            AppError::Config(_) => 64,
            AppError::Privilege(_) => 2,
            AppError::Other(_) => 1,
        }
    }

    /// A failure the kernel's `EPERM` or `EACCES` caused (binding port 53 without
    /// `CAP_NET_BIND_SERVICE`) is a privilege failure; any other is not.
    pub fn classify(e: anyhow::Error) -> AppError {
        if permission_denied(e.as_ref()) {
            AppError::Privilege(e)
        } else {
            AppError::Other(e)
        }
    }

    /// The VIP interface could not be opened: missing `CAP_NET_ADMIN` is a privilege
    /// failure, anything else is not.
    pub fn from_netif(e: NetifError, interface: &str) -> AppError {
        match e {
            NetifError::PermissionDenied { .. } => AppError::Privilege(e.into()),
            other => {
                AppError::Other(anyhow::Error::new(other).context(format!("interface {interface}")))
            }
        }
    }

    /// The kernel path could not start: the kernel's `EPERM` or `EACCES` anywhere in the
    /// chain is a privilege failure; a missing object, a bad cgroup or any other error is
    /// not.
    pub fn from_bpf(e: BpfError, what: &'static str) -> AppError {
        match permission_denied(bpf_cause(&e)) {
            true => AppError::Privilege(anyhow::Error::new(e).context(what)),
            false => AppError::Other(anyhow::Error::new(e).context(what)),
        }
    }
}

/// Where the OS error of `e` is: its source chain, or (for the variants that keep their
/// cause in their message only) the cause itself.
fn bpf_cause(e: &BpfError) -> &(dyn Error + 'static) {
    match e {
        BpfError::NetnsCookie(io) => io,
        BpfError::Load(load) => load.as_ref(),
        BpfError::Link(_, link) => link,
        BpfError::Pin(_, pin) => pin,
        other => other,
    }
}

/// Whether `e` or an error beneath it is the kernel's `EPERM` or `EACCES`.
pub fn permission_denied(e: &(dyn Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.raw_os_error(),
                Some(nix::libc::EPERM | nix::libc::EACCES)
            )
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// `e` and its causes, `: `-separated, each said once: a cause whose words the text already
/// holds (an error that prints its source and also reports it) is skipped.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !s.is_empty() && !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use anyhow::Context;

    use super::*;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn bpf_errors_exit_2_only_when_the_kernel_denies() {
        use nix::libc::{EACCES, EBADF, ENOENT, EPERM};
        let syscall = |errno| aya::sys::SyscallError {
            call: "bpf_prog_attach",
            io_error: os(errno),
        };
        let io = |errno| BpfError::Io {
            path: PathBuf::from("/sys/fs/bpf"),
            source: os(errno),
        };
        let program = |errno| BpfError::Program {
            name: "l4lb_connect4",
            source: aya::programs::ProgramError::SyscallError(syscall(errno)),
        };
        let link = |errno| {
            BpfError::Link(
                "l4lb_connect4",
                aya::programs::links::LinkError::SyscallError(syscall(errno)),
            )
        };
        for (what, e, want) in [
            ("mount refused", io(EPERM), 2),
            ("pin directory not writable", io(EACCES), 2),
            ("attach refused", program(EPERM), 2),
            ("link refused", link(EACCES), 2),
            ("netns cookie refused", BpfError::NetnsCookie(os(EPERM)), 2),
            ("missing file", io(ENOENT), 1),
            ("not a cgroup", program(EBADF), 1),
            ("object without a map", BpfError::Missing("map services"), 1),
            (
                "old kernel",
                BpfError::NetnsCookie(os(nix::libc::ENOPROTOOPT)),
                1,
            ),
            (
                "predecessor attached",
                BpfError::StillAttached(PathBuf::from("/sys/fs/bpf/l4lb/default")),
                1,
            ),
        ] {
            let got = AppError::from_bpf(e, "--data-plane bpf");
            assert_eq!(got.code(), want, "{what}: {got}");
            assert!(got.to_string().starts_with("--data-plane bpf: "), "{got}");
        }
    }

    #[test]
    fn config_and_other_failures_have_their_codes() {
        let bad = AppError::from(ConfigError::Invalid("--zone x".into()));
        assert_eq!(bad.code(), 64);
        let other = AppError::from(anyhow::anyhow!("boom"));
        assert_eq!(other.code(), 1);
        let denied = AppError::from_netif(
            NetifError::PermissionDenied {
                op: "create link".into(),
            },
            "minuteman",
        );
        assert_eq!(denied.code(), 2);
        assert!(denied.to_string().contains("CAP_NET_ADMIN"), "{denied}");
        let port_53 = anyhow::Error::new(os(nix::libc::EACCES)).context("cannot bind DNS");
        assert_eq!(AppError::classify(port_53).code(), 2);
        let in_use = anyhow::Error::new(os(nix::libc::EADDRINUSE)).context("cannot bind DNS");
        assert_eq!(AppError::classify(in_use).code(), 1);
    }

    #[test]
    fn the_chain_is_kept_and_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading {0}: {1}")]
        struct Read(&'static str, #[source] io::Error);
        let e = Err::<(), _>(Read("/etc/resolv.conf", os(nix::libc::ENOENT)))
            .context("--dns-manage-resolv-conf")
            .expect_err("an error");
        let shown = AppError::from(e).to_string();
        assert_eq!(
            shown,
            format!(
                "--dns-manage-resolv-conf: reading /etc/resolv.conf: {}",
                os(nix::libc::ENOENT)
            )
        );
        // A source its parent does not repeat is printed after it.
        let e = anyhow::Error::new(os(nix::libc::EADDRINUSE)).context("cannot bind the API");
        assert_eq!(
            AppError::from(e).to_string(),
            format!("cannot bind the API: {}", os(nix::libc::EADDRINUSE))
        );
    }
}
