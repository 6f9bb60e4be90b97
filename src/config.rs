//! The command line (clap; every flag also reads `L4LB_<FLAG>`) and its validation into one
//! [`Config`]: every flag and combination is checked, and every file it names (credentials,
//! tokens) read, before the runtime starts or anything on the host is touched. Errors here
//! exit 64. Names the settings types of the components it configures; none of them imports
//! this module.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::Url;

use crate::agent::bpf::{BpfConfig, DataPlane};
use crate::agent::dns::DnsConfig;
use crate::agent::dns::listen::ListenConfig;
use crate::agent::forward::ForwardConfig;
use crate::agent::netif::InterfaceKind;
use crate::labels::IpPolicy;
pub use crate::model::Secret;
pub use crate::model::wire::parse_duration;
use crate::source::acs::ServiceAccount;
use crate::source::controller_client::WatchConfig;
use crate::source::http::Auth;
use crate::source::state::{BuildConfig, DEFAULT_MAX_BACKENDS_PER_VIP};
use crate::tls::CaBundle;

/// A size in bytes: a bare number, or one with `K`/`KiB`, `M`/`MiB`, `G`/`GiB` (powers of
/// 1024), at least 1 KiB.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (use e.g. 128MiB, 64M, 1048576)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        _ => return Err(format!("{s:?}: unknown unit (use K, M or G)")),
    };
    let bytes = n
        .checked_mul(1usize << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < 1024 {
        return Err(format!("{s:?}: at least 1KiB"));
    }
    Ok(bytes)
}

/// A DNS server: `ip:port`, `[v6]:port`, or a bare address (port 53).
/// A count of at least one.
fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not an address or address:port"))
}

#[derive(Debug, Parser)]
#[command(
    name = "l4lb",
    version,
    about = "Layer-4 virtual-IP load balancer for Marathon clusters"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "L4LB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Runtime worker threads (default: one per CPU this process may run on). With 1, the
    /// whole process runs on one thread (tokio's current-thread scheduler, no work stealing).
    #[arg(long, global = true, env = "L4LB_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once at start and matched once: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch Marathon (or an apps file), build the VIP table and serve it to agents.
    Controller(ControllerArgs),
    /// Follow controllers; install VIPs, forward TCP/UDP and answer DNS on this host.
    Agent(AgentCmdArgs),
    /// Controller and agent in one process.
    Run(RunArgs),
    /// Print the VIP table an apps file yields and every rejected label; exit 1 if any.
    Check(CheckArgs),
    /// Show a running instance's VIP table for people.
    Vips(VipsArgs),
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub build: BuildArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct AgentCmdArgs {
    /// Controller base URL to follow (repeatable; fail over between them).
    #[arg(
        long = "controller",
        env = "L4LB_CONTROLLER",
        value_delimiter = ',',
        required = true
    )]
    pub controllers: Vec<Url>,
    /// How long one blocking watch on a controller may wait.
    #[arg(long, env = "L4LB_WATCH_WAIT", value_parser = parse_duration, default_value = "30s")]
    pub watch_wait: Duration,
    /// Longest controller answer read (`128MiB`, `64M`, bytes): a longer one is an error that
    /// keeps the last table.
    #[arg(long, env = "L4LB_MAX_ANSWER_SIZE", value_parser = parse_size, default_value = "128MiB")]
    pub max_answer_size: usize,
    /// This agent's name for spreading agents over the controllers (rendezvous hashing):
    /// agents with different names given the same --controller list divide evenly over it,
    /// and each comes back to the same one. Default: the hostname.
    #[arg(long, env = "L4LB_NODE_NAME")]
    pub node_name: Option<String>,
    /// When a controller this agent prefers comes back, return to it after a delay of this
    /// agent's own within this window, so its agents do not all return in the same second.
    #[arg(long, env = "L4LB_CONTROLLER_RETURN_SPREAD", value_parser = parse_duration, default_value = "30s")]
    pub controller_return_spread: Duration,
    /// Most backends one VIP may have in a controller's answer: an answer with more is an
    /// error that keeps the last table (controllers leave such VIPs out by their own
    /// --max-backends-per-vip, so only a broken or hostile one sends it).
    #[arg(long, env = "L4LB_MAX_BACKENDS_PER_VIP", default_value_t = DEFAULT_MAX_BACKENDS_PER_VIP, value_parser = parse_count)]
    pub max_backends_per_vip: usize,
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub build: BuildArgs,
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Apps file in Marathon's `GET /v2/apps?embed=apps.tasks` shape.
    #[arg(
        long,
        env = "L4LB_APPS_FILE",
        required_unless_present = "mesos_state_file"
    )]
    pub apps_file: Option<PathBuf>,
    /// A Mesos operator API `GET_STATE` answer, checked as the Mesos source reads it.
    #[arg(long, env = "L4LB_MESOS_STATE_FILE", conflicts_with = "apps_file")]
    pub mesos_state_file: Option<PathBuf>,
    #[command(flatten)]
    pub build: BuildArgs,
}

#[derive(Debug, Args)]
pub struct VipsArgs {
    /// API base URL of a running controller, agent or `l4lb run`.
    #[arg(long, env = "L4LB_API", default_value = "http://127.0.0.1:62080/")]
    pub api: Url,
    /// Bearer token file for an API that requires one.
    #[arg(long, env = "L4LB_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Print the raw JSON instead of the table.
    #[arg(long, env = "L4LB_JSON")]
    pub json: bool,
}

