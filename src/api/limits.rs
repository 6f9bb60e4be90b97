//! The API's own accept loop, so that a listener on the network cannot be held open by
//! clients that never finish a request, and so that a controller followed by thousands of
//! agents sheds load cleanly:
//! - a cap on open connections that follows `RLIMIT_NOFILE` (whose soft limit
//!   [`raise_nofile`] lifts to the hard one at start) or `--api-max-connections`; an agent's
//!   API leaves most descriptors to its data plane, a controller's may use nearly all;
//! - past the cap, a small overflow pool still answers `/healthz`, `/ready` and `/metrics`
//!   (health never queues behind watchers) and gives everything else a fast `503` with
//!   `Retry-After`, which sends an agent to its next controller instead of a reset;
//! - a header-read timeout that also bounds idle keep-alive connections (hyper starts it
//!   whenever a connection waits for the next request). A blocking query in progress is not
//!   idle: it ends with its `wait`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The API's own series: open connections, the cap, and what was turned away past it.
#[derive(Debug, Clone, Default)]
pub struct ApiMetrics {
    pub connections: Gauge,
    /// Blocking queries waiting for a change (one per following agent).
    pub watchers: Gauge,
    pub max_connections: Gauge,
    /// Connections past the cap served by the overflow pool (health, or a `503`).
    pub over_cap: Counter,
    /// Connections closed unread: the cap and the overflow pool were both full.
    pub dropped: Counter,
}

impl ApiMetrics {
    pub fn new(reg: &mut Registry) -> Self {
        let m = ApiMetrics::default();
        reg.register(
            "api_connections",
            "Open API connections (each agent's blocking query holds one)",
            m.connections.clone(),
        );
        reg.register(
            "api_watchers",
            "Blocking queries parked until the table changes (one per following agent)",
            m.watchers.clone(),
        );
        reg.register(
            "api_max_connections",
            "The API connection cap",
            m.max_connections.clone(),
        );
        reg.register(
            "api_over_cap",
            "API connections past the cap, answered health or 503 Retry-After",
            m.over_cap.clone(),
        );
        reg.register(
            "api_dropped",
            "API connections closed unread, the cap and the overflow pool both full",
            m.dropped.clone(),
        );
        m
    }
}

/// Whose API this is, which decides how many descriptors it may take by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiRole {
    /// A controller: its descriptors are its watchers' (all but [`RESERVED_FDS`]).
    Controller,
    /// An agent or `run`: 1/[`NOFILE_SHARE`] of the limit; the rest is the data plane's.
    #[default]
    Node,
}

/// Limits of the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Open API connections at most (`--api-max-connections`); `None` follows the
    /// descriptor limit (see [`ApiLimits::effective_max`]).
    pub max_connections: Option<usize>,
    pub role: ApiRole,
    /// Connections past the cap that are still read, to answer health or a `503`.
    pub overflow: usize,
    /// What a `503` past the cap asks the client to wait.
    pub retry_after: Duration,
    /// A request's headers must arrive within this, counted from when the connection starts
    /// waiting for it (so it is also the keep-alive idle timeout).
    pub header_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_connections: None,
            role: ApiRole::Node,
            overflow: 256,
            retry_after: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// A node's API may use at most 1/NOFILE_SHARE of the descriptor limit: the rest belongs to
/// the data plane (two per proxied connection).
pub const NOFILE_SHARE: u64 = 8;

/// Descriptors a controller keeps for itself beyond its API connections: the listener, the
/// source's connections, logs, the overflow pool's share.
pub const RESERVED_FDS: u64 = 512;

/// A node's cap when the descriptor limit is unknown or unlimited.
const NODE_DEFAULT: usize = 1024;

impl ApiLimits {
    pub fn for_role(role: ApiRole, max_connections: Option<usize>) -> Self {
        ApiLimits {
            max_connections,
            role,
            ..ApiLimits::default()
        }
    }

