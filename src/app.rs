//! The one place that wires components together: sources, the agent's data plane, DNS and
//! the API. Each `l4lb` subcommand is a function here that takes its validated
//! configuration, starts its long-lived tasks in a [`Tasks`] set, waits for a signal (or for
//! a task to fail), drains in order and reports every task's error.

use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agent::bpf::{KernelMetrics, KernelStats};
use crate::agent::dns::{DnsCatalog, DnsMetrics, resolv};
use crate::agent::forward::{ForwardMetrics, ForwardStats, Forwarder};
use crate::agent::netif::{InterfaceKind, Netif, NetifError};
use crate::agent::saved::SavedTable;
use crate::agent::{Agent, AgentMetrics};
use crate::api::limits::ApiRole;
use crate::api::{
    self, ApiLimits, ApiMetrics, ApiState, BackendCounters, BackendStats, Readiness, VipCounters,
};
use crate::config::{
    AgentConfig, ApiConfig, CheckConfig, CheckFile, Config, ConfigError, ControllerConfig, Mode,
    NodeConfig, RunConfig, SourceConfig, VipsConfig,
};
use crate::labels::ReasonLabel;
use crate::model::wire::{VipJson, table_to_json};
use crate::model::{VipKey, VipTable};
use crate::source::marathon::{apps, client, sync};
use crate::source::metrics::SourceMetrics;
use crate::source::state::{BuildConfig, TableState};
use crate::source::{self, LabelErrorsRx, Publisher, TableRx};

/// How `l4lb` failed, which decides its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Privilege(String),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

pub async fn main(cfg: Config) -> Result<ExitCode, AppError> {
    match cfg.mode {
        Mode::Controller(c) => controller(c).await.map(|()| ExitCode::SUCCESS),
        Mode::Agent(a) => agent(a).await.map(|()| ExitCode::SUCCESS),
        Mode::Run(r) => run(r).await.map(|()| ExitCode::SUCCESS),
        Mode::Check(c) => check(c),
        Mode::Vips(v) => vips(v).await,
    }
}

/// A registry whose metrics all carry the `l4lb_` prefix.
pub(crate) fn registry() -> Registry {
    Registry::with_prefix("l4lb")
}

/// What a tracked task returns: its name and how it ended.
type Ended = (&'static str, anyhow::Result<()>);

/// The process's long-lived tasks, in two groups: `main` (sources, the agent) stops on
/// `shutdown`; `serving` (the API, DNS) stops on its own token once `main` has drained, so
/// `/ready` says 503 and names resolve while connections finish. A task that fails (or
/// panics) before shutdown cancels `shutdown`: the process drains and exits 1 rather than
/// run on without, say, its API or its source.
struct Tasks {
    main: JoinSet<Ended>,
    serving: JoinSet<Ended>,
    shutdown: CancellationToken,
    serving_stop: CancellationToken,
    errors: Vec<String>,
}

impl Tasks {
    fn new() -> Self {
        Tasks {
            main: JoinSet::new(),
            serving: JoinSet::new(),
            shutdown: CancellationToken::new(),
            serving_stop: CancellationToken::new(),
            errors: Vec::new(),
        }
    }

    /// Start a task that stops when `shutdown` is cancelled.
    fn spawn(
        &mut self,
        name: &'static str,
        f: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.main.spawn(async move { (name, f.await) });
    }

    /// Start a task that outlives the drain (it is given [`Tasks::serving_stop`]).
    fn spawn_serving(
        &mut self,
        name: &'static str,
        f: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.serving.spawn(async move { (name, f.await) });
    }

    /// Cancel `shutdown` on SIGTERM, SIGINT or SIGHUP (a HUP from a closed terminal or a
    /// careless `kill -HUP` drains like TERM instead of killing the process mid-flight).
    fn stop_on_signals(&mut self) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let token = self.shutdown.clone();
        self.spawn("signals", async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                _ = hup.recv() => tracing::info!("SIGHUP: shutting down"),
                _ = token.cancelled() => return Ok(()),
            }
            token.cancel();
            Ok(())
        });
        Ok(())
    }

    fn record(&mut self, joined: Result<Ended, tokio::task::JoinError>) {
        if let Some(f) = failure(joined) {
            self.errors.push(f);
            self.shutdown.cancel();
        }
    }

    /// Wait for `shutdown` (a signal, or a task that failed), reaping tasks as they end.
    async fn until_shutdown(&mut self) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                Some(j) = self.main.join_next() => self.record(j),
                Some(j) = self.serving.join_next() => self.record(j),
            }
        }
    }

    /// The bounded drain: `main` gets up to `grace`, then `serving` is told to stop and gets
    /// up to two seconds; what is still running then is aborted and reported. Err lists every
    /// task that failed or had to be aborted.
    async fn drain(mut self, grace: Duration) -> Result<(), AppError> {
        self.shutdown.cancel();
        reap(&mut self.main, grace, "task(s)", &mut self.errors).await;
        self.serving_stop.cancel();
        let after = Duration::from_secs(2);
        reap(
            &mut self.serving,
            after,
            "serving task(s)",
            &mut self.errors,
        )
        .await;
        if self.errors.is_empty() {
            tracing::info!("stopped");
            Ok(())
        } else {
            Err(AppError::Other(anyhow::anyhow!(
                "{}",
                self.errors.join("; ")
            )))
        }
    }
}

