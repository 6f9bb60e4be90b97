//! Small real backends for tests: an HTTP responder and a UDP echo that say who they are, and
//! a child-process guard that kills by PID on drop.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::process::Child;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// Serve `HTTP/1.0 200` with body `<id>\n` on `listener` until the task is aborted.
pub fn http(listener: std::net::TcpListener, id: String) -> JoinHandle<()> {
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let id = id.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("{id}\n");
                let resp = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    })
}

/// Answer every datagram with `<id>:<datagram>` until the task is aborted.
pub fn udp_echo(socket: std::net::UdpSocket, id: String) -> JoinHandle<()> {
    socket.set_nonblocking(true).expect("nonblocking");
    let socket = tokio::net::UdpSocket::from_std(socket).expect("tokio socket");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let mut out = format!("{id}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&out, from).await;
        }
    })
}

/// Bind a TCP listener on `ip:0`.
pub fn tcp_listener(ip: &str) -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// A child process killed (by PID) and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Wait for exit up to `within`; None if still running.
    pub fn wait_exit(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let t = std::time::Instant::now();
        loop {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            if t.elapsed() > within {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines a child writes to stderr, collected by a thread, searchable while it runs.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Log {
    /// Start collecting `child`'s stderr (which must be piped).
    pub fn capture(child: &mut Child) -> Log {
        use std::io::BufRead;
        let log = Log::default();
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = log.0.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if std::env::var_os("L4LB_TEST_ECHO").is_some() {
                    eprintln!("{line}");
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        log
    }

    /// The `addr=` value of the first line containing `marker`, waiting up to `within`.
    pub fn addr(&self, marker: &str, within: std::time::Duration) -> SocketAddr {
        let line = self.wait_for(marker, within);
        line.split("addr=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr= in {line:?}"))
    }

    /// Wait for a line containing `marker`.
    pub fn wait_for(&self, marker: &str, within: std::time::Duration) -> String {
        let t = std::time::Instant::now();
        loop {
            if let Some(l) = self
                .0
                .lock()
                .expect("log lock")
                .iter()
                .find(|l| l.contains(marker))
            {
                return l.clone();
            }
            if t.elapsed() > within {
                panic!(
                    "no log line with {marker:?} within {within:?}; log:\n{}",
                    self.text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    pub fn count(&self, marker: &str) -> usize {
        self.0
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(marker))
            .count()
    }

    pub fn text(&self) -> String {
        self.0.lock().expect("log lock").join("\n")
    }
}
