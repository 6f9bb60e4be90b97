//! Small real backends for tests: an HTTP responder and a UDP echo that say who they are.

use std::net::SocketAddr;

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