/// How a task ended, if that was a failure (logged here).
fn failure(joined: Result<Ended, tokio::task::JoinError>) -> Option<String> {
    let f = match joined {
        Ok((_, Ok(()))) => return None,
        Ok((name, Err(e))) => format!("{name}: {e:#}"),
        Err(e) if e.is_panic() => format!("a task panicked: {e}"),
        Err(e) => format!("a task was cancelled: {e}"),
    };
    tracing::error!("{f}");
    Some(f)
}

/// Await every task of `set` for up to `within`, then abort the rest; failures and aborted
/// tasks go to `errors`.
async fn reap(set: &mut JoinSet<Ended>, within: Duration, what: &str, errors: &mut Vec<String>) {
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(j)) = tokio::time::timeout_at(deadline, set.join_next()).await {
        errors.extend(failure(j));
    }
    if !set.is_empty() {
        errors.push(format!(
            "{} {what} still running after {within:?}; aborted",
            set.len()
        ));
        set.abort_all();
    }
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
    let stop = tasks.shutdown.clone();
    match source {
        SourceConfig::File { path, poll } => {
            let span = tracing::info_span!("source", file = %path.display());
            span.in_scope(|| tracing::info!("reading apps from file"));
            tasks.spawn(
                "apps file source",
                async move {
                    source::file::run(path, poll, publisher, apps::contributions, stop).await;
                    Ok(())
                }
                .instrument(span),
            );
        }
        SourceConfig::Marathon {
            masters,
            auth,
            timeout,
            resync,
            max_answer,
        } => {
            let shown = hosts(&masters);
            let span = tracing::info_span!("source", marathon = ?shown);
            span.in_scope(|| tracing::info!(auth = ?auth, "following Marathon"));
            let c = client::Client::new(masters, auth, timeout)
                .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?
                .with_max_body(max_answer);
            let cfg = sync::SyncConfig {
                resync_interval: resync,
                ..sync::SyncConfig::default()
            };
            tasks.spawn(
                "Marathon source",
                async move {
                    sync::run(c, publisher, cfg, stop).await;
                    Ok(())
                }
                .instrument(span),
            );
        }
        SourceConfig::Mesos {
            masters,
            auth,
            timeout,
            max_answer,
        } => {
            use crate::source::mesos;
            let shown = hosts(&masters);
            let span = tracing::info_span!("source", mesos = ?shown);
            span.in_scope(|| tracing::info!(auth = ?auth, "following Mesos"));
            let c = mesos::client::Client::new(masters, auth, timeout)
                .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?
                .with_max_body(max_answer);
            let cfg = mesos::sync::SyncConfig {
                max_record: max_answer,
                ..mesos::sync::SyncConfig::default()
            };
            tasks.spawn(
                "Mesos source",
                async move {
                    mesos::sync::run(c, publisher, cfg, stop).await;
                    Ok(())
                }
                .instrument(span),
            );
        }
    }
    Ok((rx, label_errors))
}

/// The hosts of `urls`, for logs (never their credentials or paths).
fn hosts(urls: &[reqwest::Url]) -> Vec<String> {
    urls.iter()
        .map(|u| u.host_str().unwrap_or("?").to_string())
        .collect()
}