/// How the source (Marathon or the Mesos master) authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceAuthKind {
    None,
    Basic,
    Token,
    /// DC/OS strict mode: log in with a service account's secret.
    ServiceAccount,
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Marathon base URL (repeatable: several masters, fail over between them).
    #[arg(long = "marathon", env = "L4LB_MARATHON", value_delimiter = ',')]
    pub marathon: Vec<Url>,
    /// Read apps from this file (Marathon `/v2/apps?embed=apps.tasks` shape) instead of Marathon.
    #[arg(long, env = "L4LB_APPS_FILE", conflicts_with = "marathon")]
    pub apps_file: Option<PathBuf>,
    /// Mesos master base URL (repeatable; the leader is followed): every framework's tasks,
    /// Marathon's included, through the operator API. Not with --marathon or --apps-file
    /// (Mesos already sees Marathon's apps: one app must not become two VIPs).
    #[arg(long = "mesos", env = "L4LB_MESOS", value_delimiter = ',', conflicts_with_all = ["marathon", "apps_file"])]
    pub mesos: Vec<Url>,
    /// How often the apps file is checked for changes.
    #[arg(long, env = "L4LB_APPS_FILE_POLL", value_parser = parse_duration, default_value = "500ms")]
    pub apps_file_poll: Duration,
    /// How to authenticate to Marathon or the Mesos master (none, basic, token,
    /// service-account: DC/OS strict mode, logging in to the ACS). Default: none.
    #[arg(long, env = "L4LB_SOURCE_AUTH", value_enum)]
    pub source_auth: Option<SourceAuthKind>,
    /// File holding `user:password` (basic), the token (token) or a DC/OS service-account
    /// secret (service-account: JSON with uid, private_key, scheme RS256, login_endpoint).
    /// Never logged.
    #[arg(long, env = "L4LB_SOURCE_CREDENTIALS_FILE")]
    pub source_credentials_file: Option<PathBuf>,
    /// Credentials inline (prefer the env var over the flag: flags show in `ps`). Never logged.
    #[arg(long, env = "L4LB_SOURCE_CREDENTIALS", hide_env_values = true)]
    pub source_credentials: Option<Secret>,
    /// Timeout of one request to Marathon or the Mesos master. Default: 10s.
    #[arg(long, env = "L4LB_SOURCE_TIMEOUT", value_parser = parse_duration)]
    pub source_timeout: Option<Duration>,
    /// PEM bundle of CA certificates trusted for https:// masters and the service-account
    /// login, beside the system's (DC/OS serves https://master.mesos with its own CA).
    #[arg(long, env = "L4LB_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub old: OldSourceArgs,
    /// Longest Marathon or Mesos answer read (`256MiB`, `64M`, bytes): a longer one is an
    /// error that keeps the last good table. Parsing costs a multiple of the answer in memory,
    /// so this bounds the process's peak too.
    #[arg(long, env = "L4LB_MAX_ANSWER_SIZE", value_parser = parse_size, default_value = "128MiB")]
    pub max_answer_size: usize,
    /// Full re-read of Marathon this often, whatever the event stream says.
    #[arg(long, env = "L4LB_RESYNC_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub resync_interval: Duration,
}

