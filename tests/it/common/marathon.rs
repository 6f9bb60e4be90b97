//! A fake Marathon for tests: `/v2/apps?embed=apps.tasks`, `/v2/apps/{id}?embed=app.tasks`
//! and the SSE `/v2/events`, serving payloads in the shapes of the real fixtures in
//! `tests/fixtures/marathon/`. The test mutates apps, emits events and injects faults.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::fake::{self, Events, Fake, Gate, next_event};

/// How the fake misbehaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with JSON cut in half.
    Truncated,
    /// This HTTP status.
    Status(u16),
    /// Never answer (the client's timeout fires).
    Hang,
}

#[derive(Default)]
struct Inner {
    apps: BTreeMap<String, Value>,
    /// Pod statuses (`/v2/pods/::status` items) by id.
    pods: BTreeMap<String, Value>,
    fault: Fault,
    /// Single reads (`/v2/apps/{id}`, `/v2/pods/{id}::status`) answer 404 even for a live
    /// app, as Marathon does for a moment during a deployment.
    single_404: bool,
}

/// A running fake Marathon (stops when the last clone goes).
pub type FakeMarathon = Fake<Marathon>;

/// The fake's state: what the test changes and the counters it reads.
#[derive(Clone, Default)]
pub struct Marathon {
    inner: Arc<Mutex<Inner>>,
    events: Events<String>,
    pub apps_requests: Arc<AtomicU64>,
    pub app_requests: Arc<AtomicU64>,
    pub event_streams: Arc<AtomicU64>,
    /// `/v2/apps` reads since the last event stream attached (the reconnect snapshot).
    pub apps_since_stream: Arc<AtomicU64>,
    /// What every request must carry (nothing unless the test says).
    pub gate: Gate,
    stop: CancellationToken,
}

impl FakeMarathon {
    pub async fn start() -> Self {
        Self::start_on(fake::listener().await).await
    }

    pub async fn start_on(listener: tokio::net::TcpListener) -> Self {
        Self::start_with(listener, Router::new(), None)
    }

    /// On `listener`, over TLS when `tls` is given, with the `extra` routes (a fake ACS's
    /// login) beside the API and outside its [`Gate`].
    pub fn start_with(
        listener: tokio::net::TcpListener,
        extra: Router,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let state = Marathon::default();
        let api = Router::new()
            .route("/v2/apps", get(apps))
            .route("/v2/apps/{*id}", get(app))
            .route("/v2/events", get(events_stream))
            .route("/v2/pods/{*rest}", get(pods))
            .with_state(state.clone());
        let (gate, stop) = (state.gate.clone(), state.stop.clone());
        Fake::serve_gated(listener, (api, &gate, extra), state, stop, tls)
    }
}

impl Marathon {
    pub fn set_fault(&self, f: Fault) {
        self.inner.lock().unwrap().fault = f;
    }

    /// Make single app and pod reads answer 404 whether or not the app exists.
    pub fn set_single_404(&self, on: bool) {
        self.inner.lock().unwrap().single_404 = on;
    }

    pub fn put_app(&self, app: Value) {
        let id = app["id"].as_str().unwrap().to_string();
        self.inner.lock().unwrap().apps.insert(id, app);
    }

    pub fn remove_app(&self, id: &str) {
        self.inner.lock().unwrap().apps.remove(id);
    }

    /// Add or replace a pod (a `PodStatus`, as `/v2/pods/{id}::status` answers).
    pub fn put_pod(&self, pod: Value) {
        let id = pod["id"].as_str().unwrap().to_string();
        self.inner.lock().unwrap().pods.insert(id, pod);
    }

    pub fn remove_pod(&self, id: &str) {
        self.inner.lock().unwrap().pods.remove(id);
    }

    pub fn app(&self, id: &str) -> Option<Value> {
        self.inner.lock().unwrap().apps.get(id).cloned()
    }

    /// Send one SSE event with `data` as its JSON body.
    pub fn emit(&self, event_type: &str, data: Value) {
        let frame = format!("event: {event_type}\ndata: {data}\n\n");
        self.events.send(frame);
    }

    /// A `status_update_event` in the shape of the fixture stream.
    pub fn emit_status(&self, app_id: &str, task_id: &str, status: &str) {
        self.emit(
            "status_update_event",
            json!({
                "slaveId": "20150707-153709-201330860-5050-12052-S0",
                "taskId": task_id, "taskStatus": status, "message": "",
                "appId": app_id, "host": "198.18.0.1", "ports": [31000],
                "version": "2015-09-11T22:11:03.156Z",
                "eventType": "status_update_event", "timestamp": "2015-09-30T12:47:11.286Z"
            }),
        );
    }

    fn fault(&self) -> Fault {
        self.inner.lock().unwrap().fault
    }
}

