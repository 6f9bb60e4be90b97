//! The HTTP API of controllers and agents: `GET /v1/vips` (with Consul-style blocking
//! queries), `/v1/label-errors`, `/healthz`, `/ready`, `/metrics` and the status page at `/`
//! ([`page`]). Depends on `model` only; the agent's per-backend counters come in through the
//! [`LiveStats`] trait, a source's rejected labels through a watch channel.

mod page;

pub mod limits;

pub use limits::{ApiLimits, ApiMetrics};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::VipTable;
use crate::model::status::{LabelRejection, LiveStats};
use crate::model::wire::{DeltaJson, VipJson, table_to_json};

pub use crate::model::wire::{CHANGED_AT_HEADER, INDEX_HEADER};

/// The readiness latch behind `/ready`: starting → ready (once) → draining (for good). Its
/// only writer is the process's wiring, which marks it ready when the first table is in place
/// (built on a controller; applied, with DNS bound, on an agent) and draining on shutdown; a
/// process that drains is never ready again.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicU8>);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Readiness {
    /// Ready, unless already draining. Returns whether this call made it ready.
    pub fn mark_ready(&self) -> bool {
        self.0
            .compare_exchange(STARTING, READY, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Not ready from now on.
    pub fn mark_draining(&self) {
        self.0.store(DRAINING, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst) == READY
    }
}

/// Everything the handlers need.
#[derive(Clone)]
pub struct ApiState {
    pub table: watch::Receiver<Arc<VipTable>>,
    pub registry: Arc<Registry>,
    pub ready: Readiness,
    pub stats: Option<Arc<dyn LiveStats>>,
    /// The source's rejected labels (controller and `run`; an agent has none to show).
    pub label_errors: Option<watch::Receiver<Arc<Vec<LabelRejection>>>>,
    /// When set, `/v1/*` and `/metrics` require `Authorization: Bearer <token>`.
    pub token: Option<Arc<str>>,
    /// Longest a blocking query may wait.
    pub max_wait: Duration,
    /// Serialised bodies and recent tables, shared by every watcher of a controller.
    cache: Arc<Mutex<BodyCache>>,
    /// The connection cap and what happens past it.
    pub limits: ApiLimits,
    pub metrics: ApiMetrics,
}

/// A body computed once per key (version, or from→to), however many watchers wait for it.
type Shared = Arc<tokio::sync::OnceCell<Bytes>>;

/// Recent tables (so a watcher at version N can get just the change) and serialised bodies.
#[derive(Default)]
struct BodyCache {
    history: std::collections::VecDeque<Arc<VipTable>>,
    full: Option<(u64, Shared)>,
    deltas: std::collections::VecDeque<((u64, u64), Shared)>,
}

/// Tables kept for deltas; a watcher further behind gets the full table.
const HISTORY: usize = 64;
/// Delta bodies kept (watchers are normally at one of the last few versions).
const DELTAS: usize = 16;

impl BodyCache {
    fn remember(&mut self, t: &Arc<VipTable>) {
        match self.history.back() {
            Some(b) if b.version > t.version || Arc::ptr_eq(b, t) => {}
            Some(b) if b.version == t.version => {
                // The same version with new content: an agent that has now bound a VIP it
                // had failed to. Bodies made from the old content are stale.
                let v = t.version;
                self.history.pop_back();
                self.history.push_back(Arc::clone(t));
                self.deltas.retain(|((from, to), _)| *from != v && *to != v);
                if self.full.as_ref().is_some_and(|(fv, _)| *fv == v) {
                    self.full = None;
                }
            }
            _ => {
                self.history.push_back(Arc::clone(t));
                if self.history.len() > HISTORY {
                    self.history.pop_front();
                }
            }
        }
    }

    fn find(&self, version: u64) -> Option<Arc<VipTable>> {
        self.history.iter().find(|t| t.version == version).cloned()
    }

    fn full_cell(&mut self, version: u64) -> Shared {
        match &self.full {
            Some((v, cell)) if *v == version => Arc::clone(cell),
            _ => {
                let cell = Shared::default();
                self.full = Some((version, Arc::clone(&cell)));
                cell
            }
        }
    }

    fn delta_cell(&mut self, key: (u64, u64)) -> Shared {
        if let Some((_, c)) = self.deltas.iter().find(|(k, _)| *k == key) {
            return Arc::clone(c);
        }
        let cell = Shared::default();
        self.deltas.push_back((key, Arc::clone(&cell)));
        if self.deltas.len() > DELTAS {
            self.deltas.pop_front();
        }
        cell
    }
}

impl ApiState {
    pub fn new(
        table: watch::Receiver<Arc<VipTable>>,
        registry: Arc<Registry>,
        ready: Readiness,
    ) -> Self {
        ApiState {
            table,
            registry,
            ready,
            stats: None,
            label_errors: None,
            token: None,
            max_wait: Duration::from_secs(300),
            cache: Arc::default(),
            limits: ApiLimits::default(),
            metrics: ApiMetrics::default(),
        }
    }

    /// The connection cap, and series (registered by the caller) that show it at work.
    pub fn with_limits(mut self, limits: ApiLimits, metrics: ApiMetrics) -> Self {
        self.limits = limits;
        self.metrics = metrics;
        self
    }

    pub fn with_stats(mut self, stats: Arc<dyn LiveStats>) -> Self {
        self.stats = Some(stats);
        self
    }

    pub fn with_label_errors(mut self, rx: watch::Receiver<Arc<Vec<LabelRejection>>>) -> Self {
        self.label_errors = Some(rx);
        self
    }

    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.map(Arc::from);
        self
    }
}