/// The names the source flags had when Marathon was the only source, still read so existing
/// units keep working; hidden from `--help`. A new name given beside an old one wins.
#[derive(Debug, Args)]
pub struct OldSourceArgs {
    /// Old name of --source-auth.
    #[arg(long, env = "L4LB_MARATHON_AUTH", value_enum, hide = true)]
    pub marathon_auth: Option<SourceAuthKind>,
    /// Old name of --source-credentials-file.
    #[arg(long, env = "L4LB_MARATHON_CREDENTIALS_FILE", hide = true)]
    pub marathon_credentials_file: Option<PathBuf>,
    /// Old name of --source-credentials.
    #[arg(
        long,
        env = "L4LB_MARATHON_CREDENTIALS",
        hide_env_values = true,
        hide = true
    )]
    pub marathon_credentials: Option<Secret>,
    /// Old name of --source-timeout.
    #[arg(long, env = "L4LB_MARATHON_TIMEOUT", value_parser = parse_duration, hide = true)]
    pub marathon_timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Framework part of VIP names (`<label>.<framework>.l4lb.thisdcos.directory`), mangled as
    /// Mesos-DNS mangles framework names (`My_Framework` serves `my-framework`).
    #[arg(long, env = "L4LB_FRAMEWORK", default_value = "marathon")]
    pub framework: String,
    /// IPv4 range named VIPs get their addresses from.
    #[arg(long, env = "L4LB_VIP_CIDR", default_value = "11.0.0.0/8")]
    pub vip_cidr: Ipv4Net,
    /// IPv6 range for named VIPs whose backends include IPv6 addresses.
    #[arg(long, env = "L4LB_VIP_CIDR6", default_value = "fd01:c::/64")]
    pub vip_cidr6: Ipv6Net,
    /// Only IP VIPs inside these ranges are accepted (repeatable; default: any).
    #[arg(
        long = "allowed-vip-cidr",
        env = "L4LB_ALLOWED_VIP_CIDR",
        value_delimiter = ','
    )]
    pub allowed_vip_cidr: Vec<IpNet>,
    /// Accept IP VIPs in 127.0.0.0/8 and ::1 (tests, single-host setups).
    #[arg(long, env = "L4LB_ALLOW_LOOPBACK_VIPS")]
    pub allow_loopback_vips: bool,
    /// Most backends one VIP may have: a VIP with more is left out of the table and each
    /// label claiming it is rejected (shown in /v1/label-errors, counted as
    /// too_many_backends); the rest of the table is served.
    #[arg(long, env = "L4LB_MAX_BACKENDS_PER_VIP", default_value_t = DEFAULT_MAX_BACKENDS_PER_VIP, value_parser = parse_count)]
    pub max_backends_per_vip: usize,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Address the HTTP API (/v1/vips, /metrics, /healthz, /ready) listens on.
    #[arg(long, env = "L4LB_API_LISTEN", default_value = "127.0.0.1:62080")]
    pub api_listen: SocketAddr,
    /// Require `Authorization: Bearer <token>` (token read from this file) on /v1 and
    /// /metrics; agents send it to their controllers too.
    #[arg(long, env = "L4LB_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Most API connections at once (each agent's blocking query holds one); past it, health
    /// is still answered and the rest get a fast 503 with Retry-After. Default: a
    /// controller's follows the descriptor limit (whose soft value is raised to the hard one
    /// at start); an agent's takes 1/8 of it, leaving the rest to the data plane.
    #[arg(long, env = "L4LB_API_MAX_CONNECTIONS")]
    pub api_max_connections: Option<usize>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Link that holds the VIP addresses.
    #[arg(long, env = "L4LB_INTERFACE", default_value = "minuteman")]
    pub interface: String,
    /// dummy, bridge (for kernels without the dummy driver), auto (dummy, else bridge), or
    /// none (install nothing; serve only VIPs already local, e.g. 127.0.0.0/8).
    #[arg(long, env = "L4LB_INTERFACE_KIND", default_value = "auto")]
    pub interface_kind: InterfaceKind,
    /// DNS listen address (repeatable; UDP and TCP).
    #[arg(
        long = "dns-listen",
        env = "L4LB_DNS_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:5454"
    )]
    pub dns_listen: Vec<SocketAddr>,
    /// DNS zone of named VIPs.
    #[arg(long, env = "L4LB_ZONE", default_value = "l4lb.thisdcos.directory")]
    pub zone: String,
    /// TTL of VIP answers, seconds.
    #[arg(long, env = "L4LB_DNS_TTL", default_value_t = 5)]
    pub dns_ttl: u32,
    /// Forward names outside the zone to these servers, `ip` or `ip:port` (port 53 by
    /// default; repeatable); none: REFUSED.
    #[arg(long, env = "L4LB_DNS_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    pub dns_upstream: Vec<SocketAddr>,
    /// Answer SERVFAIL when no upstream has answered within this long.
    #[arg(long, env = "L4LB_DNS_UPSTREAM_TIMEOUT", value_parser = parse_duration, default_value = "2s")]
    pub dns_upstream_timeout: Duration,
    /// Without --dns-upstream, forward to the nameservers this file lists (l4lb's own
    /// port-53 listen addresses excepted).
    #[arg(long, env = "L4LB_DNS_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub dns_resolv_conf: PathBuf,
    /// Point --dns-resolv-conf at l4lb's port-53 listen addresses while running (search and
    /// options kept) and restore the original on exit.
    #[arg(long, env = "L4LB_DNS_MANAGE_RESOLV_CONF")]
    pub dns_manage_resolv_conf: bool,
    /// Do not answer task names under `.mesos`; forward them like other names (to a
    /// Mesos-DNS the cluster keeps). The DC/OS task zones are answered either way.
    #[arg(long, env = "L4LB_DNS_FORWARD_MESOS")]
    pub dns_forward_mesos: bool,
    /// Answers of forwarded names kept in the cache at most (least recently used go first;
    /// also bounded to 16 MiB; positive answers kept up to 1 h, negative ones up to 5 min,
    /// within their TTLs); 0: no cache.
    #[arg(long, env = "L4LB_DNS_CACHE_SIZE", default_value_t = crate::agent::dns::CacheConfig::default().entries)]
    pub dns_cache_size: usize,
    /// Give up on a backend connect after this long (counts against the backend).
    #[arg(long, env = "L4LB_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "1s")]
    pub connect_timeout: Duration,
    /// Other backends tried after a failed connect before the client is dropped.
    #[arg(long, env = "L4LB_CONNECT_RETRIES", default_value_t = 2)]
    pub connect_retries: u32,
    /// Close TCP connections idle this long (default off).
    #[arg(long, env = "L4LB_TCP_IDLE_TIMEOUT", value_parser = parse_duration)]
    pub tcp_idle_timeout: Option<Duration>,
    /// Close connections to draining or removed backends after this long (default: never).
    #[arg(long, env = "L4LB_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Refuse new TCP connections past this many open ones.
    #[arg(long, env = "L4LB_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Forget a UDP flow after this long without datagrams.
    #[arg(long, env = "L4LB_UDP_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub udp_idle_timeout: Duration,
    /// Most UDP flows at once; new flows past it are dropped.
    #[arg(long, env = "L4LB_MAX_UDP_SESSIONS", default_value_t = 65_536)]
    pub max_udp_sessions: usize,
    /// On SIGTERM, let open connections finish for this long.
    #[arg(long, env = "L4LB_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    /// Where VIP connections go: `auto` (bpf where it loads, else proxy, the reason logged),
    /// `bpf` (translated inside connect()/sendmsg() by eBPF programs; fail with exit 2 where
    /// they cannot load) or `proxy` (the splice forwarder only). The proxy listeners run in
    /// every mode and serve what the kernel path does not.
    #[arg(long, env = "L4LB_DATA_PLANE", default_value = "auto")]
    pub data_plane: DataPlane,
    /// cgroup2 directory the kernel path attaches to (default: the cgroup2 root, mounted at
    /// /run/l4lb/cgroup2 where none is mounted).
    #[arg(long, env = "L4LB_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Kernel path: act only on sockets of this agent's network namespace (for several
    /// agents on one kernel, each in its namespace; off on a real host, where containers in
    /// their own namespaces must be served too).
    #[arg(long, env = "L4LB_BPF_NETNS_ONLY")]
    pub bpf_netns_only: bool,
    /// Kernel path: names its pin directory /sys/fs/bpf/l4lb/<instance> (unique per agent
    /// on one kernel).
    #[arg(long, env = "L4LB_BPF_INSTANCE", default_value = "default")]
    pub bpf_instance: String,
    /// Kernel path: the BPF filesystem its pins go in (mounted there when none is). A killed
    /// agent's pins keep its programs serving until the next one takes over, so it must be
    /// a mount that outlives the agent (not one private to its mount namespace).
    #[arg(long, env = "L4LB_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Where the last applied table is saved (`<link>.<netns>.table.json`), so a restarted
    /// agent serves it at once, even with every controller down; removed on a clean stop.
    /// Under /run it does not outlive a reboot.
    #[arg(long, env = "L4LB_STATE_DIR", default_value = "/run/l4lb")]
    pub state_dir: PathBuf,
    /// Replace the agent running on this link with this one, losing nothing: take its
    /// listening sockets, link lock and table over a unix socket in --state-dir, serve, then
    /// tell it to stop accepting (it finishes its open connections within its
    /// --shutdown-grace and exits, removing nothing). Nothing running: start as usual.
    #[arg(long, env = "L4LB_TAKE_OVER")]
    pub take_over: bool,
    /// Kernel path: how often each TCP backend is probed (a connect, then close).
    #[arg(long, env = "L4LB_BPF_PROBE_INTERVAL", value_parser = parse_duration, default_value = "500ms")]
    pub bpf_probe_interval: Duration,
}