/// An app with host networking and one labelled port per entry in `vip_labels`, in the shape
/// of Marathon 1.5's `/v2/apps?embed=apps.tasks`.
pub fn host_app(id: &str, vip_labels: &[&str], protocol: &str) -> Value {
    let ports: Vec<Value> = vip_labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({"port": 10000 + i, "protocol": protocol, "name": format!("p{i}"),
                   "labels": {"VIP_0": l}})
        })
        .collect();
    json!({
        "id": id, "cmd": "sleep 1000", "instances": 0, "cpus": 0.1, "mem": 32, "disk": 0,
        "executor": "", "labels": {}, "portDefinitions": ports, "requirePorts": false,
        "healthChecks": [], "backoffFactor": 1.15, "backoffSeconds": 1,
        "version": "2017-07-19T17:34:41.967Z",
        "versionInfo": {"lastScalingAt": "2017-07-19T17:34:41.967Z", "lastConfigChangeAt": "2017-07-19T17:34:41.967Z"},
        "tasksStaged": 0, "tasksRunning": 0, "tasksHealthy": 0, "tasksUnhealthy": 0,
        "deployments": [], "tasks": []
    })
}

/// A task in the shape of the fixtures (`tasks[]` of Marathon 1.5).
pub fn task(app_id: &str, n: usize, host: &str, ports: &[u16], state: &str) -> Value {
    let id = format!(
        "{}.{n:08x}-6ca8-11e7-beb2-0e2beceebfcc",
        app_id.trim_start_matches('/').replace('/', "_")
    );
    json!({
        "ipAddresses": [{"ipAddress": "172.17.0.2", "protocol": "IPv4"}],
        "stagedAt": "2017-07-19T17:34:43.039Z", "startedAt": "2017-07-19T17:35:15.654Z",
        "state": state, "ports": ports, "version": "2017-07-19T17:34:41.967Z",
        "id": id, "appId": app_id, "slaveId": "db7b40e2-791c-445f-b373-183e2a648a86-S1",
        "host": host
    })
}

/// Append a task to an app value and bump `tasksRunning`.
pub fn add_task(app: &mut Value, task: Value) {
    app["tasks"].as_array_mut().unwrap().push(task);
    app["tasksRunning"] = json!(app["tasks"].as_array().unwrap().len());
}

async fn faulty(m: &Marathon, good: Value) -> Response {
    match m.fault() {
        Fault::None => (
            StatusCode::OK,
            [("content-type", "application/json")],
            good.to_string(),
        )
            .into_response(),
        Fault::Garbage => {
            (StatusCode::OK, "<html><body>502 Bad Gateway</body></html>").into_response()
        }
        Fault::Truncated => {
            let s = good.to_string();
            (StatusCode::OK, s[..s.len() / 2].to_string()).into_response()
        }
        Fault::Status(code) => StatusCode::from_u16(code)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

async fn apps(State(m): State<Marathon>) -> Response {
    m.apps_requests.fetch_add(1, Ordering::SeqCst);
    m.apps_since_stream.fetch_add(1, Ordering::SeqCst);
    let apps: Vec<Value> = m.inner.lock().unwrap().apps.values().cloned().collect();
    faulty(&m, json!({ "apps": apps })).await
}

async fn app(State(m): State<Marathon>, Path(id): Path<String>) -> Response {
    m.app_requests.fetch_add(1, Ordering::SeqCst);
    let id = format!("/{}", id.trim_start_matches('/'));
    let hidden = m.inner.lock().unwrap().single_404;
    match m.app(&id).filter(|_| !hidden) {
        Some(a) => faulty(&m, json!({ "app": a })).await,
        None => (
            StatusCode::NOT_FOUND,
            json!({"message": format!("App '{id}' does not exist")}).to_string(),
        )
            .into_response(),
    }
}

/// `/v2/pods/::status` (every pod) and `/v2/pods/{id}::status` (one).
async fn pods(State(m): State<Marathon>, Path(rest): Path<String>) -> Response {
    let Some(id) = rest.trim_start_matches('/').strip_suffix("::status") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if id.is_empty() {
        let pods: Vec<Value> = m.inner.lock().unwrap().pods.values().cloned().collect();
        return faulty(&m, json!(pods)).await;
    }
    let pod = {
        let inner = m.inner.lock().unwrap();
        let pod = inner.pods.get(&format!("/{id}")).cloned();
        pod.filter(|_| !inner.single_404)
    };
    match pod {
        Some(p) => faulty(&m, p).await,
        None => (
            StatusCode::NOT_FOUND,
            json!({"message": format!("Pod '/{id}' does not exist")}).to_string(),
        )
            .into_response(),
    }
}

async fn events_stream(State(m): State<Marathon>) -> Response {
    m.apps_since_stream.store(0, Ordering::SeqCst);
    m.event_streams.fetch_add(1, Ordering::SeqCst);
    let mut rx = m.events.subscribe();
    let attached = "event: event_stream_attached\ndata: {\"remoteAddress\":\"127.0.0.1\",\"eventType\":\"event_stream_attached\",\"timestamp\":\"2015-09-30T12:44:30.061Z\"}\n\n";
    let body = fake::stream(move |tx| async move {
        let mut frame = Some(attached.to_string());
        while let Some(f) = frame {
            if tx.send(Ok(Bytes::from(f))).await.is_err() {
                return;
            }
            frame = next_event(&mut rx, &m.stop).await;
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}
