//! An agent's node (`l4lb agent`, `l4lb run`): everything that serves on a host around the
//! table channel, assembled by [`NodeBuilder`] one step at a time: the VIP interface
//! ([`open_netif`]), DNS, the forwarder and the agent, the kernel path, the API, the saved
//! table and readiness. The steps that bind sockets (DNS, the API) are one place each, and
//! either can be handed sockets bound elsewhere instead: by the caller, or by the agent this
//! one takes over from ([`Takeover`], `--take-over`), whose sockets every step takes before
//! it binds, and to whose successor it offers its own. Wiring only, like `app`: the parts
//! live in `agent`, `api` and `upgrade`; the API and readiness steps serve the controller too.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::agent::bpf::KernelStats;
use crate::agent::dns::listen::{self, DnsSockets, Listening};
use crate::agent::dns::resolv::ManagedResolvConf;
use crate::agent::dns::{DnsCatalog, DnsMetrics};
use crate::agent::forward::{ForwardMetrics, ForwardStats, Forwarder};
use crate::agent::handoff::{HandedOver, Kind, Name, Sockets, Successor};
use crate::agent::netif::Netif;
use crate::agent::saved::SavedTable;
use crate::agent::stats::AgentStats;
use crate::agent::{Agent, AgentMetrics};
use crate::api::limits::ApiRole;
use crate::api::{self, ApiLimits, ApiMetrics, ApiState, Readiness};
use crate::config::{ApiConfig, NodeConfig};
use crate::exit::AppError;
use crate::labels::ReasonLabel;
use crate::model::VipTable;
use crate::model::status::Plane;
use crate::sd_notify::{Notifier, State};
use crate::source::{LabelErrorsRx, TableRx};
use crate::tasks::Tasks;
use crate::upgrade;

/// What a node takes over from the agent it replaces (`--take-over`: its sockets, link lock
/// and table) and where it offers its own to the one that will replace it.
pub struct Takeover {
    path: PathBuf,
    sockets: Sockets,
    successor: Option<Successor>,
}

impl Takeover {
    /// With `--take-over`, receive the running agent's sockets; else an empty book.
    pub async fn start(cfg: &NodeConfig) -> Result<Self, AppError> {
        let path = upgrade::socket_path(&cfg.state_dir, &cfg.interface)?;
        let (sockets, successor) = upgrade::inherit(cfg.take_over, &path).await?;
        Ok(Takeover {
            path,
            sockets,
            successor,
        })
    }
}

/// Open (create) the VIP interface, or adopt the lock `takeover` passed: the node's
/// privileged step, taken before anything else starts, so that missing `CAP_NET_ADMIN` fails
/// at once (exit 2).
pub async fn open_netif(cfg: &NodeConfig, takeover: &Takeover) -> Result<Netif, AppError> {
    let netif = Netif::open_with(&cfg.interface, cfg.interface_kind, &takeover.sockets)
        .await
        .map_err(|e| AppError::from_netif(e, &cfg.interface))?;
    tracing::info!(interface = %cfg.interface, kind = netif.kind().as_str(), "VIP interface ready");
    Ok(netif)
}

/// The node's settings and what it is handed; [`NodeBuilder::run`] assembles and runs it.
pub struct NodeBuilder<'a> {
    cfg: &'a NodeConfig,
    api: &'a ApiConfig,
    registry: Registry,
    label_errors: Family<ReasonLabel, Counter>,
    rejected: Option<LabelErrorsRx>,
    dns_sockets: Option<DnsSockets>,
    api_listener: Option<TcpListener>,
}

/// DNS sockets of `addrs`: the predecessor's where `sockets` has both of an address, else
/// bound here.
fn inherited_dns(addrs: &[std::net::SocketAddr], sockets: &Sockets) -> anyhow::Result<DnsSockets> {
    let mut out = DnsSockets::default();
    for addr in addrs {
        let pair = sockets.take_udp(Kind::DnsUdp, *addr).and_then(|u| {
            let t = sockets.take_tcp(Kind::DnsTcp, u.local_addr().ok()?)?;
            Some((u, t))
        });
        let Some((u, t)) = pair else {
            let mut bound = DnsSockets::bind(&[*addr])?;
            out.udp.append(&mut bound.udp);
            out.tcp.append(&mut bound.tcp);
            continue;
        };
        let (u, t) = (
            u.set_nonblocking(true).map(|()| u)?,
            t.set_nonblocking(true).map(|()| t)?,
        );
        out.udp.push(
            tokio::net::UdpSocket::from_std(u).with_context(|| format!("DNS on udp {addr}"))?,
        );
        out.tcp
            .push(TcpListener::from_std(t).with_context(|| format!("DNS on tcp {addr}"))?);
    }
    Ok(out)
}