/// Invalid configuration (exit 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("give one of --marathon, --mesos or --apps-file")]
    NoSource,
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--source-auth {0:?} needs --source-credentials-file or L4LB_SOURCE_CREDENTIALS")]
    MissingCredentials(SourceAuthKind),
    #[error("basic credentials must look like user:password")]
    BadBasic,
    #[error("service-account secret {what}: {source}")]
    ServiceAccount {
        what: String,
        #[source]
        source: crate::source::acs::SecretError,
    },
    #[error("--ca-file {0}")]
    Ca(#[source] crate::tls::CaError),
    #[error("{what} {path} is empty")]
    EmptySecret { what: &'static str, path: PathBuf },
    #[error("{0}")]
    Invalid(String),
}

/// Where tables come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    Marathon {
        masters: Vec<Url>,
        auth: Auth,
        timeout: Duration,
        resync: Duration,
        max_answer: usize,
        ca: Option<CaBundle>,
    },
    File {
        path: PathBuf,
        poll: Duration,
    },
    Mesos {
        masters: Vec<Url>,
        auth: Auth,
        timeout: Duration,
        max_answer: usize,
        ca: Option<CaBundle>,
    },
}

impl SourceArgs {
    /// The auth kind, credentials file, inline credentials and timeout, each by its new name
    /// or else its old one.
    fn access(&self) -> (SourceAuthKind, Option<&PathBuf>, Option<&Secret>, Duration) {
        let old = &self.old;
        (
            self.source_auth
                .or(old.marathon_auth)
                .unwrap_or(SourceAuthKind::None),
            self.source_credentials_file
                .as_ref()
                .or(old.marathon_credentials_file.as_ref()),
            self.source_credentials
                .as_ref()
                .or(old.marathon_credentials.as_ref()),
            self.source_timeout
                .or(old.marathon_timeout)
                .unwrap_or(Duration::from_secs(10)),
        )
    }

    pub fn validate(&self) -> Result<SourceConfig, ConfigError> {
        let (auth_kind, creds_file, creds_inline, timeout) = self.access();
        if let Some(path) = &self.apps_file {
            if auth_kind != SourceAuthKind::None || creds_file.is_some() || creds_inline.is_some() {
                return Err(ConfigError::Invalid(
                    "source credentials given with --apps-file, which needs none".into(),
                ));
            }
            if self.ca_file.is_some() {
                return Err(ConfigError::Invalid(
                    "--ca-file given with --apps-file, which makes no request".into(),
                ));
            }
            return Ok(SourceConfig::File {
                path: path.clone(),
                poll: self.apps_file_poll,
            });
        }
        if self.marathon.is_empty() && self.mesos.is_empty() {
            return Err(ConfigError::NoSource);
        }
        let creds = match (creds_file, creds_inline) {
            (Some(p), _) => Some((read_secret(p, "credentials file")?, p.display().to_string())),
            (None, Some(c)) => Some((
                c.expose().trim().to_string(),
                "L4LB_SOURCE_CREDENTIALS".to_string(),
            )),
            (None, None) => None,
        };
        let auth = match (auth_kind, creds) {
            (SourceAuthKind::None, _) => Auth::None,
            (k, None) => return Err(ConfigError::MissingCredentials(k)),
            (SourceAuthKind::Basic, Some((c, _))) => {
                let (user, password) = c.split_once(':').ok_or(ConfigError::BadBasic)?;
                Auth::Basic {
                    user: user.to_string(),
                    password: Secret::from(password),
                }
            }
            (SourceAuthKind::Token, Some((c, _))) => Auth::Token(Secret::from(c)),
            (SourceAuthKind::ServiceAccount, Some((c, what))) => Auth::ServiceAccount(
                ServiceAccount::from_secret(&c)
                    .map_err(|source| ConfigError::ServiceAccount { what, source })?,
            ),
        };
        let ca = self
            .ca_file
            .as_deref()
            .map(CaBundle::read)
            .transpose()
            .map_err(ConfigError::Ca)?;
        if !self.mesos.is_empty() {
            for u in &self.mesos {
                http_url("--mesos", u)?;
            }
            return Ok(SourceConfig::Mesos {
                masters: self.mesos.iter().map(with_trailing_slash).collect(),
                auth,
                timeout,
                max_answer: self.max_answer_size,
                ca,
            });
        }
        for u in &self.marathon {
            http_url("--marathon", u)?;
        }
        Ok(SourceConfig::Marathon {
            masters: self.marathon.iter().map(with_trailing_slash).collect(),
            auth,
            timeout,
            resync: self.resync_interval,
            max_answer: self.max_answer_size,
            ca,
        })
    }
}