/// The routes.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/v1/vips", get(vips))
        .route("/v1/vips/delta", get(vips_delta))
        .route("/v1/label-errors", get(label_errors));
    Router::new()
        .route("/", get(page::page))
        .merge(health(protected, &state))
        .with_state(state)
}

/// `/healthz`, `/ready` and `/metrics`, with `protected` also behind the token.
fn health(protected: Router<ApiState>, state: &ApiState) -> Router<ApiState> {
    let protected = protected
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .merge(protected)
}

/// The routes of a connection past the cap: health as usual, anything else a `503` with
/// `Retry-After` (an agent then moves on to its next controller).
pub fn overflow_router(state: ApiState) -> Router {
    let retry = state.limits.retry_after.as_secs().max(1).to_string();
    let busy = move || {
        let retry = retry.clone();
        async move {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, retry)],
                "at the connection limit; retry later or elsewhere\n",
            )
        }
    };
    Router::new()
        .merge(health(Router::new(), &state))
        .fallback(busy)
        .with_state(state)
}

/// Serve on an already-bound listener until `shutdown`, within `state`'s [`ApiLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (limits, metrics) = (state.limits, state.metrics.clone());
    let overflow = overflow_router(state.clone());
    limits::serve(listener, router(state), overflow, limits, metrics, shutdown).await
}

async fn auth(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        if !ok {
            return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
        }
    }
    next.run(req).await
}