/// Offer the DNS sockets to a successor.
fn offer_dns(dns: &DnsSockets, sockets: &Sockets) {
    for u in &dns.udp {
        if let Ok(a) = u.local_addr() {
            sockets.offer(Name::socket(Kind::DnsUdp, a), u.as_fd());
        }
    }
    for t in &dns.tcp {
        if let Ok(a) = t.local_addr() {
            sockets.offer(Name::socket(Kind::DnsTcp, a), t.as_fd());
        }
    }
}

impl<'a> NodeBuilder<'a> {
    /// A node of `cfg` with its API on `api`, registering its metrics in `registry`. Labels
    /// the agent refuses are counted in `label_errors`, the source's family.
    pub fn new(
        cfg: &'a NodeConfig,
        api: &'a ApiConfig,
        registry: Registry,
        label_errors: Family<ReasonLabel, Counter>,
    ) -> Self {
        NodeBuilder {
            cfg,
            api,
            registry,
            label_errors,
            rejected: None,
            dns_sockets: None,
            api_listener: None,
        }
    }

    /// Show the labels the source rejected (where the source runs in this process).
    pub fn rejected_labels(mut self, rx: LabelErrorsRx) -> Self {
        self.rejected = Some(rx);
        self
    }

    /// Serve DNS on `sockets` instead of binding the listen addresses.
    pub fn dns_sockets(mut self, sockets: DnsSockets) -> Self {
        self.dns_sockets = Some(sockets);
        self
    }

    /// Serve the API on `listener` instead of binding `--api-listen`.
    pub fn api_listener(mut self, listener: TcpListener) -> Self {
        self.api_listener = Some(listener);
        self
    }

    /// Assemble the node around `tables` on `netif`, serve until shutdown, drain. Sockets
    /// come from `takeover` first; all are offered to a successor.
    pub async fn run(
        self,
        tasks: Tasks,
        mut netif: Netif,
        tables: TableRx,
        takeover: Takeover,
    ) -> Result<(), AppError> {
        let cfg = self.cfg;
        let Takeover {
            path: handoff_path,
            sockets,
            successor,
        } = takeover;
        let handed = HandedOver::default();
        let notify = Notifier::from_env().map(Arc::new);
        let mut node = Steps {
            cfg,
            tasks,
            registry: self.registry,
            handed: handed.clone(),
        };
        let given_dns = match self.dns_sockets {
            Some(s) => Some(s),
            None if successor.is_some() => {
                Some(inherited_dns(&cfg.dns_listen.addrs, &sockets).map_err(AppError::classify)?)
            }
            None => None,
        };
        let dns = node.dns(&mut netif, given_dns).await?;
        offer_dns(&dns.sockets, &sockets);
        let catalog = DnsCatalog::new(&dns.config);
        let (agent, forward) =
            node.agent(netif, catalog.clone(), self.label_errors, sockets.clone());
        let applied = agent.applied();
        let kernel = node.kernel_path(&applied)?;
        let (restored, saved) = node.saved_table(applied.clone());
        if successor.is_some()
            && let Some(t) = &restored
        {
            // Taking over: the DNS sockets are the running agent's, and clients keep asking
            // through them. Answer from the table the data path is restored to from the first
            // query, never NXDOMAIN until the agent applied it.
            catalog.publish(t.vips.values().map(|v| &**v));
            catalog.publish_tasks(&t.apps);
        }
        let managed = node.serve_dns(dns, catalog);
        // Every part has registered its metrics: the API takes the registry.
        let Steps {
            mut tasks,
            registry,
            ..
        } = node;
        let ready = Readiness::default();
        let mut state = api_state(applied.clone(), registry, &ready, self.api, ApiRole::Node)
            .with_stats(Arc::new(AgentStats::new(forward, kernel)));
        if let Some(rx) = self.rejected {
            state = state.with_label_errors(rx);
        }
        let api_listener = match self.api_listener {
            Some(l) => Some(l),
            None => sockets
                .take_tcp(Kind::Api, self.api.listen)
                .map(|l| {
                    l.set_nonblocking(true)
                        .and_then(|()| TcpListener::from_std(l))
                })
                .transpose()
                .context("the API listener taken over")?,
        };
        let api_listener = match api_listener {
            Some(l) => l,
            None => bind_api(self.api).await?,
        };
        if let Ok(a) = api_listener.local_addr() {
            sockets.offer(Name::socket(Kind::Api, a), api_listener.as_fd());
        }
        start_api(&mut tasks, self.api, Some(api_listener), state).await?;
        // DNS is bound above, so the first applied table is all readiness waits for.
        ready_on_first(&mut tasks, applied.clone(), ready.clone(), "applied");
        start_upgrades(
            &mut tasks,
            Upgrades {
                path: handoff_path,
                sockets,
                successor,
                saved,
                applied,
                handed: handed.clone(),
                notify: notify.clone(),
            },
        );
        let (grace, stop) = (cfg.shutdown_grace, tasks.shutdown());
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
        let handed_over = handed.is_set();
        if !handed_over && let Some(n) = &notify {
            n.tell(&[State::Stopping]);
        }
        // The host's programs go back to their own resolvers before l4lb stops answering
        // (after a hand-over the successor answers them: the file stays).
        match managed {
            Some(guard) if handed_over => guard.hand_over(),
            Some(guard) => match guard.restore() {
                Ok(()) => tracing::info!("resolv.conf restored"),
                Err(e) => tracing::error!(error = %e, "cannot restore resolv.conf"),
            },
            None => {}
        }
        // The agent's own drain is bounded by `grace`; give it a little more before aborting.
        Ok(tasks.drain(grace + Duration::from_secs(5)).await?)
    }
}