impl BuildArgs {
    pub fn validate(&self) -> Result<BuildConfig, ConfigError> {
        let framework = crate::labels::mangle(&self.framework);
        if framework.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "--framework {:?} has no letter or digit to make a DNS name of",
                self.framework
            )));
        }
        Ok(BuildConfig {
            framework,
            policy: IpPolicy {
                allow_loopback: self.allow_loopback_vips,
                allowed: self.allowed_vip_cidr.clone(),
            },
            vip_cidr: self.vip_cidr,
            vip_cidr6: self.vip_cidr6,
            max_backends_per_vip: self.max_backends_per_vip,
        })
    }
}

impl ApiArgs {
    pub fn validate(&self) -> Result<ApiConfig, ConfigError> {
        if self.api_max_connections == Some(0) {
            return Err(ConfigError::Invalid(
                "--api-max-connections must be at least 1".into(),
            ));
        }
        Ok(ApiConfig {
            listen: self.api_listen,
            token: token_file(self.api_token_file.as_ref())?,
            max_connections: self.api_max_connections,
        })
    }
}

fn token_file(path: Option<&PathBuf>) -> Result<Option<Secret>, ConfigError> {
    path.map(|p| read_secret(p, "API token file").map(Secret::from))
        .transpose()
}

/// `http://` or `https://` with a host: anything else is a typo that would only show up
/// later as a request error.
fn http_url(flag: &str, u: &Url) -> Result<(), ConfigError> {
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::Invalid(format!(
            "{flag} {u}: expected an http:// or https:// URL with a host"
        )));
    }
    Ok(())
}

/// A DNS zone: labels of `[a-z0-9-]`, 1–63 characters, not starting or ending with `-`, 253
/// characters in all. Returned lowercased, without a trailing dot.
fn dns_zone(z: &str) -> Result<String, ConfigError> {
    let zone = z.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if zone.is_empty() || zone.len() > 253 || !zone.split('.').all(label_ok) {
        return Err(ConfigError::Invalid(format!(
            "--zone {z:?} is not a DNS name"
        )));
    }
    Ok(zone)
}

/// A link name the kernel takes: 1–15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
fn link_name(name: &str) -> Result<(), ConfigError> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(ConfigError::Invalid(format!(
            "--interface {name:?} is not a valid link name (1-15 characters, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

fn positive(flag: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::Invalid(format!(
            "{flag} must be longer than 0"
        )));
    }
    Ok(d)
}

fn at_least_one(flag: &str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(ConfigError::Invalid(format!("{flag} must be at least 1")));
    }
    Ok(n)
}

impl AgentArgs {
    pub fn validate(&self) -> Result<NodeConfig, ConfigError> {
        if self.interface_kind != InterfaceKind::None {
            link_name(&self.interface)?;
        }
        if self.dns_listen.is_empty() {
            return Err(ConfigError::Invalid(
                "give at least one --dns-listen".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for a in &self.dns_listen {
            if a.port() != 0 && !seen.insert(*a) {
                return Err(ConfigError::Invalid(format!(
                    "--dns-listen {a} given twice"
                )));
            }
        }
        if self.dns_manage_resolv_conf && !self.dns_listen.iter().any(|a| a.port() == 53) {
            return Err(ConfigError::Invalid(format!(
                "--dns-manage-resolv-conf: {}",
                crate::agent::dns::resolv::ResolvError::NoPort53
            )));
        }
        for u in &self.dns_upstream {
            if self.dns_listen.contains(u) {
                return Err(ConfigError::Invalid(format!(
                    "--dns-upstream {u} is one of l4lb's own --dns-listen addresses (a forwarding loop)"
                )));
            }
        }
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "--state-dir {}: not an absolute path",
                self.state_dir.display()
            )));
        }
        Ok(NodeConfig {
            interface: self.interface.clone(),
            interface_kind: self.interface_kind,
            state_dir: self.state_dir.clone(),
            take_over: self.take_over,
            saved_max: DEFAULT_SAVED_MAX,
            dns_listen: ListenConfig {
                addrs: self.dns_listen.clone(),
                resolv_conf: self.dns_resolv_conf.clone(),
                manage_resolv_conf: self.dns_manage_resolv_conf,
            },
            dns: DnsConfig {
                zone: dns_zone(&self.zone)?,
                ttl: self.dns_ttl,
                upstreams: self.dns_upstream.clone(),
                upstream_timeout: positive("--dns-upstream-timeout", self.dns_upstream_timeout)?,
                mesos: !self.dns_forward_mesos,
                cache: crate::agent::dns::CacheConfig {
                    entries: self.dns_cache_size,
                    ..Default::default()
                },
            },
            forward: ForwardConfig {
                connect_timeout: positive("--connect-timeout", self.connect_timeout)?,
                connect_retries: self.connect_retries,
                tcp_idle_timeout: self
                    .tcp_idle_timeout
                    .map(|d| positive("--tcp-idle-timeout", d))
                    .transpose()?,
                drain_timeout: self.drain_timeout,
                max_connections: at_least_one("--max-connections", self.max_connections)?,
                udp_idle_timeout: positive("--udp-idle-timeout", self.udp_idle_timeout)?,
                max_udp_sessions: at_least_one("--max-udp-sessions", self.max_udp_sessions)?,
            },
            shutdown_grace: self.shutdown_grace,
            data_plane: self.data_plane,
            bpf: self.bpf_config()?,
        })
    }
}

impl AgentArgs {
    fn bpf_config(&self) -> Result<BpfConfig, ConfigError> {
        let i = &self.bpf_instance;
        if i.is_empty()
            || i.len() > 64
            || i == "."
            || i == ".."
            || !i
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ConfigError::Invalid(format!(
                "--bpf-instance {i:?}: 1 to 64 of [A-Za-z0-9._-], not . or .."
            )));
        }
        if self.data_plane != DataPlane::Proxy
            && let Some(cg) = &self.cgroup
            && !cg.is_dir()
        {
            return Err(ConfigError::Invalid(format!(
                "--cgroup {}: not a directory",
                cg.display()
            )));
        }
        if !self.bpffs.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "--bpffs {}: not an absolute path",
                self.bpffs.display()
            )));
        }
        Ok(BpfConfig {
            instance: i.clone(),
            cgroup: self.cgroup.clone(),
            bpffs: self.bpffs.clone(),
            netns_only: self.bpf_netns_only,
            probe_interval: positive("--bpf-probe-interval", self.bpf_probe_interval)?,
            probe_timeout: self.connect_timeout,
            drain_timeout: self.drain_timeout,
            ..BpfConfig::default()
        })
    }
}