/// Bind the API listener and serve `state` on it until the serving group stops.
async fn start_api(tasks: &mut Tasks, cfg: &ApiConfig, state: ApiState) -> Result<(), AppError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the API on {}: {e}", cfg.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| anyhow::anyhow!("API address: {e}"))?;
    tracing::info!(%addr, "API listening");
    let stop = tasks.serving_stop.clone();
    tasks.spawn_serving(
        "API server",
        async move { Ok(api::serve(listener, state, stop).await?) }
            .instrument(tracing::info_span!("api", %addr)),
    );
    Ok(())
}

fn api_state(
    table: TableRx,
    mut registry: Registry,
    ready: &Readiness,
    api: &ApiConfig,
    role: ApiRole,
) -> ApiState {
    let metrics = ApiMetrics::new(&mut registry);
    ApiState::new(table, Arc::new(registry), ready.clone())
        .with_token(api.token.as_ref().map(|t| t.expose().to_string()))
        .with_limits(ApiLimits::for_role(role, api.max_connections), metrics)
}

/// Mark `ready` once `table` holds a version (built, or applied), unless shutdown comes first.
fn ready_on_first(tasks: &mut Tasks, mut table: TableRx, ready: Readiness, what: &'static str) {
    let stop = tasks.shutdown.clone();
    tasks.spawn("readiness", async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            r = table.wait_for(|t| t.version != 0) => {
                if let Ok(t) = r
                    && ready.mark_ready()
                {
                    tracing::info!(version = t.version, "first table {what}; ready");
                }
            }
        }
        Ok(())
    });
}

async fn controller(cfg: ControllerConfig) -> Result<(), AppError> {
    let mut tasks = Tasks::new();
    tasks.stop_on_signals()?;
    let mut reg = registry();
    let metrics = SourceMetrics::new(&mut reg);
    let (rx, rejected) = start_source(&mut tasks, cfg.source, cfg.build, metrics)?;
    let ready = Readiness::default();
    start_api(
        &mut tasks,
        &cfg.api,
        api_state(rx.clone(), reg, &ready, &cfg.api, ApiRole::Controller)
            .with_label_errors(rejected),
    )
    .await?;
    ready_on_first(&mut tasks, rx, ready.clone(), "built");
    tasks.until_shutdown().await;
    ready.mark_draining();
    tasks.drain(Duration::from_secs(2)).await
}

async fn agent(cfg: AgentConfig) -> Result<(), AppError> {
    let mut tasks = Tasks::new();
    tasks.stop_on_signals()?;
    let mut reg = registry();
    let metrics = SourceMetrics::new(&mut reg);
    let label_errors = metrics.label_errors.clone();
    // The privileged step first: without CAP_NET_ADMIN, fail before anything else starts.
    let netif = open_netif(&cfg.node).await?;
    let (tx, rx) = source::table_channel();
    let stop = tasks.shutdown.clone();
    let span = tracing::info_span!("source", controllers = cfg.watch.controllers.len());
    tasks.spawn(
        "controller watch",
        async move {
            source::controller_client::run(cfg.watch, tx, metrics, stop).await;
            Ok(())
        }
        .instrument(span),
    );
    let from_source = FromSource {
        label_errors,
        rejected: None,
    };
    node(tasks, netif, &cfg.node, &cfg.api, reg, rx, from_source).await
}

async fn run(cfg: RunConfig) -> Result<(), AppError> {
    let mut tasks = Tasks::new();
    tasks.stop_on_signals()?;
    let mut reg = registry();
    let metrics = SourceMetrics::new(&mut reg);
    let label_errors = metrics.label_errors.clone();
    let netif = open_netif(&cfg.node).await?;
    let (rx, rejected) = start_source(&mut tasks, cfg.source, cfg.build, metrics)?;
    let from_source = FromSource {
        label_errors,
        rejected: Some(rejected),
    };
    node(tasks, netif, &cfg.node, &cfg.api, reg, rx, from_source).await
}

