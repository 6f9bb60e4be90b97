//! The one place that wires components together: sources, the agent's node, the API and
//! the client subcommands. Each `l4lb` subcommand is a function here that takes its
//! validated configuration, starts its long-lived tasks in a [`Tasks`] set, waits for a
//! signal (or for a task to fail), drains in order and reports every task's error. The node
//! itself is assembled by [`NodeBuilder`]; `check` and `vips` live in [`crate::cli`].

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use futures::future::{BoxFuture, FutureExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::Instrument;

use crate::agent::netif::Netif;
use crate::api::limits::ApiRole;
use crate::cli;
use crate::config::{
    AgentConfig, ApiConfig, Config, ControllerConfig, Mode, NodeConfig, RunConfig, SourceConfig,
};
pub use crate::exit::AppError;
use crate::labels::ReasonLabel;
use crate::node::{self, NodeBuilder, Takeover};
use crate::source::http::SourceClient;
use crate::source::marathon::{apps, client, sync};
use crate::source::metrics::SourceMetrics;
use crate::source::state::BuildConfig;
use crate::source::{self, LabelErrorsRx, Publisher, TableRx};
use crate::tasks::Tasks;

pub async fn main(cfg: Config) -> Result<ExitCode, AppError> {
    match cfg.mode {
        Mode::Controller(c) => controller(c).await.map(|()| ExitCode::SUCCESS),
        Mode::Agent(a) => agent(a).await.map(|()| ExitCode::SUCCESS),
        Mode::Run(r) => run(r).await.map(|()| ExitCode::SUCCESS),
        Mode::Check(c) => cli::check(c),
        Mode::Vips(v) => cli::vips(v).await,
    }
}

/// A registry whose metrics all carry the `l4lb_` prefix.
fn registry() -> Registry {
    Registry::with_prefix("l4lb")
}

/// A task set that stops on SIGTERM, SIGINT or SIGHUP.
fn tasks() -> Result<Tasks, AppError> {
    let mut tasks = Tasks::new();
    tasks.stop_on_signals().context("signal handlers")?;
    Ok(tasks)
}

/// Start the configured source (Marathon, Mesos or apps file) publishing into a new table channel.
fn start_source(
    tasks: &mut Tasks,
    source: SourceConfig,
    build: BuildConfig,
    metrics: SourceMetrics,
) -> Result<(TableRx, LabelErrorsRx), AppError> {
    let (tx, rx) = source::table_channel();
    let publisher = Publisher::new(build, tx, metrics);
    let label_errors = publisher.label_errors();
    let stop = tasks.shutdown();
    // What runs, under which task name and log span.
    let (name, span, run): (&'static str, tracing::Span, BoxFuture<'static, ()>) = match source {
        SourceConfig::File { path, poll } => {
            let span = tracing::info_span!("source", file = %path.display());
            span.in_scope(|| tracing::info!("reading apps from file"));
            let run = source::file::run(path, poll, publisher, apps::contributions, stop);
            ("apps file source", span, run.boxed())
        }
        SourceConfig::Marathon {
            masters,
            auth,
            timeout,
            resync,
            max_answer,
            ca,
        } => {
            let shown = hosts(&masters);
            let span = tracing::info_span!("source", marathon = ?shown);
            span.in_scope(|| tracing::info!(auth = ?auth, "following Marathon"));
            let c = client::Client::new_with_ca(masters, auth, timeout, ca.as_ref())
                .context("HTTP client")?
                .with_max_body(max_answer);
            let cfg = sync::SyncConfig {
                resync_interval: resync,
                ..sync::SyncConfig::default()
            };
            (
                "Marathon source",
                span,
                sync::run(c, publisher, cfg, stop).boxed(),
            )
        }
        SourceConfig::Mesos {
            masters,
            auth,
            timeout,
            max_answer,
            ca,
        } => {
            use crate::source::mesos;
            let shown = hosts(&masters);
            let span = tracing::info_span!("source", mesos = ?shown);
            span.in_scope(|| tracing::info!(auth = ?auth, "following Mesos"));
            let c = mesos::client::Client::new_with_ca(masters, auth, timeout, ca.as_ref())
                .context("HTTP client")?
                .with_max_body(max_answer);
            let cfg = mesos::sync::SyncConfig {
                max_record: max_answer,
                ..mesos::sync::SyncConfig::default()
            };
            let run = mesos::sync::run(c, publisher, cfg, stop);
            ("Mesos source", span, run.boxed())
        }
    };
    tasks.spawn(
        name,
        async move {
            run.await;
            Ok(())
        }
        .instrument(span),
    );
    Ok((rx, label_errors))
}

/// The hosts of `urls`, for logs (never their credentials or paths).
fn hosts(urls: &[reqwest::Url]) -> Vec<String> {
    urls.iter()
        .map(|u| u.host_str().unwrap_or("?").to_string())
        .collect()
}

async fn controller(cfg: ControllerConfig) -> Result<(), AppError> {
    let mut tasks = tasks()?;
    let mut reg = registry();
    let metrics = SourceMetrics::new(&mut reg);
    let (rx, rejected) = start_source(&mut tasks, cfg.source, cfg.build, metrics)?;
    let ready = crate::api::Readiness::default();
    let state = node::api_state(rx.clone(), reg, &ready, &cfg.api, ApiRole::Controller)
        .with_label_errors(rejected);
    node::start_api(&mut tasks, &cfg.api, None, state).await?;
    node::ready_on_first(&mut tasks, rx, ready.clone(), "built");
    tasks.until_shutdown().await;
    ready.mark_draining();
    Ok(tasks.drain(Duration::from_secs(2)).await?)
}

/// What every node starts from: its tasks, registry, the sockets it takes over and its VIP
/// link; [`NodeStart::run`] builds the node around a source's tables.
struct NodeStart {
    tasks: Tasks,
    reg: Registry,
    label_errors: Family<ReasonLabel, Counter>,
    takeover: Takeover,
    netif: Netif,
}

impl NodeStart {
    /// The privileged step first: without CAP_NET_ADMIN, fail before anything else starts.
    /// Also the metrics for the node's source.
    async fn new(cfg: &NodeConfig) -> Result<(Self, SourceMetrics), AppError> {
        let tasks = tasks()?;
        let mut reg = registry();
        let metrics = SourceMetrics::new(&mut reg);
        let takeover = Takeover::start(cfg).await?;
        let netif = node::open_netif(cfg, &takeover).await?;
        let label_errors = metrics.label_errors.clone();
        let start = NodeStart {
            tasks,
            reg,
            label_errors,
            takeover,
            netif,
        };
        Ok((start, metrics))
    }

    /// Serve `tables` as a node until shutdown; `rejected`: the labels a source in this
    /// process rejected.
    async fn run(
        self,
        cfg: &NodeConfig,
        api: &ApiConfig,
        tables: TableRx,
        rejected: Option<LabelErrorsRx>,
    ) -> Result<(), AppError> {
        let mut b = NodeBuilder::new(cfg, api, self.reg, self.label_errors);
        if let Some(rx) = rejected {
            b = b.rejected_labels(rx);
        }
        b.run(self.tasks, self.netif, tables, self.takeover).await
    }
}

async fn agent(cfg: AgentConfig) -> Result<(), AppError> {
    let (mut node, metrics) = NodeStart::new(&cfg.node).await?;
    let (tx, rx) = source::table_channel();
    let stop = node.tasks.shutdown();
    let span = tracing::info_span!("source", controllers = cfg.watch.controllers.len());
    node.tasks.spawn(
        "controller watch",
        async move {
            source::controller_client::run(cfg.watch, tx, metrics, stop).await;
            Ok(())
        }
        .instrument(span),
    );
    node.run(&cfg.node, &cfg.api, rx, None).await
}

async fn run(cfg: RunConfig) -> Result<(), AppError> {
    let (mut node, metrics) = NodeStart::new(&cfg.node).await?;
    let (rx, rejected) = start_source(&mut node.tasks, cfg.source, cfg.build, metrics)?;
    node.run(&cfg.node, &cfg.api, rx, Some(rejected)).await
}