impl AgentCmdArgs {
    pub fn validate(&self) -> Result<AgentConfig, ConfigError> {
        for u in &self.controllers {
            http_url("--controller", u)?;
        }
        let api = self.api.validate()?;
        let mut node = self.agent.validate()?;
        node.saved_max = self.max_answer_size as u64;
        Ok(AgentConfig {
            watch: WatchConfig {
                controllers: self.controllers.iter().map(with_trailing_slash).collect(),
                wait: positive("--watch-wait", self.watch_wait)?,
                token: api.token.clone(),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(2),
                max_answer: self.max_answer_size,
                max_backends_per_vip: self.max_backends_per_vip,
                identity: match &self.node_name {
                    Some(n) if !n.is_empty() => n.clone(),
                    Some(_) => return Err(ConfigError::Invalid("--node-name is empty".into())),
                    // The kernel's hostname (uname), as `hostname` prints it.
                    None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .map(|h| h.trim().to_string())
                        .unwrap_or_default(),
                },
                return_spread: self.controller_return_spread,
                return_check: Duration::from_secs(5).min(
                    self.controller_return_spread
                        .max(Duration::from_millis(500)),
                ),
            },
            node,
            api,
        })
    }
}

impl Cli {
    /// Check everything and read every file the flags name; nothing is created or bound.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mode = match &self.command {
            Command::Controller(a) => Mode::Controller(ControllerConfig {
                source: a.source.validate()?,
                build: a.build.validate()?,
                api: a.api.validate()?,
            }),
            Command::Agent(a) => Mode::Agent(a.validate()?),
            Command::Run(a) => Mode::Run(RunConfig {
                source: a.source.validate()?,
                build: a.build.validate()?,
                node: NodeConfig {
                    saved_max: a.source.max_answer_size as u64,
                    ..a.agent.validate()?
                },
                api: a.api.validate()?,
            }),
            Command::Check(a) => Mode::Check(CheckConfig {
                file: match (&a.apps_file, &a.mesos_state_file) {
                    (Some(p), _) => CheckFile::Apps(p.clone()),
                    (None, Some(p)) => CheckFile::MesosState(p.clone()),
                    (None, None) => return Err(ConfigError::NoSource),
                },
                build: a.build.validate()?,
            }),
            Command::Vips(a) => {
                http_url("--api", &a.api)?;
                Mode::Vips(VipsConfig {
                    api: with_trailing_slash(&a.api),
                    token: token_file(a.api_token_file.as_ref())?,
                    json: a.json,
                })
            }
        };
        Ok(Config {
            log_format: self.log_format,
            worker_threads: self.worker_threads,
            mode,
        })
    }
}

/// The whole validated configuration of one `l4lb` invocation.
#[derive(Debug, Clone)]
pub struct Config {
    pub log_format: LogFormat,
    /// Runtime workers; `None`: one per CPU, 1: the current-thread scheduler.
    pub worker_threads: Option<NonZeroUsize>,
    pub mode: Mode,
}

/// What this invocation runs.
#[derive(Debug, Clone)]
pub enum Mode {
    Controller(ControllerConfig),
    Agent(AgentConfig),
    Run(RunConfig),
    Check(CheckConfig),
    Vips(VipsConfig),
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub source: SourceConfig,
    pub build: BuildConfig,
    pub api: ApiConfig,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub watch: WatchConfig,
    pub node: NodeConfig,
    pub api: ApiConfig,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub build: BuildConfig,
    pub node: NodeConfig,
    pub api: ApiConfig,
}

/// The saved table's size cap where no answer cap applies.
const DEFAULT_SAVED_MAX: u64 = 128 << 20;

/// What an agent (or `run`) serves on its host: the VIP interface, DNS and the forwarder.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub interface: String,
    pub interface_kind: InterfaceKind,
    /// Where the last applied table is saved (and the hand-over socket listens).
    pub state_dir: PathBuf,
    /// Replace the agent running on this link (`--take-over`).
    pub take_over: bool,
    /// A larger saved table is not read (the answer cap of the agent's source).
    pub saved_max: u64,
    /// Where DNS listens, and the resolv.conf its upstreams may come from.
    pub dns_listen: ListenConfig,
    /// `upstreams` empty: taken from `dns_listen.resolv_conf` at start.
    pub dns: DnsConfig,
    pub forward: ForwardConfig,
    pub shutdown_grace: Duration,
    pub data_plane: DataPlane,
    pub bpf: BpfConfig,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Required (and, by agents, sent) as `Authorization: Bearer`.
    pub token: Option<Secret>,
    /// `--api-max-connections` (`None`: follow the descriptor limit).
    pub max_connections: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub file: CheckFile,
    pub build: BuildConfig,
}

/// What `l4lb check` reads.
#[derive(Debug, Clone)]
pub enum CheckFile {
    /// Marathon's `GET /v2/apps?embed=apps.tasks` shape.
    Apps(PathBuf),
    /// A Mesos operator API `GET_STATE` answer.
    MesosState(PathBuf),
}

#[derive(Debug, Clone)]
pub struct VipsConfig {
    pub api: Url,
    pub token: Option<Secret>,
    pub json: bool,
}