/// Open (create) the VIP interface; missing privilege is its own error (exit 2).
async fn open_netif(cfg: &NodeConfig) -> Result<Netif, AppError> {
    let netif = Netif::open(&cfg.interface, cfg.interface_kind)
        .await
        .map_err(|e| match e {
            NetifError::PermissionDenied { .. } => AppError::Privilege(e.to_string()),
            other => AppError::Other(anyhow::anyhow!("interface {}: {other}", cfg.interface)),
        })?;
    tracing::info!(interface = %cfg.interface, kind = netif.kind().as_str(), "VIP interface ready");
    Ok(netif)
}

/// Adapts the forwarder's counters, and the kernel path's when it runs, to the API's view.
struct ForwardCounters(ForwardStats, Option<KernelStats>);

impl BackendStats for ForwardCounters {
    fn backend(&self, vip: &VipKey, addr: std::net::SocketAddr) -> Option<BackendCounters> {
        let mut c = self
            .0
            .backend(vip, addr)
            .map(|s| BackendCounters {
                connections: s.active_connections,
                bytes: s.bytes,
                ejected: s.ejected,
                kernel_connections: None,
                connects: s.connects,
                connect_failures: s.connect_failures,
                connect_p50: s.connect_p50,
                connect_p99: s.connect_p99,
            })
            .unwrap_or_default();
        c.kernel_connections = self
            .1
            .as_ref()
            .map(|k| k.backend(vip, addr).map_or(0, |k| k.connections));
        Some(c)
    }

    fn vip(&self, vip: &VipKey) -> Option<VipCounters> {
        self.0.vip(vip).map(|s| VipCounters {
            ok: s.ok,
            failed: s.failed,
        })
    }

    fn data_plane(&self, vip: &VipKey) -> Option<&'static str> {
        let k = self.1.as_ref()?;
        Some(if k.translates(vip) { "bpf" } else { "proxy" })
    }
}

/// UDP and TCP DNS sockets on the same address and port. With port 0 the UDP socket picks the
/// port and TCP follows; if TCP finds that port taken, try again with a new one.
async fn bind_dns(
    addr: std::net::SocketAddr,
) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener), AppError> {
    let mut attempts = 0;
    loop {
        let u = dns_socket(addr, socket2::Type::DGRAM)
            .and_then(|s| tokio::net::UdpSocket::from_std(s.into()))
            .map_err(|e| anyhow::anyhow!("cannot bind DNS on udp {addr}: {e}"))?;
        let port = u.local_addr().map(|a| a.port()).unwrap_or(addr.port());
        let tcp = std::net::SocketAddr::new(addr.ip(), port);
        match dns_socket(tcp, socket2::Type::STREAM).and_then(|s| {
            s.listen(1024)?;
            tokio::net::TcpListener::from_std(s.into())
        }) {
            Ok(t) => return Ok((u, t)),
            Err(e) if addr.port() == 0 && attempts < 16 => {
                attempts += 1;
                tracing::debug!(port, error = %e, "DNS TCP port taken; picking another");
            }
            Err(e) => return Err(anyhow::anyhow!("cannot bind DNS on tcp {addr}: {e}").into()),
        }
    }
}

