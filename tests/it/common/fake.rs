//! What the fake sources share (the fake Marathon in [`super::marathon`], the fake Mesos
//! master in [`super::mesos`]): a server on a port-0 listener that stops when the test stops
//! it or drops its last handle ([`Fake`]), streaming answers fed by a task (Marathon's SSE,
//! Mesos's chunked RecordIO; [`stream`]), the events a test emits to every open stream
//! ([`Events`]), and for DC/OS strict mode a [`Gate`] in front of a fake's API and serving
//! over TLS ([`Fake::serve_tls`]; the fake ACS is [`super::acs`]).

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

/// A running fake: its address, and its state (what the test reads and changes, through
/// `Deref`). Clones share the server; it stops with [`Fake::stop`] or when the last clone
/// goes.
#[derive(Clone)]
pub struct Fake<S> {
    pub addr: SocketAddr,
    /// Served over TLS ([`Fake::serve_tls`]).
    tls: bool,
    state: S,
    stop: CancellationToken,
    _stop_on_drop: Arc<DropGuard>,
}

impl<S> Fake<S> {
    /// Serve `router` (built over `state`) on `listener` until `stop` fires; `state` should
    /// end its open streams on `stop` too.
    pub fn serve(
        listener: tokio::net::TcpListener,
        router: Router,
        state: S,
        stop: CancellationToken,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Fake {
            addr,
            tls: false,
            state,
            _stop_on_drop: Arc::new(stop.clone().drop_guard()),
            stop,
        }
    }

    /// As [`Fake::serve`], over TLS with `tls` (HTTP/1.1).
    pub fn serve_tls(
        listener: tokio::net::TcpListener,
        router: Router,
        state: S,
        stop: CancellationToken,
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stopped.cancelled() => return,
                    c = listener.accept() => match c {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                let (acceptor, router, stopped) =
                    (acceptor.clone(), router.clone(), stopped.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(
                        hyper_util::rt::TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(router),
                    );
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped.cancelled() => {}
                    }
                });
            }
        });
        Fake {
            addr,
            tls: true,
            state,
            _stop_on_drop: Arc::new(stop.clone().drop_guard()),
            stop,
        }
    }

    /// Serve `api` behind `gate` with the `extra` routes (a fake ACS's login) beside it and
    /// outside the gate, over TLS when `tls` is given; as [`Fake::serve`] otherwise.
    pub fn serve_gated(
        listener: tokio::net::TcpListener,
        (api, gate, extra): (Router, &Gate, Router),
        state: S,
        stop: CancellationToken,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let router = gate.guard(api).merge(extra);
        match tls {
            Some(tls) => Fake::serve_tls(listener, router, state, stop, tls),
            None => Fake::serve(listener, router, state, stop),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stop serving (open streams end too).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl<S> Deref for Fake<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.state
    }
}

/// A listener on a free loopback port.
pub async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Where a streaming answer's task sends its chunks (an error breaks the connection).
pub type Sink = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A streaming answer body, fed by `feed` on a task of its own until it returns or the client
/// goes away.
pub fn stream<F, Fut>(feed: F) -> Body
where
    F: FnOnce(Sink) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(feed(tx));
    Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// What a test emits to every open stream of a fake.
#[derive(Clone)]
pub struct Events<T>(broadcast::Sender<T>);

impl<T: Clone> Default for Events<T> {
    fn default() -> Self {
        Events(broadcast::channel(4096).0)
    }
}

impl<T: Clone> Events<T> {
    pub fn send(&self, ev: T) {
        let _ = self.0.send(ev);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<T> {
        self.0.subscribe()
    }

    /// Streams open.
    pub fn receivers(&self) -> usize {
        self.0.receiver_count()
    }
}

/// The next event the test emitted, or `None` once the fake stops (a stream that fell behind
/// skips what it missed).
pub async fn next_event<T: Clone>(
    rx: &mut broadcast::Receiver<T>,
    stop: &CancellationToken,
) -> Option<T> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            ev = rx.recv() => match ev {
                Ok(ev) => return Some(ev),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// What a fake asks of every request before answering it: none (the default) lets all in;
/// with a check ([`Gate::require`]), a request that fails it is answered 401 with
/// `WWW-Authenticate: acsjwt`, as DC/OS's Admin Router answers a missing, unknown or expired
/// token, and counted.
#[derive(Clone, Default)]
pub struct Gate {
    check: Arc<Mutex<Option<Check>>>,
    pub refused: Arc<AtomicU64>,
}

type Check = Arc<dyn Fn(&HeaderMap) -> bool + Send + Sync>;

impl Gate {
    pub fn require(&self, check: impl Fn(&HeaderMap) -> bool + Send + Sync + 'static) {
        *self.check.lock().unwrap() = Some(Arc::new(check));
    }

    /// `router` behind this gate (routes merged later are not).
    pub fn guard(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), gated))
    }
}

async fn gated(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let check = gate.check.lock().unwrap().clone();
    if let Some(check) = check
        && !check(req.headers())
    {
        gate.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "acsjwt")],
        )
            .into_response();
    }
    next.run(req).await
}