/// The node while it is assembled: its tasks and the registry its parts register in.
struct Steps<'a> {
    cfg: &'a NodeConfig,
    tasks: Tasks,
    registry: Registry,
    /// Set once a successor has taken over: the parts then stop without removing anything.
    handed: HandedOver,
}

impl Steps<'_> {
    /// DNS listening: addresses kept on the link, sockets bound (unless `given`), the
    /// resolv.conf policy applied.
    async fn dns(
        &mut self,
        netif: &mut Netif,
        given: Option<DnsSockets>,
    ) -> Result<Listening, AppError> {
        listen::listen(&self.cfg.dns_listen, &self.cfg.dns, netif, given)
            .await
            .map_err(|e| AppError::classify(e.into()))
    }

    /// The forwarder and the agent that drives it, the interface and the DNS catalog.
    fn agent(
        &mut self,
        netif: Netif,
        catalog: DnsCatalog,
        label_errors: Family<ReasonLabel, Counter>,
        sockets: Sockets,
    ) -> (Agent, ForwardStats) {
        let forward_metrics = ForwardMetrics::new(&mut self.registry);
        let agent_metrics = AgentMetrics::new(&mut self.registry, label_errors);
        let forwarder = Forwarder::new(
            self.cfg.forward.clone(),
            forward_metrics,
            self.tasks.shutdown(),
        )
        .with_sockets(sockets);
        let stats = forwarder.stats();
        let agent = Agent::new(netif, forwarder, catalog, agent_metrics)
            .with_hand_over(self.handed.clone());
        (agent, stats)
    }

    /// The kernel path, where asked for and where it loads (the proxy runs in every mode),
    /// driven from the applied tables. Its counters, when it runs.
    fn kernel_path(&mut self, applied: &TableRx) -> Result<KernelStats, AppError> {
        let cfg = self.cfg;
        let kernel = cfg
            .data_plane
            .start(&cfg.bpf)
            .map_err(|e| AppError::from_bpf(e, "--data-plane bpf"))?;
        let plane = match kernel {
            Ok(_) => Plane::Kernel,
            Err(_) => Plane::Proxy,
        };
        tracing::info!(data_plane = plane.as_str(), requested = ?cfg.data_plane, "data plane chosen");
        let stats = KernelStats::new(
            &mut self.registry,
            kernel.as_ref().err().cloned(),
            applied.clone(),
        );
        let Ok(kp) = kernel else {
            return Ok(stats);
        };
        let (bpf, applied, ks, stop, handed) = (
            cfg.bpf.clone(),
            applied.clone(),
            stats.clone(),
            self.tasks.shutdown(),
            self.handed.clone(),
        );
        self.tasks.spawn(
            "kernel data path",
            async move { Ok(crate::agent::bpf::run(kp, &bpf, applied, ks, stop, handed).await?) }
                .instrument(tracing::info_span!("bpf")),
        );
        Ok(stats)
    }

    /// Serve DNS on the sockets `dns` holds until the serving group stops. Returns the
    /// resolv.conf guard, to restore the host's file first thing on shutdown.
    fn serve_dns(&mut self, dns: Listening, catalog: DnsCatalog) -> Option<ManagedResolvConf> {
        let metrics = DnsMetrics::new(&mut self.registry);
        let Listening {
            sockets,
            config,
            resolv_conf,
        } = dns;
        let stop = self.tasks.serving_stop();
        self.tasks.spawn_serving(
            "DNS server",
            async move {
                let (udp, tcp) = (sockets.udp, sockets.tcp);
                let limits = crate::agent::dns::ServerLimits::default();
                crate::agent::dns::serve(config, catalog, udp, tcp, metrics, stop, limits).await?;
                Ok(())
            }
            .instrument(tracing::info_span!("dns")),
        );
        resolv_conf
    }

    /// The table an earlier agent saved (if it is usable), and a task that saves this one's
    /// (removed at the end unless handed over); the saver too, to save for a successor.
    fn saved_table(&mut self, applied: TableRx) -> (Option<VipTable>, Option<SavedTable>) {
        let cfg = self.cfg;
        let saved = match SavedTable::at(&cfg.state_dir, &cfg.interface, cfg.saved_max) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no saved table: a restart waits for the source");
                return (None, None);
            }
        };
        let restored = saved.load().unwrap_or_else(|e| {
            tracing::warn!(error = %e, path = %saved.path().display(), "saved table ignored");
            None
        });
        let (stop, handed, keeper) = (self.tasks.shutdown(), self.handed.clone(), saved.clone());
        self.tasks.spawn("table saver", async move {
            keeper.keep(applied, stop, handed).await;
            Ok(())
        });
        (restored, Some(saved))
    }
}