/// A non-blocking socket bound to `addr`. An IPv6 one is IPv6 only, so `--dns-listen
/// 0.0.0.0:53 --dns-listen [::]:53` binds both instead of the second finding the port taken.
fn dns_socket(addr: std::net::SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if ty == socket2::Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Install the DNS listen addresses that are not this host's yet (the DC/OS ones,
/// 198.51.100.1-3) on the VIP interface, kept there until shutdown, so they can be bound.
async fn keep_dns_addresses(
    netif: &mut Netif,
    listen: &[std::net::SocketAddr],
) -> Result<(), AppError> {
    if netif.kind() == InterfaceKind::None {
        return Ok(());
    }
    let host = netif
        .host_addresses()
        .await
        .map_err(|e| anyhow::anyhow!("listing host addresses: {e}"))?;
    let install = crate::agent::dns::addresses_to_install(listen, &host.own);
    if !install.is_empty() {
        netif
            .keep(&install)
            .await
            .map_err(|e| anyhow::anyhow!("installing DNS listen addresses {install:?}: {e}"))?;
        tracing::info!(addrs = ?install, "DNS listen addresses installed on the VIP interface");
    }
    Ok(())
}

/// The upstreams: `--dns-upstream` if given, else the nameservers the host's resolv.conf
/// lists (`host`), never l4lb's own `listen` addresses.
fn upstreams(
    cfg: &NodeConfig,
    host: Option<&resolv::ResolvConf>,
    listen: &[std::net::SocketAddr],
) -> Vec<std::net::SocketAddr> {
    match host {
        Some(conf) if cfg.dns.upstreams.is_empty() => {
            for bad in &conf.skipped {
                tracing::warn!(nameserver = %bad, "resolv.conf nameserver not used (not an address)");
            }
            let ups = resolv::upstreams(conf, listen);
            tracing::info!(path = %cfg.resolv_conf.display(), upstreams = ?ups, "DNS upstreams from resolv.conf");
            ups
        }
        _ => cfg.dns.upstreams.clone(),
    }
}

/// What the node's API shows of the source: the label-error counter (the agent adds its own
/// refusals to it) and, where the source runs in this process, the rejected labels.
struct FromSource {
    label_errors: Family<ReasonLabel, Counter>,
    rejected: Option<LabelErrorsRx>,
}

/// Interface, DNS, forwarder and API around `tables`, until shutdown and the drain end.
async fn node(
    mut tasks: Tasks,
    netif: Netif,
    cfg: &NodeConfig,
    api_cfg: &ApiConfig,
    mut reg: Registry,
    tables: TableRx,
    from_source: FromSource,
) -> Result<(), AppError> {
    let FromSource {
        label_errors,
        rejected,
    } = from_source;
    let mut netif = netif;
    keep_dns_addresses(&mut netif, &cfg.dns_listen).await?;
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    let mut listen = Vec::new();
    for addr in &cfg.dns_listen {
        let (u, t) = bind_dns(*addr).await?;
        if let Ok(a) = u.local_addr() {
            tracing::info!(addr = %a, "DNS listening");
            listen.push(a);
        }
        udp.push(u);
        tcp.push(t);
    }
    // Restores the file when dropped: on shutdown, and on any early return from here on.
    let (managed, host_conf) = if cfg.manage_resolv_conf {
        let (guard, original) = resolv::ManagedResolvConf::install(&cfg.resolv_conf, &listen)
            .map_err(|e| anyhow::anyhow!("--dns-manage-resolv-conf: {e}"))?;
        tracing::info!(path = %cfg.resolv_conf.display(), "resolv.conf points at l4lb");
        (Some(guard), Some(original))
    } else if cfg.dns.upstreams.is_empty() {
        match resolv::read_host(&cfg.resolv_conf) {
            Ok(c) => (None, Some(c)),
            Err(e) => {
                tracing::warn!(error = %e, "no upstreams from resolv.conf; names outside the zones get REFUSED");
                (None, None)
            }
        }
    } else {
        (None, None)
    };
    let mut dns_cfg = cfg.dns.clone();
    dns_cfg.upstreams = upstreams(cfg, host_conf.as_ref(), &listen);
    let catalog = DnsCatalog::new(&dns_cfg);
    let dns_metrics = DnsMetrics::new(&mut reg);
    let forward_metrics = ForwardMetrics::new(&mut reg);
    let agent_metrics = AgentMetrics::new(&mut reg, label_errors);
    let forwarder = Forwarder::new(cfg.forward.clone(), forward_metrics, tasks.shutdown.clone());
    let stats = forwarder.stats();
    let agent = Agent::new(netif, forwarder, catalog.clone(), agent_metrics);
    let applied = agent.applied();

    // The kernel path, where asked for and where it loads; the proxy runs in every mode.
    let kernel = cfg
        .data_plane
        .start(&cfg.bpf)
        .map_err(|e| AppError::Privilege(format!("--data-plane bpf: {e}")))?;
    let plane = if kernel.is_some() { "bpf" } else { "proxy" };
    tracing::info!(data_plane = plane, requested = ?cfg.data_plane, "data plane chosen");
    let kernel_stats = KernelStats::with_metrics(KernelMetrics::new(&mut reg, plane));
    if let Some(kp) = kernel {
        let bpf_cfg = cfg.bpf.clone();
        let (applied, ks, stop) = (
            applied.clone(),
            kernel_stats.clone(),
            tasks.shutdown.clone(),
        );
        tasks.spawn(
            "kernel data path",
            async move {
                crate::agent::bpf::run(kp, &bpf_cfg, applied, ks, stop).await?;
                Ok(())
            }
            .instrument(tracing::info_span!("bpf")),
        );
    }

    let ready = Readiness::default();
    let mut state =
        api_state(applied.clone(), reg, &ready, api_cfg, ApiRole::Node).with_stats(Arc::new(
            ForwardCounters(stats, (plane == "bpf").then_some(kernel_stats)),
        ));
    if let Some(rx) = rejected {
        state = state.with_label_errors(rx);
    }
    start_api(&mut tasks, api_cfg, state).await?;
    let dns_stop = tasks.serving_stop.clone();
    tasks.spawn_serving(
        "DNS server",
        async move {
            crate::agent::dns::serve(dns_cfg, catalog, udp, tcp, dns_metrics, dns_stop).await?;
            Ok(())
        }
        .instrument(tracing::info_span!("dns")),
    );
    // DNS is bound above, so the first applied table is all readiness waits for.
    let restored = restore_table(&mut tasks, cfg, applied.clone());
    ready_on_first(&mut tasks, applied, ready.clone(), "applied");
    let grace = cfg.shutdown_grace;
    let stop = tasks.shutdown.clone();
    tasks.spawn(
        "agent",
        async move {
            agent.run(tables, restored, grace, stop).await;
            Ok(())
        }
        .instrument(tracing::info_span!("agent")),
    );
    tasks.until_shutdown().await;
    ready.mark_draining();
    // The host's programs go back to their own resolvers before l4lb stops answering.
    if let Some(guard) = managed {
        match guard.restore() {
            Ok(()) => tracing::info!("resolv.conf restored"),
            Err(e) => tracing::error!(error = %e, "cannot restore resolv.conf"),
        }
    }
    // The agent's own drain is bounded by `grace`; give it a little more before aborting.
    tasks.drain(grace + Duration::from_secs(5)).await
}

/// The table an earlier agent saved (if it is usable), and a task that saves this one's.
fn restore_table(tasks: &mut Tasks, cfg: &NodeConfig, applied: TableRx) -> Option<VipTable> {
    let saved = match SavedTable::at(&cfg.state_dir, &cfg.interface, cfg.saved_max) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no saved table: a restart waits for the source");
            return None;
        }
    };
    let restored = match saved.load() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, path = %saved.path().display(), "saved table ignored");
            None
        }
    };
    let stop = tasks.shutdown.clone();
    tasks.spawn("table saver", async move {
        saved.keep(applied, stop).await;
        Ok(())
    });
    restored
}

