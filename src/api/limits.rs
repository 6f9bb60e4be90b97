//! The API's own accept loop, so that a listener on the network cannot be held open by
//! clients that never finish a request: a cap on open connections (past it a new one is
//! closed at once, and the cap is lowered to leave most descriptors to the data plane), and
//! a header-read timeout that also bounds idle keep-alive connections (hyper starts it
//! whenever a connection waits for the next request). A blocking query in progress is not
//! idle: it ends with its `wait`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Limits of the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Open API connections at most (further capped to [`NOFILE_SHARE`] of `RLIMIT_NOFILE`).
    pub max_connections: usize,
    /// A request's headers must arrive within this, counted from when the connection starts
    /// waiting for it (so it is also the keep-alive idle timeout).
    pub header_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            // Agents hold one blocking query each: 1,024 covers a large cluster per controller.
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// The API may use at most 1/NOFILE_SHARE of the descriptor limit: the rest belongs to the
/// data plane (two per proxied connection).
pub const NOFILE_SHARE: u64 = 8;

impl ApiLimits {
    /// The connection cap under a descriptor limit of `nofile`.
    pub fn effective_max(&self, nofile: Option<u64>) -> usize {
        let share = nofile.map_or(usize::MAX, |n| {
            usize::try_from(n / NOFILE_SHARE).unwrap_or(usize::MAX)
        });
        self.max_connections.min(share).max(1)
    }
}

/// When to give the memory of ended connections back (see [`crate::heap`]): once the open
/// connections fell to a quarter of the most seen since the last time, if that was at least
/// [`TRIM_HIGH`]. Pure: the accept loop tells it every open and close.
#[derive(Debug, Default)]
struct TrimMark {
    high: usize,
}

/// Fewer connections than this at once free too little to be worth a trim.
const TRIM_HIGH: usize = 64;

impl TrimMark {
    fn opened(&mut self, open: usize) {
        self.high = self.high.max(open);
    }

    /// One closed and `open` remain: true when it is time to trim.
    fn closed(&mut self, open: usize) -> bool {
        if self.high >= TRIM_HIGH && open <= self.high / 4 {
            self.high = open;
            true
        } else {
            false
        }
    }
}

/// The soft `RLIMIT_NOFILE`, if it can be read and is finite.
fn nofile() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    (soft != nix::sys::resource::RLIM_INFINITY).then_some(soft)
}

/// Serve `router` on `listener` within `limits` until `shutdown`; then finish the requests in
/// progress.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ApiLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let max = limits.effective_max(nofile());
    if max < limits.max_connections {
        tracing::info!(
            max,
            "API connections capped to leave descriptors to the data plane"
        );
    }
    let permits = Arc::new(Semaphore::new(max));
    let mark = Arc::new(std::sync::Mutex::new(TrimMark::default()));
    let open = move |p: &Semaphore| max - p.available_permits();
    let tracker = TaskTracker::new();
    let service = TowerToHyperService::new(router);
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors: back off instead of spinning on a readable listener.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::debug!(%peer, max, "API connection refused: at the connection limit");
            drop(stream);
            continue;
        };
        if let Ok(mut m) = mark.lock() {
            m.opened(open(&permits));
        }
        let service = service.clone();
        let stop = shutdown.clone();
        let (permits, mark) = (Arc::clone(&permits), Arc::clone(&mark));
        tracker.spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "API connection ended");
            }
            drop(permit);
            // A thousand blocked watchers gone leave their buffers in glibc's arenas.
            if mark.lock().is_ok_and(|mut m| m.closed(open(&permits))) {
                tokio::task::spawn_blocking(crate::heap::release);
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn memory_is_trimmed_when_connections_fall_from_a_high_mark() {
        // (opens up to, then closes down to) -> the open counts at which it trims.
        type Case = (&'static [(usize, usize)], &'static [usize]);
        let cases: [Case; 4] = [
            // A few connections come and go: never.
            (&[(10, 0), (63, 0)], &[]),
            // A thousand watchers leave: at a quarter, then at a quarter of that.
            (&[(1000, 0)], &[250, 62]),
            // Churn near the top never trims; falling later does.
            (&[(100, 90), (100, 0)], &[25]),
            // After a trim, a new high mark is needed.
            (&[(64, 16), (20, 0)], &[16]),
        ];
        for (i, (moves, want)) in cases.into_iter().enumerate() {
            let mut m = TrimMark::default();
            let mut open = 0;
            let mut trims = Vec::new();
            for &(up, down) in moves {
                while open < up {
                    open += 1;
                    m.opened(open);
                }
                while open > down {
                    open -= 1;
                    if m.closed(open) {
                        trims.push(open);
                    }
                }
            }
            assert_eq!(trims, want, "case {i}");
        }
    }

    #[test]
    fn the_cap_leaves_most_descriptors_to_the_data_plane() {
        let l = ApiLimits::default();
        assert_eq!(l.effective_max(None), 1024);
        assert_eq!(l.effective_max(Some(1 << 20)), 1024);
        assert_eq!(l.effective_max(Some(512)), 64);
        assert_eq!(l.effective_max(Some(3)), 1);
    }

    /// Read until EOF or error; true if the server closed within `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn silent_trickling_and_idle_connections_are_closed_and_the_cap_holds() {
        let router = Router::new().route("/", axum::routing::get(|| async { "ok\n" }));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let limits = ApiLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
        };
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(l, router, limits, stop.clone()));
        let grace = Duration::from_secs(3);

        // Silent: never sends a byte.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // Trickling: a header byte every 100 ms, never finishing.
        let mut trickle = TcpStream::connect(addr).await.unwrap();
        let trickler = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            {
                if trickle.write_all(&[*b]).await.is_err() {
                    return closed_within(&mut trickle, grace).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            closed_within(&mut trickle, grace).await
        });
        // Idle keep-alive: one request answered, then nothing.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        // A fourth fills the cap; a fifth is closed at once.
        let _fourth = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut fifth = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut fifth, Duration::from_millis(500)).await,
            "over the cap, not closed at once"
        );

        assert!(
            closed_within(&mut silent, grace).await,
            "silent connection kept"
        );
        assert!(
            closed_within(&mut idle, grace).await,
            "idle connection kept"
        );
        assert!(trickler.await.unwrap(), "trickling connection kept");

        // Slots freed: a new client is served.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert!(out.starts_with(b"HTTP/1.1 200"));
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
