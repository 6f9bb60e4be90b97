//! The systemd notify protocol (`sd_notify(3)`): newline-separated `KEY=VALUE` assignments in
//! one datagram to the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the
//! abstract namespace). A process started outside systemd has no such variable and every
//! call is a no-op. Depends on nothing else in the crate.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for `Type=notify` services.
pub const ENV: &str = "NOTIFY_SOCKET";

/// One assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Start-up (or a reload) is complete.
    Ready,
    /// A reload began; `MONOTONIC_USEC` (sent with it) is when.
    Reloading,
    /// The service is stopping.
    Stopping,
    /// The service's main process is now this one.
    MainPid(u32),
    /// A line for `systemctl status`.
    Status(String),
}

impl State {
    fn write(&self, out: &mut String) {
        match self {
            State::Ready => out.push_str("READY=1\n"),
            State::Reloading => {
                out.push_str("RELOADING=1\n");
                out.push_str(&format!("MONOTONIC_USEC={}\n", monotonic_usec()));
            }
            State::Stopping => out.push_str("STOPPING=1\n"),
            State::MainPid(pid) => out.push_str(&format!("MAINPID={pid}\n")),
            // One line: a newline would start another assignment.
            State::Status(s) => out.push_str(&format!("STATUS={}\n", s.replace('\n', " "))),
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd compares it.
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

/// Sends to the service manager's notify socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier of `$NOTIFY_SOCKET`, if set (and usable: a bad value is logged once).
    pub fn from_env() -> Option<Self> {
        let v = std::env::var_os(ENV)?;
        let v = v.to_string_lossy();
        match Notifier::at(&v) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(socket = %v, error = %e, "{ENV} unusable; systemd is not told");
                None
            }
        }
    }

    /// A notifier sending to `socket`: a path, or `@name` for an abstract one.
    pub fn at(socket: &str) -> io::Result<Self> {
        let addr = match socket.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None if socket.starts_with('/') => SocketAddr::from_pathname(socket)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "neither an absolute path nor @abstract",
                ));
            }
        };
        Ok(Notifier {
            sock: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Send `states` in one datagram.
    pub fn send(&self, states: &[State]) -> io::Result<()> {
        let mut msg = String::new();
        for s in states {
            s.write(&mut msg);
        }
        self.sock.send_to_addr(msg.as_bytes(), &self.addr)?;
        Ok(())
    }

    /// [`Notifier::send`], logging a failure instead of returning it (systemd's view is
    /// informative: the agent serves either way).
    pub fn tell(&self, states: &[State]) {
        if let Err(e) = self.send(states) {
            tracing::warn!(error = %e, ?states, "cannot notify systemd");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_each_message_as_one_datagram_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let fake = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::at(path.to_str().unwrap()).unwrap();
        n.send(&[State::Ready]).unwrap();
        n.send(&[State::Reloading]).unwrap();
        n.send(&[State::MainPid(4242), State::Ready]).unwrap();
        n.send(&[State::Status("two\nlines".into()), State::Stopping])
            .unwrap();
        assert_eq!(recv(&fake), "READY=1\n");
        let reloading = recv(&fake);
        let usec: u64 = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|r| r.strip_suffix('\n'))
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{reloading:?}"));
        assert!(usec > 0 && usec <= monotonic_usec());
        assert_eq!(recv(&fake), "MAINPID=4242\nREADY=1\n");
        assert_eq!(recv(&fake), "STATUS=two lines\nSTOPPING=1\n");
    }

    #[test]
    fn abstract_sockets_and_bad_values() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("l4lb-test-notify-{}", std::process::id());
        let fake =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::at(&format!("@{name}")).unwrap();
        n.send(&[State::Stopping]).unwrap();
        assert_eq!(recv(&fake), "STOPPING=1\n");
        assert!(Notifier::at("relative/path").is_err());
        // Nobody listening: an error to the caller (tell() logs it).
        let dir = tempfile::tempdir().unwrap();
        let gone = Notifier::at(dir.path().join("none").to_str().unwrap()).unwrap();
        assert!(gone.send(&[State::Ready]).is_err());
        gone.tell(&[State::Ready]);
    }
}
