//! A controller in the test's own process: a source (Marathon, Mesos or the apps file, started
//! by the test against a fake) publishing into a table that the real API serves on a port-0
//! listener. Stops when dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use l4lb::api::{self, ApiState, Readiness};
use l4lb::model::VipTable;
use l4lb::source::http::{Auth, SourceClient};
use l4lb::source::metrics::SourceMetrics;
use l4lb::source::state::BuildConfig;
use l4lb::source::{Publisher, TableRx, table_channel};
use l4lb::source::{marathon, mesos};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub struct Ctl {
    /// The API's address.
    pub api: SocketAddr,
    /// The source's table.
    pub rx: TableRx,
    shutdown: CancellationToken,
}

impl Drop for Ctl {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Back-offs short enough for a test: 20 ms, growing to 200 ms.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(200));

fn urls(masters: &[String]) -> Vec<reqwest::Url> {
    masters.iter().map(|u| u.parse().unwrap()).collect()
}

impl Ctl {
    /// Following the Marathon `masters` (no auth), with a full re-read every `resync` and
    /// `timeout` per request.
    pub async fn marathon(
        masters: &[String],
        build: BuildConfig,
        resync: Duration,
        timeout: Duration,
    ) -> Ctl {
        l4lb::tls::init();
        let client = marathon::client::Client::new(urls(masters), Auth::None, timeout).unwrap();
        let cfg = marathon::sync::SyncConfig {
            resync_interval: resync,
            backoff_min: BACKOFF.0,
            backoff_max: BACKOFF.1,
            ..Default::default()
        };
        Ctl::start(build, |p, stop| marathon::sync::run(client, p, cfg, stop)).await
    }

    /// Following the Mesos `masters` with `auth`.
    pub async fn mesos(masters: &[String], auth: Auth) -> Ctl {
        l4lb::tls::init();
        let timeout = Duration::from_secs(5);
        let client = mesos::client::Client::new(urls(masters), auth, timeout).unwrap();
        let cfg = mesos::sync::SyncConfig {
            backoff_min: BACKOFF.0,
            backoff_max: BACKOFF.1,
            ..Default::default()
        };
        Ctl::start(BuildConfig::default(), |p, stop| {
            mesos::sync::run(client, p, cfg, stop)
        })
        .await
    }

    /// Spawn the source `run` returns (given its publisher and the shutdown token), building
    /// with `build`, and the API over its table.
    pub async fn start<Fut>(
        build: BuildConfig,
        run: impl FnOnce(Publisher, CancellationToken) -> Fut,
    ) -> Ctl
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        l4lb::tls::init();
        let mut reg = Registry::with_prefix("l4lb");
        let (tx, rx) = table_channel();
        let publisher = Publisher::new(build, tx, SourceMetrics::new(&mut reg));
        let shutdown = CancellationToken::new();
        tokio::spawn(run(publisher, shutdown.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = listener.local_addr().unwrap();
        let state = ApiState::new(rx.clone(), Arc::new(reg), Readiness::default());
        tokio::spawn(api::serve(listener, state, shutdown.clone()));
        Ctl { api, rx, shutdown }
    }

    /// The first published table (version > 0) that satisfies `f`, within 10 s.
    pub async fn wait(&mut self, f: impl Fn(&VipTable) -> bool) -> Arc<VipTable> {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.rx.wait_for(|t| t.version > 0 && f(t)),
        )
        .await
        .expect("no such table within 10 s")
        .unwrap()
        .clone()
    }

    /// The version of the first table after version `above`.
    pub async fn wait_version(&mut self, above: u64) -> u64 {
        self.wait(|t| t.version > above).await.version
    }

    /// Assert that `/metrics` of the API has each of `lines` (a sample, or its start).
    pub async fn assert_metrics(&self, lines: &[&str]) {
        let m = reqwest::get(format!("http://{}/metrics", self.api))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for l in lines {
            assert!(m.contains(l), "no {l} in\n{m}");
        }
    }
}
