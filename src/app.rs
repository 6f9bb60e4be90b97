//! The one place that wires components together: sources, the agent's data plane, DNS and
//! the API, around one shutdown token. Each `l4lb` subcommand is a function here.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::agent::dns::{DnsCatalog, DnsConfig, DnsMetrics};
use crate::agent::forward::{ForwardConfig, ForwardMetrics, ForwardStats, Forwarder};
use crate::agent::netif::{InterfaceKind, Netif, NetifError};
use crate::agent::{Agent, AgentMetrics};
use crate::api::{self, ApiState, Readiness};
use crate::api::{BackendCounters, BackendStats};
use crate::config::{
    AgentArgs, AgentCmdArgs, ApiArgs, BuildArgs, CheckArgs, Cli, Command, ConfigError,
    ControllerArgs, InterfaceKindArg, RunArgs, SourceArgs, SourceConfig, VipsArgs,
};
use crate::model::VipKey;
use crate::model::wire::{VipJson, table_to_json};
use crate::source::controller::WatchConfig;
use crate::source::marathon::{client, sync};
use crate::source::metrics::{Label, SourceMetrics};
use crate::source::state::TableState;
use crate::source::{self, Publisher, TableRx};

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

pub async fn main(cli: Cli) -> Result<ExitCode, AppError> {
    match cli.command {
        Command::Controller(a) => controller(a).await.map(|()| ExitCode::SUCCESS),
        Command::Agent(a) => agent(a).await.map(|()| ExitCode::SUCCESS),
        Command::Run(a) => run(a).await.map(|()| ExitCode::SUCCESS),
        Command::Check(a) => check(a),
        Command::Vips(a) => vips(a).await,
    }
}

/// A registry whose metrics all carry the `l4lb_` prefix.
pub(crate) fn registry() -> Registry {
    Registry::with_prefix("l4lb")
}

/// Cancel `token` on SIGTERM or SIGINT.
pub(crate) fn cancel_on_signal(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = token.cancelled() => return,
        }
        token.cancel();
    });
    Ok(())
}

/// Start the configured source (Marathon or apps file) publishing into a new table channel.
pub(crate) fn start_source(
    source: &SourceArgs,
    build: &BuildArgs,
    metrics: SourceMetrics,
    shutdown: &CancellationToken,
) -> Result<TableRx, AppError> {
    let src = source.validate()?;
    let build = build.validate()?;
    let (tx, rx) = source::table_channel();
    let publisher = Publisher::new(build, tx, metrics);
    match src {
        SourceConfig::File { path, poll } => {
            tracing::info!(path = %path.display(), "reading apps from file");
            tokio::spawn(source::file::run(path, poll, publisher, shutdown.clone()));
        }
        SourceConfig::Marathon {
            masters,
            auth,
            timeout,
            resync,
        } => {
            let masters_shown: Vec<String> = masters
                .iter()
                .map(|u| u.host_str().unwrap_or("?").to_string())
                .collect();
            tracing::info!(masters = ?masters_shown, auth = ?auth, "following Marathon");
            let c = client::Client::new(masters, auth, timeout)
                .map_err(|e| AppError::Other(anyhow::anyhow!("HTTP client: {e}")))?;
            let cfg = sync::SyncConfig {
                resync_interval: resync,
                ..sync::SyncConfig::default()
            };
            tokio::spawn(sync::run(c, publisher, cfg, shutdown.clone()));
        }
    }
    Ok(rx)
}

/// Bind the API listener and serve `state` on it; returns the bound address.
pub(crate) async fn start_api(
    args: &ApiArgs,
    state: ApiState,
    shutdown: &CancellationToken,
) -> Result<std::net::SocketAddr, AppError> {
    let listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the API on {}: {e}", args.api_listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| anyhow::anyhow!("API address: {e}"))?;
    tracing::info!(%addr, "API listening");
    let token = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = api::serve(listener, state, token).await {
            tracing::error!(error = %e, "API server failed");
        }
    });
    Ok(addr)
}

