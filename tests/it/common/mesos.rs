//! A fake Mesos master for tests: the operator API v1 `POST /api/v1` with `SUBSCRIBE` (a
//! chunked RecordIO stream: the script's events one by one, each frame cut into several
//! chunks, then whatever the test emits) and `GET_STATE`, serving the real payloads of
//! `tests/fixtures/mesos/`. A master can stand in for a non-leader (307 to the leader), demand
//! a token, refuse `SUBSCRIBE`, or drop its streams in the middle of a frame.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::fake::{self, Events, Fake, Gate, Sink, next_event};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mesos");

/// The lines of a fixture (one JSON document a line).
pub fn fixture_lines(file: &str) -> Vec<String> {
    fixture(file)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// A fixture's text.
pub fn fixture(file: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{file}")).unwrap()
}

/// RecordIO framing, as a master writes it.
pub fn frame(record: &str) -> Vec<u8> {
    let mut out = format!("{}\n", record.len()).into_bytes();
    out.extend_from_slice(record.as_bytes());
    out
}

#[derive(Debug, Clone)]
enum Msg {
    Event(String),
    /// Send half of a frame, then break the connection.
    Cut,
}

#[derive(Default)]
struct Inner {
    /// Sent on every subscription, one event at a time (the first is the `SUBSCRIBED`).
    script: Vec<String>,
    /// The `GET_STATE` answer.
    state: Option<String>,
    /// Not the leader: redirect every call here.
    leader: Option<SocketAddr>,
    /// `Authorization` value required.
    auth: Option<String>,
    refuse_subscribe: bool,
}

/// A running fake Mesos master (stops when the last clone goes).
pub type FakeMesos = Fake<Mesos>;

/// The fake's state: what the test changes and the counters it reads.
#[derive(Clone, Default)]
pub struct Mesos {
    inner: Arc<Mutex<Inner>>,
    events: Events<Msg>,
    pub subscribes: Arc<AtomicU64>,
    pub get_states: Arc<AtomicU64>,
    pub redirects: Arc<AtomicU64>,
    pub unauthorized: Arc<AtomicU64>,
    /// What every call must carry (nothing unless the test says; see also `require_auth`).
    pub gate: Gate,
    stop: CancellationToken,
}

impl FakeMesos {
    pub async fn start() -> Self {
        Self::start_with(fake::listener().await, Router::new(), None)
    }

    /// On `listener`, over TLS when `tls` is given, with the `extra` routes (a fake ACS's
    /// login) beside the API and outside its [`Gate`].
    pub fn start_with(
        listener: tokio::net::TcpListener,
        extra: Router,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let state = Mesos::default();
        let api = Router::new()
            .route("/api/v1", post(api))
            .with_state(state.clone());
        let (gate, stop) = (state.gate.clone(), state.stop.clone());
        Fake::serve_gated(listener, (api, &gate, extra), state, stop, tls)
    }
}

impl Mesos {
    /// Events every subscription starts with.
    pub fn set_script(&self, lines: Vec<String>) {
        self.inner.lock().unwrap().script = lines;
    }

    pub fn set_state(&self, body: String) {
        self.inner.lock().unwrap().state = Some(body);
    }

    /// Answer every call with a 307 to `leader`, as a master that does not lead does.
    pub fn redirect_to(&self, leader: SocketAddr) {
        self.inner.lock().unwrap().leader = Some(leader);
    }

    /// Lead from now on (stop redirecting).
    pub fn lead(&self) {
        self.inner.lock().unwrap().leader = None;
    }

    pub fn require_auth(&self, value: &str) {
        self.inner.lock().unwrap().auth = Some(value.to_string());
    }

    pub fn refuse_subscribe(&self, refuse: bool) {
        self.inner.lock().unwrap().refuse_subscribe = refuse;
    }

    /// Send one event on every open stream.
    pub fn emit(&self, line: &str) {
        self.events.send(Msg::Event(line.to_string()));
    }

    /// Break every open stream in the middle of a frame.
    pub fn cut(&self) {
        self.events.send(Msg::Cut);
    }

    pub fn open_streams(&self) -> usize {
        self.events.receivers()
    }
}

/// Send `bytes` in three chunks, pausing between them so they travel separately.
async fn send_chunked(tx: &Sink, bytes: Vec<u8>) -> bool {
    let n = bytes.len();
    let cuts = [0, n / 3, 2 * n / 3, n];
    for w in cuts.windows(2) {
        if w[0] == w[1] {
            continue;
        }
        if tx
            .send(Ok(Bytes::copy_from_slice(&bytes[w[0]..w[1]])))
            .await
            .is_err()
        {
            return false;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    true
}

async fn api(State(fake): State<Mesos>, headers: HeaderMap, body: Bytes) -> Response {
    let call: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let (script, state, leader, auth, refuse) = {
        let i = fake.inner.lock().unwrap();
        (
            i.script.clone(),
            i.state.clone(),
            i.leader,
            i.auth.clone(),
            i.refuse_subscribe,
        )
    };
    if let Some(leader) = leader {
        fake.redirects.fetch_add(1, Ordering::SeqCst);
        // A real master names the leader without a scheme.
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, format!("//{leader}/api/v1"))],
        )
            .into_response();
    }
    if let Some(want) = auth {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if got != Some(want.as_str()) {
            fake.unauthorized.fetch_add(1, Ordering::SeqCst);
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    match call["type"].as_str() {
        Some("GET_STATE") => {
            fake.get_states.fetch_add(1, Ordering::SeqCst);
            match state {
                Some(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
                None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
            }
        }
        Some("SUBSCRIBE") if refuse => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Some("SUBSCRIBE") => {
            fake.subscribes.fetch_add(1, Ordering::SeqCst);
            let mut events = fake.events.subscribe();
            let stop = fake.stop.clone();
            let body = fake::stream(move |tx| async move {
                for line in script {
                    if !send_chunked(&tx, frame(&line)).await {
                        return;
                    }
                }
                while let Some(msg) = next_event(&mut events, &stop).await {
                    match msg {
                        Msg::Event(line) => {
                            if !send_chunked(&tx, frame(&line)).await {
                                return;
                            }
                        }
                        Msg::Cut => {
                            let f = frame(r#"{"type":"HEARTBEAT"}"#);
                            let _ = tx.send(Ok(Bytes::copy_from_slice(&f[..f.len() / 2]))).await;
                            let _ = tx
                                .send(Err(std::io::Error::other("connection dropped")))
                                .await;
                            return;
                        }
                    }
                }
            });
            ([(header::CONTENT_TYPE, "application/recordio")], body).into_response()
        }
        _ => StatusCode::BAD_REQUEST.into_response(),
    }
}