/// The credentials of a `Bearer` authorization value (the scheme name is case-insensitive,
/// RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn ready(State(st): State<ApiState>) -> Response {
    if st.ready.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(st): State<ApiState>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &st.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /v1/label-errors`: every label the source rejects now, sorted by app, port and key.
/// 404 on an agent, whose labels are judged by its controller.
async fn label_errors(State(st): State<ApiState>) -> Response {
    let Some(rx) = &st.label_errors else {
        return (
            StatusCode::NOT_FOUND,
            "no label source here: ask the controller\n",
        )
            .into_response();
    };
    let list = rx.borrow().clone();
    match serde_json::to_vec(list.as_slice()) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct VipsQuery {
    index: Option<u64>,
    wait: Option<String>,
}

impl VipsQuery {
    /// A `wait=` that does not parse is the caller's error, not a silent 60 s.
    fn bad_wait(&self) -> Option<Response> {
        let w = self.wait.as_deref()?;
        parse_wait(w).is_none().then(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("invalid wait {w:?}: expected e.g. 30s, 500ms, 2m or seconds\n"),
            )
                .into_response()
        })
    }
}

/// Parse a Consul-style wait: `30s`, `500ms`, `2m`, or bare seconds.
pub fn parse_wait(s: &str) -> Option<Duration> {
    crate::model::wire::parse_duration(s).ok()
}

/// One blocking query counted in a gauge for as long as it is alive.
struct Parked(prometheus_client::metrics::gauge::Gauge);

impl Parked {
    fn new(g: &prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Parked(g.clone())
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The table to answer with: at once, or (with `index`) once the version differs from it, or
/// the content at that version changes (an agent binding a VIP it had failed to), or the wait
/// ends. An index ahead of ours means we restarted: answer at once so the watcher resyncs.
async fn wait_table(st: &ApiState, q: &VipsQuery) -> Arc<VipTable> {
    let mut rx = st.table.clone();
    let mut table = rx.borrow_and_update().clone();
    if let Some(index) = q.index {
        let wait = q
            .wait
            .as_deref()
            .and_then(parse_wait)
            .unwrap_or(Duration::from_secs(60))
            .min(st.max_wait);
        if table.version == index {
            // Counted while parked, also when the client goes away mid-wait.
            let _parked = Parked::new(&st.metrics.watchers);
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Ok(())) = tokio::time::timeout_at(deadline, rx.changed()).await {
                let next = rx.borrow_and_update().clone();
                let moved = next.version > index || (next.version == index && *next != *table);
                table = next;
                if moved {
                    break;
                }
            }
        }
    }
    if let Ok(mut c) = st.cache.lock() {
        c.remember(&table);
    }
    table
}

async fn vips(
    State(st): State<ApiState>,
    Query(q): Query<VipsQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = q.bad_wait() {
        return r;
    }
    let table = wait_table(&st, &q).await;
    // A controller's body is a function of the version. An agent's also carries live
    // counters (and, at one version, more VIPs once a failed bind succeeds): its tag is the
    // version and a hash of the body.
    let (etag, body) = match &st.stats {
        None => (format!("\"{}\"", table.version), None),
        Some(stats) => {
            let body = agent_body(&table, stats.as_ref());
            let tag = format!(
                "\"{}-{:016x}\"",
                table.version,
                crate::model::stable_hash(&body)
            );
            (tag, Some(Bytes::from(body)))
        }
    };
    if q.index.is_none()
        && headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return with_headers(StatusCode::NOT_MODIFIED, Body::empty(), &table, &etag);
    }
    let body = match body {
        Some(b) => b,
        None => {
            let cell = match st.cache.lock() {
                Ok(mut c) => c.full_cell(table.version),
                Err(_) => Shared::default(),
            };
            let t = Arc::clone(&table);
            shared_body(cell, move || serde_json::to_vec(&table_to_json(&t))).await
        }
    };
    with_headers(StatusCode::OK, Body::from(body), &table, &etag)
}

/// `GET /v1/vips/delta?index=N&wait=…`: like a blocking `/v1/vips`, but the body is a
/// [`DeltaJson`] from version N (the whole table when N is unknown here), so a one-backend
/// change costs every watcher a few hundred bytes instead of the whole table.
async fn vips_delta(State(st): State<ApiState>, Query(q): Query<VipsQuery>) -> Response {
    if let Some(r) = q.bad_wait() {
        return r;
    }
    let table = wait_table(&st, &q).await;
    let from = q.index.unwrap_or(0);
    let base = match st.cache.lock() {
        Ok(c) if from != 0 => c.find(from),
        _ => None,
    };
    let cell = match st.cache.lock() {
        Ok(mut c) => c.delta_cell((base.as_ref().map_or(0, |b| b.version), table.version)),
        Err(_) => Shared::default(),
    };
    let t = Arc::clone(&table);
    let body = shared_body(cell, move || {
        serde_json::to_vec(&DeltaJson::between(base.as_deref(), &t))
    })
    .await;
    let etag = format!("\"{}\"", table.version);
    with_headers(StatusCode::OK, Body::from(body), &table, &etag)
}

/// Serialise once per cell, off the async threads; every other waiter reuses the bytes.
async fn shared_body<F>(cell: Shared, make: F) -> Bytes
where
    F: FnOnce() -> serde_json::Result<Vec<u8>> + Send + 'static,
{
    cell.get_or_init(|| async move {
        tokio::task::spawn_blocking(make)
            .await
            .ok()
            .and_then(Result::ok)
            .map(Bytes::from)
            .unwrap_or_default()
    })
    .await
    .clone()
}

fn agent_body(table: &VipTable, stats: &dyn LiveStats) -> Vec<u8> {
    let vips: Vec<VipJson> = table
        .sorted_for_api()
        .into_iter()
        .map(|v| {
            let mut j = VipJson::from_vip(v);
            if let Some((plane, reason)) = stats.data_plane(&v.key) {
                j.data_plane = Some(plane);
                j.data_plane_reason = reason;
            }
            for b in &mut j.backend {
                let c = stats
                    .backend(&v.key, SocketAddr::new(b.ip, b.port))
                    .unwrap_or_default();
                b.connections = Some(c.connections);
                b.bytes = Some(c.bytes);
                b.ejected = Some(c.ejected);
                b.kernel_connections = c.kernel_connections;
                b.connects = Some(c.connects);
                b.connect_failures = Some(c.connect_failures);
                b.connect_p50_seconds = c.connect_p50;
                b.connect_p99_seconds = c.connect_p99;
            }
            let c = stats.vip(&v.key).unwrap_or_default();
            j.connections_ok = Some(c.ok);
            j.connections_failed = Some(c.failed);
            j
        })
        .collect();
    serde_json::to_vec(&vips).unwrap_or_default()
}

fn with_headers(status: StatusCode, body: Body, table: &VipTable, etag: &str) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(INDEX_HEADER, HeaderValue::from(table.version));
    h.insert(CHANGED_AT_HEADER, HeaderValue::from(table.changed_at_ms));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn readiness_latches_once_and_draining_is_final() {
        let r = super::Readiness::default();
        assert!(!r.is_ready());
        assert!(r.mark_ready());
        assert!(!r.mark_ready(), "only the first call makes it ready");
        assert!(r.is_ready());
        r.mark_draining();
        assert!(!r.is_ready());
        assert!(!r.mark_ready(), "a draining process is never ready again");
        assert!(!r.is_ready());
    }

    use super::*;

    #[test]
    fn waits() {
        for (s, want) in [
            ("30s", Some(30_000)),
            ("500ms", Some(500)),
            ("2m", Some(120_000)),
            ("7", Some(7_000)),
            ("x", None),
            ("", None),
        ] {
            assert_eq!(parse_wait(s).map(|d| d.as_millis() as u64), want, "{s}");
        }
    }

    #[tokio::test]
    async fn an_invalid_wait_is_a_400_not_a_silent_default() {
        let (_tx, rx) = watch::channel(Arc::new(VipTable::default()));
        let st = ApiState::new(rx, Arc::new(Registry::default()), Readiness::default());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(l, st, stop.clone()));
        let http = crate::tls::client_builder().build().unwrap();
        for path in ["/v1/vips", "/v1/vips/delta"] {
            for (wait, want) in [("forever", 400), ("-1s", 400), ("", 400), ("1ms", 200)] {
                let url = format!("http://{addr}{path}?index=0&wait={wait}");
                let r = tokio::time::timeout(Duration::from_secs(5), http.get(&url).send())
                    .await
                    .expect("answered at once")
                    .unwrap();
                assert_eq!(r.status().as_u16(), want, "{url}");
            }
        }
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// Serve `state` on a loopback port; returns the base URL.
    async fn serve_on_loopback(state: ApiState) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, state, CancellationToken::new()));
        format!("http://{addr}")
    }

    fn state() -> ApiState {
        let (_tx, rx) = watch::channel(Arc::new(VipTable::default()));
        ApiState::new(rx, Arc::new(Registry::default()), Readiness::default())
    }

    fn rejection(app: &str, since_ms: u64) -> LabelRejection {
        LabelRejection {
            app: app.into(),
            port_index: 1,
            key: "VIP_0".into(),
            value: "x".into(),
            reason: "missing_port".into(),
            error: "no ':'".into(),
            since_ms,
        }
    }

    #[tokio::test]
    async fn label_errors_follow_the_source_and_need_the_token() {
        crate::tls::init();
        let http = reqwest::Client::new();
        // An agent has no label source.
        let agent = serve_on_loopback(state()).await;
        let r = http
            .get(format!("{agent}/v1/label-errors"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);

        let (tx, rx) = watch::channel(Arc::new(vec![rejection("/a", 5)]));
        let ctl =
            serve_on_loopback(state().with_label_errors(rx).with_token(Some("t".into()))).await;
        let get = |token: Option<&str>| {
            let mut rb = http.get(format!("{ctl}/v1/label-errors"));
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            rb.send()
        };
        assert_eq!(get(None).await.unwrap().status(), 401);
        let body: Vec<LabelRejection> = get(Some("t")).await.unwrap().json().await.unwrap();
        assert_eq!(body, vec![rejection("/a", 5)]);
        tx.send_replace(Arc::new(vec![rejection("/a", 5), rejection("/b", 7)]));
        let body: Vec<LabelRejection> = get(Some("t")).await.unwrap().json().await.unwrap();
        assert_eq!(body.len(), 2);

        // The page is open, with its policy; the data is not.
        let page = http.get(format!("{ctl}/")).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(page.text().await.unwrap().contains("/v1/label-errors"));
        let r = http.get(format!("{ctl}/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