    /// The connection cap under a descriptor limit of `nofile`: the flag if given, else what
    /// the role may take; never more than the descriptors there are, never less than one.
    pub fn effective_max(&self, nofile: Option<u64>) -> usize {
        let fit = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let room = nofile.map_or(usize::MAX, |n| fit(n.saturating_sub(RESERVED_FDS)));
        let by_role = match (self.role, nofile) {
            (ApiRole::Controller, _) => room,
            (ApiRole::Node, Some(n)) => fit(n / NOFILE_SHARE),
            (ApiRole::Node, None) => NODE_DEFAULT,
        };
        self.max_connections.unwrap_or(by_role).min(room).max(1)
    }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit (systemd and shells start services at
/// 1,024 soft, far below what a controller followed by thousands of agents needs). Returns
/// the soft limit now in force.
pub fn raise_nofile() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
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
/// progress. Past the cap, `overflow` (health, and a `503` for the rest) serves the
/// connection instead, one request each.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    overflow: Router,
    limits: ApiLimits,
    metrics: ApiMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let max = limits.effective_max(nofile());
    tracing::info!(max, "API connection cap");
    metrics
        .max_connections
        .set(i64::try_from(max).unwrap_or(i64::MAX));
    let permits = Arc::new(Semaphore::new(max));
    let spare = Arc::new(Semaphore::new(limits.overflow));
    let mark = Arc::new(std::sync::Mutex::new(TrimMark::default()));
    let open = move |p: &Semaphore| max - p.available_permits();
    let tracker = TaskTracker::new();
    let service = TowerToHyperService::new(router);
    let overflow = TowerToHyperService::new(overflow);
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
            let Ok(permit) = Arc::clone(&spare).try_acquire_owned() else {
                tracing::debug!(%peer, max, "API connection closed: cap and overflow full");
                metrics.dropped.inc();
                drop(stream);
                continue;
            };
            tracing::debug!(%peer, max, "API connection past the cap: health or 503 only");
            metrics.over_cap.inc();
            let (svc, stop) = (overflow.clone(), shutdown.clone());
            // One request, and only a short wait for it.
            let timeout = limits.header_timeout.min(Duration::from_secs(2));
            tracker.spawn(async move {
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), svc);
                run_conn(conn, stop, peer).await;
                drop(permit);
            });
            continue;
        };
        if let Ok(mut m) = mark.lock() {
            m.opened(open(&permits));
        }
        metrics.connections.inc();
        let service = service.clone();
        let (stop, gauge) = (shutdown.clone(), metrics.connections.clone());
        let (permits, mark) = (Arc::clone(&permits), Arc::clone(&mark));
        tracker.spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            run_conn(conn, stop, peer).await;
            drop(permit);
            gauge.dec();
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

/// Drive one connection; on `stop`, let its request in progress finish.
async fn run_conn<S>(
    conn: http1::Connection<TokioIo<tokio::net::TcpStream>, S>,
    stop: CancellationToken,
    peer: std::net::SocketAddr,
) where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
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
    fn the_cap_follows_the_descriptor_limit_the_role_and_the_flag() {
        use ApiRole::{Controller, Node};
        // (role, --api-max-connections, RLIMIT_NOFILE) -> cap
        let cases: [(ApiRole, Option<usize>, Option<u64>, usize); 10] = [
            // A node leaves 7/8 to its data plane.
            (Node, None, Some(20_000), 2_500),
            (Node, None, Some(1_024), 128),
            (Node, None, None, 1_024),
            (Node, None, Some(3), 1),
            // A controller takes all but its reserve.
            (Controller, None, Some(20_000), 19_488),
            (Controller, None, None, usize::MAX),
            (Controller, None, Some(100), 1),
            // The flag wins, within the descriptors there are.
            (Controller, Some(10_000), Some(20_000), 10_000),
            (Node, Some(10_000), Some(20_000), 10_000),
            (Controller, Some(50_000), Some(20_000), 19_488),
        ];
        for (role, flag, nofile, want) in cases {
            let l = ApiLimits::for_role(role, flag);
            assert_eq!(
                l.effective_max(nofile),
                want,
                "{role:?} {flag:?} {nofile:?}"
            );
        }
    }

    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{Resource, getrlimit};
        let now = raise_nofile();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert_eq!(now, Some(soft));
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
            max_connections: Some(4),
            overflow: 1,
            header_timeout: Duration::from_millis(300),
            ..ApiLimits::default()
        };
        let stop = CancellationToken::new();
        let overflow =
            Router::new().fallback(|| async { (StatusCode::SERVICE_UNAVAILABLE, "busy\n") });
        let metrics = ApiMetrics::default();
        let server = tokio::spawn(serve(
            l,
            router,
            overflow,
            limits,
            metrics.clone(),
            stop.clone(),
        ));
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
        // A fourth fills the cap; a fifth, past it, gets a 503 at once; a sixth finds the
        // overflow full too while the fifth holds it, and is closed at once.
        let _fourth = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut fifth = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut sixth = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut sixth, Duration::from_millis(500)).await,
            "past the cap and the overflow, not closed at once"
        );
        fifth
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_millis(500), fifth.read_to_end(&mut out))
            .await
            .expect("a 503 past the cap, at once")
            .unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 503"),
            "{}",
            String::from_utf8_lossy(&out)
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
        assert_eq!(metrics.over_cap.get(), 1);
        assert_eq!(metrics.dropped.get(), 1);
        assert_eq!(metrics.max_connections.get(), 4);

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