fn check(args: CheckConfig) -> Result<ExitCode, AppError> {
    let build = args.build;
    let (path, what, mesos) = match &args.file {
        CheckFile::Apps(p) => (p, "apps file", false),
        CheckFile::MesosState(p) => (p, "Mesos state file", true),
    };
    let body = std::fs::read(path).map_err(|source| ConfigError::Read {
        what,
        path: path.clone(),
        source,
    })?;
    let hosts = source::HostCache::default();
    let (contribs, bad_apps) = if mesos {
        source::mesos::cluster::contributions_of_state(&body, &mut |h| hosts.resolve(h))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    } else {
        apps::contributions(&body, &hosts)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    };
    let mut state = TableState::new(build, 1);
    state.replace_all(contribs);
    let table = state.rebuild(0).table.unwrap_or_default();
    let json = serde_json::to_string_pretty(&table_to_json(&table))
        .map_err(|e| anyhow::anyhow!("encoding: {e}"))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{json}");
    let mut err = std::io::stderr().lock();
    let mut rejected = 0;
    for b in &bad_apps {
        let _ = writeln!(err, "rejected app: {b}");
        rejected += 1;
    }
    for r in state.rejections() {
        // The words of /v1/label-errors and the status page.
        let _ = writeln!(err, "rejected label: {}", r.to_model(0));
        rejected += 1;
    }
    Ok(if rejected > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn vips(args: VipsConfig) -> Result<ExitCode, AppError> {
    let url = args
        .api
        .join("v1/vips")
        .map_err(|e| anyhow::anyhow!("bad --api URL: {e}"))?;
    let mut rb = crate::tls::client_builder()
        .build()
        .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?
        .get(url.clone())
        .timeout(Duration::from_secs(10));
    if let Some(t) = &args.token {
        rb = rb.bearer_auth(t.expose());
    }
    let resp = rb
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {}", e.without_url()))?;
    let status = resp.status();
    let version = resp
        .headers()
        .get(api::INDEX_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    let body = resp
        .bytes()
        .await
        .map_err(|e| anyhow::anyhow!("reading {url}: {}", e.without_url()))?;
    if !status.is_success() {
        return Err(anyhow::anyhow!("{url} answered {status}").into());
    }
    let vips: Vec<VipJson> =
        serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("{url}: not a VIP list: {e}"))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(&body));
    } else {
        let _ = write!(out, "{}", render_vips(&vips, &version));
    }
    Ok(ExitCode::SUCCESS)
}