/// What [`start_upgrades`] needs.
struct Upgrades {
    path: PathBuf,
    sockets: Sockets,
    successor: Option<Successor>,
    saved: Option<SavedTable>,
    applied: TableRx,
    handed: HandedOver,
    notify: Option<Arc<Notifier>>,
}

/// Once serving, tell the predecessor and systemd, then offer this agent's sockets to a
/// successor; start one on SIGUSR2.
fn start_upgrades(tasks: &mut Tasks, u: Upgrades) {
    let (shutdown, serving) = (tasks.shutdown(), tasks.serving_stop());
    let (notify, stop) = (u.notify.clone(), shutdown.clone());
    tasks.spawn(
        "hand-over",
        async move {
            let announced = upgrade::announce(
                u.successor,
                &u.sockets,
                u.applied.clone(),
                u.notify.as_deref(),
                &shutdown,
            )
            .await;
            if !announced {
                u.sockets.withdraw_all();
                return Ok(());
            }
            upgrade::serve_successors(
                u.path, u.sockets, u.saved, u.applied, u.handed, shutdown, serving,
            )
            .await
        }
        .instrument(tracing::info_span!("hand-over")),
    );
    match upgrade::own_exe() {
        Ok(exe) => {
            let args = upgrade::successor_args(std::env::args_os().skip(1));
            tasks.spawn(
                "reload signal",
                upgrade::reexec_on_usr2(exe, args, notify, stop),
            );
        }
        Err(e) => tracing::warn!(error = %e, "own executable unknown: SIGUSR2 cannot upgrade"),
    }
}

/// The API's state: `table` and the metrics in `registry` (its own series added), behind
/// `api`'s token, with the connection cap of `role`.
pub fn api_state(
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

/// Bind the API listener on `--api-listen`: the one place the API's socket is made.
pub async fn bind_api(cfg: &ApiConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot bind the API on {}", cfg.listen))
}

/// Serve `state` on `given` (else on a listener bound here) until the serving group stops.
pub async fn start_api(
    tasks: &mut Tasks,
    cfg: &ApiConfig,
    given: Option<TcpListener>,
    state: ApiState,
) -> Result<(), AppError> {
    let listener = match given {
        Some(l) => l,
        None => bind_api(cfg).await?,
    };
    let addr = listener.local_addr().context("API address")?;
    tracing::info!(%addr, "API listening");
    let stop = tasks.serving_stop();
    tasks.spawn_serving(
        "API server",
        async move { Ok(api::serve(listener, state, stop).await?) }
            .instrument(tracing::info_span!("api", %addr)),
    );
    Ok(())
}

/// Mark `ready` once `table` holds a version (built, or applied), unless shutdown comes first.
pub fn ready_on_first(tasks: &mut Tasks, mut table: TableRx, ready: Readiness, what: &'static str) {
    let stop = tasks.shutdown();
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