async fn controller(args: ControllerArgs) -> Result<(), AppError> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let mut reg = registry();
    let metrics = SourceMetrics::new(&mut reg);
    let rx = start_source(&args.source, &args.build, metrics, &shutdown)?;
    let ready = Readiness::default();
    let state =
        ApiState::new(rx.clone(), Arc::new(reg), ready.clone()).with_token(args.api.token()?);
    start_api(&args.api, state, &shutdown).await?;
    // Ready once the first table is built.
    let mut first = rx;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = first.wait_for(|t| t.version != 0) => {
            if r.is_ok() {
                ready.set(true);
                tracing::info!("first VIP table built; ready");
            }
        }
    }
    shutdown.cancelled().await;
    ready.set(false);
    // Let in-flight API responses finish.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

async fn agent(args: AgentCmdArgs) -> Result<(), AppError> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let mut reg = registry();
    let metrics = SourceMetrics::new(&mut reg);
    let label_errors = metrics.label_errors.clone();
    let (tx, rx) = source::table_channel();
    let watch = WatchConfig {
        controllers: args
            .controllers
            .iter()
            .map(crate::config::with_trailing_slash)
            .collect(),
        wait: args.watch_wait,
        token: args.api.token()?.map(crate::config::Secret::from),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
    };
    // The privileged step first: without CAP_NET_ADMIN, fail before anything else starts.
    let netif = open_netif(&args.agent).await?;
    tokio::spawn(source::controller::run(
        watch,
        tx,
        metrics,
        shutdown.clone(),
    ));
    data_plane(
        netif,
        &args.agent,
        &args.api,
        reg,
        rx,
        label_errors,
        shutdown,
    )
    .await
}

async fn run(args: RunArgs) -> Result<(), AppError> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let mut reg = registry();
    let metrics = SourceMetrics::new(&mut reg);
    let label_errors = metrics.label_errors.clone();
    let netif = open_netif(&args.agent).await?;
    let rx = start_source(&args.source, &args.build, metrics, &shutdown)?;
    data_plane(
        netif,
        &args.agent,
        &args.api,
        reg,
        rx,
        label_errors,
        shutdown,
    )
    .await
}

/// Open (create) the VIP interface; missing privilege is its own error (exit 2).
async fn open_netif(args: &AgentArgs) -> Result<Netif, AppError> {
    let netif = Netif::open(&args.interface, interface_kind(args.interface_kind))
        .await
        .map_err(|e| match e {
            NetifError::PermissionDenied { .. } => AppError::Privilege(e.to_string()),
            other => AppError::Other(anyhow::anyhow!("interface {}: {other}", args.interface)),
        })?;
    tracing::info!(interface = %args.interface, kind = netif.kind().as_str(), "VIP interface ready");
    Ok(netif)
}

/// Adapts the forwarder's counters to the API's view.
struct ForwardCounters(ForwardStats);

impl BackendStats for ForwardCounters {
    fn backend(&self, vip: &VipKey, addr: std::net::SocketAddr) -> Option<BackendCounters> {
        self.0.backend(vip, addr).map(|s| BackendCounters {
            connections: s.active_connections,
            bytes: s.bytes,
            ejected: s.ejected,
        })
    }
}