/// Read a secret file, trimmed; an empty one is an error (an empty token would be a
/// password anyone can guess). The content is never logged.
fn read_secret(path: &PathBuf, what: &'static str) -> Result<String, ConfigError> {
    let s = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        what,
        path: path.clone(),
        source,
    })?;
    match s.trim() {
        "" => Err(ConfigError::EmptySecret {
            what,
            path: path.clone(),
        }),
        t => Ok(t.to_string()),
    }
}

/// `Url::join` treats a base without a trailing slash as a file: make every base a directory.
pub fn with_trailing_slash(u: &Url) -> Url {
    let mut u = u.clone();
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `l4lb controller <args>` parsed: the controller's arguments.
    fn controller(args: &[&str]) -> ControllerArgs {
        let argv = ["l4lb", "controller"].iter().chain(args);
        let Command::Controller(c) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not the controller")
        };
        c
    }
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_help_and_an_env_var() {
        fn walk(cmd: &clap::Command) {
            for a in cmd.get_arguments() {
                let Some(long) = a.get_long() else { continue };
                if ["help", "version"].contains(&long) {
                    continue;
                }
                assert!(
                    a.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "{} --{long} has no help",
                    cmd.get_name()
                );
                let want = format!("L4LB_{}", long.to_uppercase().replace('-', "_"));
                assert_eq!(
                    a.get_env().and_then(|e| e.to_str()),
                    Some(want.as_str()),
                    "{} --{long}",
                    cmd.get_name(),
                );
            }
            for sub in cmd.get_subcommands() {
                walk(sub);
            }
        }
        walk(&Cli::command());
    }

    /// `controller --marathon m1` with `extra` flags: its source's auth and timeout.
    fn source_access(extra: &[&str]) -> Result<(Auth, Duration), ConfigError> {
        let mut args = vec!["l4lb", "controller", "--marathon", "http://m1:8080"];
        args.extend_from_slice(extra);
        let Command::Controller(c) = Cli::try_parse_from(args).unwrap().command else {
            panic!()
        };
        match c.source.validate()? {
            SourceConfig::Marathon { auth, timeout, .. } => Ok((auth, timeout)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn service_account_is_an_auth_kind_by_either_name() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret.json");
        std::fs::write(
            &secret,
            r#"{"scheme": "RS256", "private_key": "x", "login_endpoint": "https://m/acs"}"#,
        )
        .unwrap();
        let file = secret.to_str().unwrap();
        for (auth, creds) in [
            ("--source-auth", "--source-credentials-file"),
            ("--marathon-auth", "--marathon-credentials-file"),
        ] {
            let e = source_access(&[auth, "service-account", creds, file]).unwrap_err();
            assert!(
                matches!(&e, ConfigError::ServiceAccount { .. }),
                "{auth}: {e}"
            );
            assert_eq!(
                e.to_string(),
                format!("service-account secret {file}: missing field \"uid\"")
            );
        }
        let e = source_access(&["--ca-file", "/nonexistent/ca.pem"]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--ca-file cannot read /nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn source_flags_have_neutral_names_and_still_take_the_old_ones() {
        let token = |a: &Auth| match a {
            Auth::Token(t) => t.expose().to_string(),
            other => panic!("{other:?}"),
        };
        let (auth, timeout) = source_access(&[]).unwrap();
        assert!(matches!(auth, Auth::None));
        assert_eq!(timeout, Duration::from_secs(10));
        let new = ["--source-auth", "token", "--source-credentials", "t1"];
        let (auth, timeout) =
            source_access(&[&new[..], &["--source-timeout", "3s"]].concat()).unwrap();
        assert_eq!(
            (token(&auth), timeout),
            ("t1".into(), Duration::from_secs(3))
        );
        let old = ["--marathon-auth", "token", "--marathon-credentials", "t2"];
        let (auth, timeout) =
            source_access(&[&old[..], &["--marathon-timeout", "4s"]].concat()).unwrap();
        assert_eq!(
            (token(&auth), timeout),
            ("t2".into(), Duration::from_secs(4))
        );
        // A new name beside an old one wins; the old one fills what the new ones leave out.
        let (auth, timeout) = source_access(&[
            "--marathon-auth",
            "basic",
            "--source-auth",
            "token",
            "--marathon-credentials",
            "t3",
            "--marathon-timeout",
            "5s",
            "--source-timeout",
            "6s",
        ])
        .unwrap();
        assert_eq!(
            (token(&auth), timeout),
            ("t3".into(), Duration::from_secs(6))
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("creds");
        std::fs::write(&file, "u:pw\n").unwrap();
        let file = file.to_str().unwrap();
        for flag in ["--source-credentials-file", "--marathon-credentials-file"] {
            let (auth, _) = source_access(&["--source-auth", "basic", flag, file]).unwrap();
            assert!(
                matches!(&auth, Auth::Basic { user, password } if user == "u" && password.expose() == "pw"),
                "{flag}: {auth:?}"
            );
        }
        assert!(matches!(
            source_access(&["--marathon-auth", "basic"]),
            Err(ConfigError::MissingCredentials(SourceAuthKind::Basic))
        ));
        // The old names are hidden from --help.
        let help = Cli::command()
            .find_subcommand_mut("controller")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--source-auth"), "{help}");
        assert!(!help.contains("--marathon-auth"), "{help}");
        assert!(!help.contains("L4LB_MARATHON_TIMEOUT"), "{help}");
    }

    #[test]
    fn secrets_never_in_debug() {
        let cli = Cli::try_parse_from([
            "l4lb",
            "controller",
            "--marathon",
            "http://m1:8080",
            "--source-auth",
            "basic",
            "--source-credentials",
            "u:hunter2",
        ])
        .unwrap();
        let shown = format!("{cli:?}");
        assert!(shown.contains("source_credentials"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let Command::Controller(c) = cli.command else {
            panic!()
        };
        let SourceConfig::Marathon { auth, .. } = c.source.validate().unwrap() else {
            panic!()
        };
        assert!(matches!(&auth, Auth::Basic { password, .. } if password.expose() == "hunter2"));
        assert!(!format!("{auth:?}").contains("hunter2"));
    }

    #[test]
    fn data_plane_flags() {
        let node = |extra: &[&str]| {
            let mut args = vec!["l4lb", "agent", "--controller", "http://c1:62080"];
            args.extend_from_slice(extra);
            let cli = Cli::try_parse_from(args).unwrap();
            let Command::Agent(a) = cli.command else {
                panic!()
            };
            a.validate().map(|c| c.node)
        };
        let n = node(&[]).unwrap();
        assert_eq!(
            n.data_plane,
            DataPlane::Auto,
            "the kernel path where it loads"
        );
        assert_eq!(n.bpf.instance, "default");
        assert!(!n.bpf.netns_only);
        let n = node(&[
            "--data-plane",
            "bpf",
            "--bpf-netns-only",
            "--bpf-instance",
            "h1",
            "--cgroup",
            "/",
            "--bpffs",
            "/run/l4lb/bpffs",
        ])
        .unwrap();
        assert_eq!(n.data_plane, DataPlane::Bpf);
        assert_eq!(n.bpf.instance, "h1");
        assert_eq!(n.bpf.bpffs, std::path::Path::new("/run/l4lb/bpffs"));
        assert_eq!(n.bpf.cgroup.as_deref(), Some(std::path::Path::new("/")));
        assert!(n.bpf.netns_only);
        for bad in [
            &["--bpf-instance", ""][..],
            &["--bpf-instance", ".."],
            &["--bpf-instance", "a/b"],
            &["--data-plane", "auto", "--cgroup", "/nonexistent/l4lb"],
            &["--bpf-probe-interval", "0s"],
            &["--bpffs", "relative/bpffs"],
        ] {
            assert!(
                matches!(node(bad), Err(ConfigError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
        // A --cgroup the proxy never uses is not checked.
        assert!(node(&["--data-plane", "proxy", "--cgroup", "/nonexistent/l4lb"]).is_ok());
        assert!(
            node(&["--cgroup", "/nonexistent/l4lb"]).is_err(),
            "auto uses it"
        );
    }

    #[test]
    fn empty_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  \n").unwrap();
        assert!(matches!(
            read_secret(&p, "API token file"),
            Err(ConfigError::EmptySecret { .. })
        ));
        std::fs::write(&p, " tok\n").unwrap();
        assert_eq!(read_secret(&p, "API token file").unwrap(), "tok");
    }

    #[test]
    fn upstreams() {
        let ok = |s: &str| parse_upstream(s).unwrap().to_string();
        assert_eq!(ok("198.18.0.53"), "198.18.0.53:53");
        assert_eq!(ok("198.18.0.53:5353"), "198.18.0.53:5353");
        assert_eq!(ok("fd00::53"), "[fd00::53]:53");
        assert_eq!(ok("[fd00::53]"), "[fd00::53]:53");
        assert_eq!(ok("[fd00::53]:5353"), "[fd00::53]:5353");
        assert!(parse_upstream("dns.example").is_err());
        assert!(parse_upstream("1.2.3.4:99999").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "12", "1T", "MiB", "-1M", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5x").is_err());
        // Too large for a Duration: an error, not an overflow.
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn every_subcommand_parses_with_defaults() {
        for args in [
            vec!["l4lb", "run", "--apps-file", "x"],
            vec![
                "l4lb",
                "run",
                "--apps-file",
                "x",
                "--tcp-idle-timeout",
                "5m",
                "--drain-timeout",
                "30s",
            ],
            vec!["l4lb", "agent", "--controller", "http://c1:62080"],
            vec!["l4lb", "controller", "--marathon", "http://m1:8080"],
            vec!["l4lb", "check", "--apps-file", "x"],
            vec!["l4lb", "vips"],
        ] {
            Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }

    #[test]
    fn framework_names_are_mangled_not_refused() {
        for (given, want) in [
            ("marathon", Some("marathon")),
            ("My_Framework", Some("my-framework")),
            ("data.Cassandra", Some("data.cassandra")),
            ("___", None),
        ] {
            let c = controller(&["--marathon", "http://m1", "--framework", given]);
            let got = c.build.validate().ok().map(|b| b.framework);
            assert_eq!(got.as_deref(), want, "{given}");
        }
    }

    #[test]
    fn sources() {
        let c = controller(&[
            "--marathon",
            "http://m1:8080",
            "--marathon",
            "http://m2:8080/marathon",
        ]);
        let SourceConfig::Marathon { masters, .. } = c.source.validate().unwrap() else {
            panic!()
        };
        assert_eq!(masters[1].as_str(), "http://m2:8080/marathon/");
        let c = controller(&[]);
        assert!(matches!(c.source.validate(), Err(ConfigError::NoSource)));
        let c = controller(&[
            "--marathon",
            "http://m1",
            "--marathon-auth",
            "basic",
            "--marathon-credentials",
            "nocolon",
        ]);
        assert!(matches!(c.source.validate(), Err(ConfigError::BadBasic)));
        let c = controller(&[
            "--mesos",
            "http://m1:5050,http://m2:5050",
            "--marathon-auth",
            "token",
            "--marathon-credentials",
            "t0k",
        ]);
        let SourceConfig::Mesos { masters, auth, .. } = c.source.validate().unwrap() else {
            panic!()
        };
        assert_eq!(masters.len(), 2);
        assert!(matches!(auth, Auth::Token(t) if t.expose() == "t0k"));
        // Marathon's apps through both sources would be two VIPs: refused.
        for other in [["--marathon", "http://m1:8080"], ["--apps-file", "x"]] {
            let args = [
                "l4lb",
                "controller",
                "--mesos",
                "http://m1:5050",
                other[0],
                other[1],
            ];
            assert!(Cli::try_parse_from(args).is_err(), "{other:?}");
        }
    }
}