/// The `l4lb vips` table, like `ipvsadm -Ln`.
pub fn render_vips(vips: &[VipJson], version: &str) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "VIP table version {version}: {} VIPs", vips.len());
    let _ = writeln!(
        s,
        "{:<5} {:<46} {:<24} {:<10} {:>7} {:>10} {:>8}  APP/TASK",
        "PROTO", "VIP / BACKEND", "ADDRESS", "STATE", "CONNS", "BYTES", "KERNEL"
    );
    for v in vips {
        let addr = std::net::SocketAddr::new(v.ip, v.port).to_string();
        let plane = v.data_plane.as_deref().unwrap_or("");
        let _ = writeln!(s, "{:<5} {:<46} {:<24} {plane}", v.protocol, v.vip, addr);
        for b in &v.backend {
            let baddr = std::net::SocketAddr::new(b.ip, b.port).to_string();
            let state = if b.ejected == Some(true) {
                format!("{}*", b.state.as_str())
            } else {
                b.state.as_str().to_string()
            };
            let conns = b
                .connections
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into());
            let bytes = b.bytes.map(human_bytes).unwrap_or_else(|| "-".into());
            // Connections the kernel path translated to this backend (it sees no bytes).
            let kernel = b
                .kernel_connections
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "{:<5} {:<46} {:<24} {:<10} {:>7} {:>10} {:>8}  {} {}",
                "", "  ->", baddr, state, conns, bytes, kernel, b.app, b.task
            );
        }
    }
    s
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dns_binds_ipv4_and_ipv6_wildcards_on_one_port() {
        let (u4, t4) = bind_dns("0.0.0.0:0".parse().unwrap()).await.unwrap();
        let port = u4.local_addr().unwrap().port();
        assert_eq!(t4.local_addr().unwrap().port(), port);
        match bind_dns(std::net::SocketAddr::new("::".parse().unwrap(), port)).await {
            Ok((u6, t6)) => {
                assert_eq!(u6.local_addr().unwrap().port(), port);
                assert_eq!(t6.local_addr().unwrap().port(), port);
            }
            // No IPv6 on this host at all: nothing to check.
            Err(e) if std::net::UdpSocket::bind("[::1]:0").is_err() => {
                eprintln!("skipped, no IPv6: {e}");
            }
            Err(e) => panic!("IPv6 wildcard beside the IPv4 one: {e}"),
        }
    }

    #[test]
    fn vips_table_shows_the_data_plane_and_kernel_counts() {
        let vips: Vec<VipJson> = serde_json::from_str(
            r#"[{"vip":"web.marathon.l4lb.thisdcos.directory:80","protocol":"tcp",
                 "name":"web.marathon.l4lb.thisdcos.directory","ip":"198.18.128.9","port":80,
                 "data_plane":"bpf",
                 "backend":[{"ip":"198.18.0.2","port":31000,"state":"active","app":"/web",
                             "task":"web.1","connections":0,"bytes":0,"kernel_connections":7}]}]"#,
        )
        .unwrap();
        let out = render_vips(&vips, "3");
        let vip_line = out.lines().nth(2).unwrap();
        assert!(vip_line.ends_with("bpf"), "{out}");
        let backend_line = out.lines().nth(3).unwrap();
        assert!(backend_line.contains(" 7  /web web.1"), "{out}");
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(3 << 30), "3.0GiB");
    }
}