fn interface_kind(k: InterfaceKindArg) -> InterfaceKind {
    match k {
        InterfaceKindArg::Auto => InterfaceKind::Auto,
        InterfaceKindArg::Dummy => InterfaceKind::Dummy,
        InterfaceKindArg::Bridge => InterfaceKind::Bridge,
        InterfaceKindArg::None => InterfaceKind::None,
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

/// Interface, DNS, forwarder and API around `tables`, until `shutdown` and the drain end.
async fn data_plane(
    netif: Netif,
    args: &AgentArgs,
    api_args: &ApiArgs,
    mut reg: Registry,
    tables: TableRx,
    label_errors: Family<Label, Counter>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let dns_cfg = DnsConfig {
        zone: args.zone.trim_end_matches('.').to_ascii_lowercase(),
        ttl: args.dns_ttl,
        upstreams: args.dns_upstream.clone(),
        upstream_timeout: args.dns_upstream_timeout,
    };
    let catalog = DnsCatalog::new(&dns_cfg);
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for addr in &args.dns_listen {
        let (u, t) = bind_dns(*addr).await?;
        if let Ok(a) = u.local_addr() {
            tracing::info!(addr = %a, "DNS listening");
        }
        udp.push(u);
        tcp.push(t);
    }
    let dns_metrics = DnsMetrics::new(&mut reg);
    let forward_metrics = ForwardMetrics::new(&mut reg);
    let agent_metrics = AgentMetrics::new(&mut reg, label_errors);

    let fwd_cfg = ForwardConfig {
        connect_timeout: args.connect_timeout,
        connect_retries: args.connect_retries,
        tcp_idle_timeout: args.tcp_idle_timeout,
        drain_timeout: args.drain_timeout,
        max_connections: args.max_connections,
        udp_idle_timeout: args.udp_idle_timeout,
        max_udp_sessions: args.max_udp_sessions,
    };
    let forwarder = Forwarder::new(fwd_cfg, forward_metrics, shutdown.clone());
    let stats = forwarder.stats();
    let agent = Agent::new(netif, forwarder, catalog.clone(), agent_metrics);
    let applied = agent.applied();

    // The API and DNS outlive the drain: /ready must say 503 while connections finish.
    let api_stop = CancellationToken::new();
    let dns_stop = CancellationToken::new();
    let ready = Readiness::default();
    let state = ApiState::new(applied, Arc::new(reg), ready.clone())
        .with_stats(Arc::new(ForwardCounters(stats)))
        .with_token(api_args.token()?);
    start_api(api_args, state, &api_stop).await?;
    let dns_task = tokio::spawn(crate::agent::dns::serve(
        dns_cfg,
        catalog,
        udp,
        tcp,
        dns_metrics,
        dns_stop.clone(),
    ));

    let ready_on_apply = ready.clone();
    let grace = args.shutdown_grace;
    let agent_task = tokio::spawn(agent.run(
        tables,
        move |t| {
            if !ready_on_apply.get() {
                tracing::info!(version = t.version, "first table applied; ready");
            }
            ready_on_apply.set(true);
        },
        grace,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    ready.set(false);
    if let Err(e) = agent_task.await {
        tracing::error!(error = %e, "agent task failed");
    }
    dns_stop.cancel();
    let _ = dns_task.await;
    api_stop.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tracing::info!("stopped");
    Ok(())
}

fn check(args: CheckArgs) -> Result<ExitCode, AppError> {
    let build = args.build.validate()?;
    let body = std::fs::read(&args.apps_file).map_err(|source| ConfigError::Read {
        what: "apps file",
        path: args.apps_file.clone(),
        source,
    })?;
    let (contribs, bad_apps) = source::contributions(&body, &source::HostCache::default())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.apps_file.display()))?;
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
        let _ = writeln!(
            err,
            "rejected label: app {} port {} {}={:?}: {} [{}]",
            r.app, r.port_index, r.key, r.value, r.error, r.reason
        );
        rejected += 1;
    }
    Ok(if rejected > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn vips(args: VipsArgs) -> Result<ExitCode, AppError> {
    let base = crate::config::with_trailing_slash(&args.api);
    let url = base
        .join("v1/vips")
        .map_err(|e| anyhow::anyhow!("bad --api URL: {e}"))?;
    let mut rb = crate::tls::client_builder()
        .build()
        .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?
        .get(url.clone())
        .timeout(Duration::from_secs(10));
    if let Some(p) = &args.api_token_file {
        rb = rb.bearer_auth(crate::config::read_secret(p, "API token file")?);
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
        "{:<5} {:<46} {:<24} {:<10} {:>7} {:>10}  APP/TASK",
        "PROTO", "VIP / BACKEND", "ADDRESS", "STATE", "CONNS", "BYTES"
    );
    for v in vips {
        let addr = std::net::SocketAddr::new(v.ip, v.port).to_string();
        let _ = writeln!(s, "{:<5} {:<46} {:<24}", v.protocol, v.vip, addr);
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
            let _ = writeln!(
                s,
                "{:<5} {:<46} {:<24} {:<10} {:>7} {:>10}  {} {}",
                "", "  ->", baddr, state, conns, bytes, b.app, b.task
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
    fn bytes_for_people() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(3 << 30), "3.0GiB");
    }
}
