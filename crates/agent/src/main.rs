//! `weir-agent`: the reference agent. Watches a policy directory, serves the CNI plugin and the
//! CLI on a unix socket, and enforces policy in the kernel with the datapath backend chosen at
//! build time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::sync::Mutex;
use tracing::{info, warn};
use weir_agent::api::AgentApi;
use weir_agent::manager::{Manager, ManagerConfig};
use weir_agent::policy_source::{DirectorySource, PolicyEvent, PolicySource};
use weir_agent_api::v1::{
    endpoint_service_server::EndpointServiceServer, inspect_service_server::InspectServiceServer,
    status_service_server::StatusServiceServer,
};
use weir_datapath::Datapath;

#[cfg(not(any(feature = "aya", feature = "libbpf")))]
compile_error!(
    "weir-agent needs a datapath backend: build with the `aya` feature (the default) or `libbpf`"
);

/// The datapath this binary carries: aya when built with it, else libbpf.
#[cfg(feature = "aya")]
mod backend {
    pub use weir_datapath_aya::AyaDatapath as Kernel;
    /// Reported by `weir status`.
    pub const NAME: &str = "aya";
}
#[cfg(all(feature = "libbpf", not(feature = "aya")))]
mod backend {
    pub use weir_datapath_libbpf::LibbpfDatapath as Kernel;
    /// Reported by `weir status`.
    pub const NAME: &str = "libbpf";
}

#[derive(Parser, Debug)]
#[command(
    name = "weir-agent",
    version,
    about = "The Weir agent",
    // Settings from the configuration files come first; a flag given again overrides them.
    args_override_self = true
)]
struct Args {
    /// A YAML file of settings keyed by the long flag names (`policy-dir: /etc/weir/policies`).
    /// Precedence: defaults < --config-dir < --config < flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A directory with one file per setting, named after the flag and holding its value
    /// (a mounted ConfigMap, as Cilium's --config-dir).
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Where endpoints and identities are persisted across restarts.
    #[arg(long, default_value = "/var/lib/weir/agent")]
    state_dir: PathBuf,
    /// Directory on a bpffs for pinned maps and programs (mounted if it is not on one).
    #[arg(long, default_value = "/sys/fs/bpf/weir")]
    bpffs: PathBuf,
    /// The API's unix socket (mode 0600).
    #[arg(long, default_value = weir_agent_api::DEFAULT_SOCKET_PATH)]
    api_socket: PathBuf,
    /// Directory of policy YAML files, watched.
    #[arg(long, default_value = "/etc/weir/policies")]
    policy_dir: PathBuf,
    /// Cluster name.
    #[arg(long, default_value = "default")]
    cluster_name: String,
    /// JSON file with the labels of each namespace: {"production": {"env": "prod"}}.
    #[arg(long)]
    namespace_labels: Option<PathBuf>,
    /// An address of this node (repeatable): it gets the `host` identity.
    #[arg(long = "node-address")]
    node_addresses: Vec<std::net::IpAddr>,
    /// The node's pod CIDR (repeatable, one per family): endpoints with an address outside
    /// it are refused. Unset: any address.
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<ipnet::IpNet>,
    /// How often the policy directory is checked, in milliseconds.
    #[arg(long, default_value_t = 200)]
    policy_poll_ms: u64,
    /// Do not run the HTTP and DNS proxies (connections the policy redirects then drop:
    /// the datapath fails closed).
    #[arg(long)]
    no_proxies: bool,
    /// Do not install the policy-routing rule for proxy-marked packets (when the node's
    /// provisioning already did).
    #[arg(long)]
    no_proxy_routing: bool,
    /// The Observer (Hubble) API's unix socket, mode 0600 (default: `hubble.sock` beside the
    /// API socket, /run/weir/hubble.sock by default).
    #[arg(long)]
    hubble_socket: Option<PathBuf>,
    /// Also serve the Observer API on this TCP address (Hubble uses port 4244), no TLS.
    #[arg(long)]
    hubble_listen: Option<std::net::SocketAddr>,
    /// How many flows the observer keeps.
    #[arg(long, default_value_t = weir_observe::DEFAULT_CAPACITY)]
    hubble_ring_size: usize,
    /// The Prometheus metrics address.
    #[arg(long, default_value = weir_observe::http::DEFAULT_METRICS_ADDR)]
    metrics_listen: std::net::SocketAddr,
    /// Do not serve metrics.
    #[arg(long)]
    no_metrics: bool,
    /// The node name flows carry (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Do not read the datapath's verdict events: no L3/L4 flows (what turning Hubble off
    /// gives). The programs still try to emit them; the unread ring fills and each attempt
    /// stops at its lockless free-space check, counted as lost.
    #[arg(long)]
    no_flow_export: bool,
    /// DNS answers open access for at least this many seconds, whatever their TTL (Cilium's
    /// flag; 0 honours the answers' TTLs).
    #[arg(long, default_value_t = 0)]
    tofqdns_min_ttl: u32,
    /// At most this many addresses per name and endpoint; the least recently answered go
    /// beyond it (Cilium's flag).
    #[arg(long, default_value_t = weir_dns_proxy::CacheConfig::default().max_ips_per_name)]
    tofqdns_endpoint_max_ip_per_hostname: usize,
    /// How long an expired address stays open after its last live connection was seen:
    /// seconds, or a number with `s`, `m` or `h` (Cilium's flag, a Go duration there).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    tofqdns_idle_connection_grace_period: Duration,
}

/// The DNS name cache's limits from the `--tofqdns-*` flags.
fn fqdn_cache_config(args: &Args) -> weir_dns_proxy::CacheConfig {
    weir_dns_proxy::CacheConfig {
        min_ttl: Duration::from_secs(u64::from(args.tofqdns_min_ttl)),
        max_ips_per_name: args.tofqdns_endpoint_max_ip_per_hostname,
        idle_grace: args.tofqdns_idle_connection_grace_period,
    }
}

/// `30`, `30s`, `5m`, `1h`: a whole number of seconds, minutes or hours.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a whole number with s, m or h"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{text:?}: the unit must be s, m or h")),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?}: too long"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// Flags, with the settings of `--config-dir` and `--config` in front of them.
fn parse_args() -> anyhow::Result<Args> {
    use clap::{ArgAction, CommandFactory, FromArgMatches};
    use weir_agent::config::{self, KnownOption, OptionKind};

    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (file, dir) = config::config_locations(&argv);
    if file.is_none() && dir.is_none() {
        return Ok(Args::parse());
    }
    let known: Vec<KnownOption> = Args::command()
        .get_arguments()
        .filter_map(|a| {
            let name = a.get_long()?;
            if matches!(name, "config" | "config-dir" | "help" | "version") {
                return None;
            }
            let kind = match a.get_action() {
                ArgAction::SetTrue => OptionKind::Switch,
                ArgAction::Append => OptionKind::Repeated,
                _ => OptionKind::Value,
            };
            Some(KnownOption {
                name: name.to_string(),
                kind,
            })
        })
        .collect();
    let mut settings = Vec::new();
    if let Some(dir) = &dir {
        settings.extend(config::settings_from_dir(dir, &known)?);
    }
    if let Some(file) = &file {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        settings.extend(config::settings_from_yaml(
            &file.display().to_string(),
            &text,
            &known,
        )?);
    }
    // A value the flag parser rejects is blamed on the line it came from.
    for s in &settings {
        let mut alone = vec![std::ffi::OsString::from("weir-agent")];
        alone.extend(s.args.iter().cloned());
        if let Err(e) = Args::try_parse_from(&alone) {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            anyhow::bail!("{}: {}: {first}", s.origin, s.name);
        }
    }
    let mut full = argv.iter().take(1).cloned().collect::<Vec<_>>();
    full.extend(settings.into_iter().flat_map(|s| s.args));
    full.extend(argv.iter().skip(1).cloned());
    let matches = Args::command().get_matches_from(full);
    Ok(Args::from_arg_matches(&matches)?)
}

/// Mounts a bpffs on `dir` unless it already is on one (pins need it).
fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()?;
    if String::from_utf8_lossy(&out.stdout).trim() == "bpf_fs" {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "mounting a bpffs on {} failed",
        dir.display()
    );
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure_bpffs(&args.bpffs)?;
    let datapath = backend::Kernel::load(&args.bpffs).context("loading the eBPF datapath")?;
    let namespace_labels: BTreeMap<String, BTreeMap<String, String>> = match &args.namespace_labels
    {
        Some(p) => serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => BTreeMap::new(),
    };
    let config = ManagerConfig {
        cluster_name: args.cluster_name.clone(),
        namespace_labels,
        state_dir: Some(args.state_dir.clone()),
        node_addresses: args.node_addresses.clone(),
        fqdn_cache: fqdn_cache_config(&args),
        ..ManagerConfig::default()
    };
    let mut manager = Manager::new(config, datapath).context("starting the endpoint manager")?;
    let proxy_handles = manager.proxy_handles().clone();
    let proxy_ports = proxy::Ports {
        http_egress: manager.config().compiler.http_proxy_port,
        http_ingress: manager.config().compiler.http_ingress_proxy_port,
        dns: manager.config().compiler.dns_proxy_port,
    };

    // Policies first, then endpoints: restored endpoints are reconciled against the same
    // policy they had, so nothing opens up while the agent restarts.
    let mut source = DirectorySource::new(&args.policy_dir);
    apply_events(&mut manager, source.poll());
    let restored = manager.restore_endpoints()?;
    info!(restored, policy_dir = %args.policy_dir.display(), "agent started");

    let manager = Arc::new(Mutex::new(manager));
    let (observe, observe_tasks, sinks) = observability::start(&args, &manager).await?;
    let proxy_tasks = if args.no_proxies {
        warn!("proxies disabled: connections redirected by L7 policy will be dropped");
        Vec::new()
    } else {
        if !args.no_proxy_routing {
            proxy::install_policy_routing().context("installing the proxy policy routing")?;
        }
        proxy::start(proxy_handles, manager.clone(), proxy_ports, sinks)
            .context("starting the proxies")?
    };
    let watcher = {
        let manager = manager.clone();
        let observe = observe.clone();
        let period = Duration::from_millis(args.policy_poll_ms.max(20));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let events = tokio::task::block_in_place(|| source.poll());
                if !events.is_empty() {
                    let started = std::time::Instant::now();
                    apply_events(&mut *manager.lock().await, events);
                    observe.record_regeneration(started.elapsed());
                }
            }
        })
    };
    let housekeeping = {
        let manager = manager.clone();
        tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick += 1;
                let mut m = manager.lock().await;
                // Datapath events are drained by the observer's own task (observe.rs).
                if tick.is_multiple_of(30)
                    && let Err(e) = m.datapath_mut().gc_conntrack()
                {
                    warn!(error = %e, "conntrack gc");
                }
                // Expired DNS answers close access, except to addresses with a live
                // connection in conntrack (read only when something has expired).
                let now = std::time::SystemTime::now();
                let activity = if m.proxy_handles().name_cache.has_expired(now) {
                    let endpoints = m.proxy_handles().identities.load();
                    weir_agent::fqdn_grace::ConntrackActivity::from_datapath(
                        m.datapath(),
                        &endpoints,
                    )
                    .unwrap_or_else(|e| {
                        // Without conntrack, keep every expired address this round rather
                        // than cut connections that may be live.
                        warn!(error = %e, "conntrack for DNS grace");
                        weir_agent::fqdn_grace::ConntrackActivity::everything_live(now)
                    })
                } else {
                    weir_agent::fqdn_grace::ConntrackActivity::default()
                };
                match m.gc_fqdn(now, &activity) {
                    Ok(0) => {}
                    Ok(n) => info!(addresses = n, "learned DNS addresses expired"),
                    Err(e) => warn!(error = %e, "DNS name cache gc"),
                }
                if tick.is_multiple_of(5)
                    && let Err(e) = m.save_name_cache()
                {
                    warn!(error = %e, "saving the DNS name cache");
                }
                // Identities learned from DNS answers, kept off the answer's path.
                if let Err(e) = m.flush_state() {
                    warn!(error = %e, "saving the agent state");
                }
            }
        })
    };

    let api = AgentApi::new(manager.clone(), backend::NAME).with_pod_cidrs(args.pod_cidrs.clone());
    // `weir policy import/delete`: persisted in the watched directory (see policy_store).
    let policy_api = weir_agent::policy_api::PolicyApi::new(
        manager.clone(),
        weir_agent::policy_store::PolicyStore::new(&args.policy_dir),
    );
    let router = tonic::transport::Server::builder()
        .add_service(EndpointServiceServer::new(api.clone()))
        .add_service(InspectServiceServer::new(api.clone()))
        .add_service(StatusServiceServer::new(api))
        .add_service(
            weir_agent_api::v1::policy_service_server::PolicyServiceServer::new(policy_api),
        );
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutting down; enforcement stays in place");
    };
    weir_agent_api::serve_unix(&args.api_socket, router, shutdown)
        .await
        .context("serving the API")?;
    watcher.abort();
    housekeeping.abort();
    for t in proxy_tasks.into_iter().chain(observe_tasks) {
        t.abort();
    }
    let mut m = manager.lock().await;
    if let Err(e) = m.save_name_cache() {
        warn!(error = %e, "saving the DNS name cache");
    }
    if let Err(e) = m.flush_state() {
        warn!(error = %e, "saving the agent state");
    }
    Ok(())
}

/// The node-side proxy plumbing: listeners, policy routing.
mod proxy {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::process::Command;
    use std::sync::Arc;

    use anyhow::Context;
    use socket2::{Domain, Protocol, Socket, Type};
    use tokio::net::TcpListener;
    use tokio::sync::Mutex;
    use tokio::task::JoinHandle;
    use tracing::{info, warn};
    use weir_agent::manager::Manager;
    use weir_agent::proxies::{AgentLearner, DatapathMarks, ProxyHandles};
    use weir_datapath::Datapath;
    use weir_dns_proxy::{DnsProxy, DnsProxyConfig, DnsSink, DnsUdpSocket};
    use weir_l7_proxy::{
        FlowSink, L7Proxy, ProxyConfig, TransparentDestination, transparent_listener,
    };
    use weir_policy_model::Direction;

    /// The routing table marked packets are looked up in (Cilium's number).
    const PROXY_TABLE: &str = "2004";
    /// `MARK_MAGIC_TO_PROXY` and its mask, as the datapath sets them.
    const PROXY_MARK: &str = "0x200/0xf00";

    fn ip(args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new("ip")
            .args(args)
            .output()
            .with_context(|| format!("running ip {}", args.join(" ")))
    }

    /// Packets the datapath marked for a proxy are delivered locally in this (the node's)
    /// namespace, so the transparent listeners receive the connections' later packets (the
    /// SYN is assigned to the listener by the datapath). Idempotent. Production nodes can set
    /// this up once at provisioning and pass `--no-proxy-routing`.
    pub fn install_policy_routing() -> anyhow::Result<()> {
        for (family, any) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            let rules = ip(&[
                family,
                "rule",
                "show",
                "fwmark",
                PROXY_MARK,
                "table",
                PROXY_TABLE,
            ])?;
            if String::from_utf8_lossy(&rules.stdout).trim().is_empty() {
                let out = ip(&[
                    family,
                    "rule",
                    "add",
                    "fwmark",
                    PROXY_MARK,
                    "lookup",
                    PROXY_TABLE,
                ])?;
                if !out.status.success() {
                    let msg = String::from_utf8_lossy(&out.stderr).to_string();
                    anyhow::ensure!(family == "-6", "ip rule add: {msg}");
                    warn!(error = %msg.trim(), "no IPv6 proxy routing");
                    continue;
                }
            }
            let out = ip(&[
                family,
                "route",
                "replace",
                "local",
                any,
                "dev",
                "lo",
                "table",
                PROXY_TABLE,
            ])?;
            if !out.status.success() {
                let msg = String::from_utf8_lossy(&out.stderr).to_string();
                anyhow::ensure!(family == "-6", "ip route replace: {msg}");
                warn!(error = %msg.trim(), "no IPv6 proxy route");
            }
        }
        // TCP early demux would hand packets of a connection the ingress proxy accepted
        // (after the datapath's hairpin) to the proxy's socket while they are still being
        // forwarded to the pod's interface, and the kernel drops forwarded packets that carry
        // a socket. The cost: local TCP delivery in this namespace skips one lookup shortcut.
        // (UDP is never redirected into a pod: DNS rules are egress only.)
        let path = "/proc/sys/net/ipv4/tcp_early_demux";
        std::fs::write(path, "0").with_context(|| format!("writing {path}"))?;
        // An egress proxy's upstream connection to a pod whose ingress also has HTTP rules
        // comes back, hairpinned, to the ingress proxy from this node's own address; IPv4
        // drops such packets as martians unless local sources are accepted.
        let path = "/proc/sys/net/ipv4/conf/all/accept_local";
        std::fs::write(path, "1").with_context(|| format!("writing {path}"))?;
        info!(
            mark = PROXY_MARK,
            table = PROXY_TABLE,
            "proxy policy routing in place (TCP early demux off, local sources accepted)"
        );
        Ok(())
    }

    /// An IPv6-only transparent listener (the IPv4 one holds the port for IPv4).
    fn transparent_listener_v6(port: u16) -> std::io::Result<TcpListener> {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    }

    /// The proxies' listening ports (the compiler's redirect targets).
    pub struct Ports {
        /// HTTP, traffic leaving endpoints.
        pub http_egress: u16,
        /// HTTP, traffic entering endpoints.
        pub http_ingress: u16,
        /// DNS (UDP and TCP), traffic leaving endpoints.
        pub dns: u16,
    }

    /// Binds and serves the HTTP proxy (one listener per direction) and the DNS proxy (UDP
    /// and TCP), on every address: the datapath's socket lookup uses the connection's
    /// original destination with the proxy port, which only a wildcard-bound listener
    /// matches.
    pub fn start<D: Datapath + Send + 'static>(
        handles: ProxyHandles,
        manager: Arc<Mutex<Manager<D>>>,
        ports: Ports,
        sinks: (Arc<dyn FlowSink>, Arc<dyn DnsSink>),
    ) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let mut tasks = Vec::new();
        let http = Arc::new(
            L7Proxy::new(
                ProxyConfig::default(),
                handles.http.clone(),
                Arc::new(TransparentDestination),
                handles.identities.clone(),
                sinks.0,
            )
            .with_upstream_mark(Arc::new(DatapathMarks)),
        );
        for (port, direction) in [
            (ports.http_egress, Direction::Egress),
            (ports.http_ingress, Direction::Ingress),
        ] {
            let v4 = transparent_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
                .with_context(|| format!("binding the HTTP proxy on port {port}"))?;
            let mut listeners = vec![v4];
            match transparent_listener_v6(port) {
                Ok(l) => listeners.push(l),
                Err(e) => warn!(error = %e, port, "no IPv6 HTTP proxy listener"),
            }
            for l in listeners {
                let http = http.clone();
                tasks.push(tokio::spawn(async move {
                    let e = http.serve(l, direction).await;
                    warn!(error = %e, ?direction, "HTTP proxy stopped");
                }));
            }
        }
        let dns_port = ports.dns;

        let dns = DnsProxy::new(
            DnsProxyConfig::default(),
            handles.dns.clone(),
            handles.identities.clone(),
            Arc::new(AgentLearner::new(manager)),
            handles.name_cache.clone(),
            sinks.1,
        );
        let udp = DnsUdpSocket::transparent(SocketAddr::from((Ipv4Addr::UNSPECIFIED, dns_port)))
            .with_context(|| format!("binding the DNS proxy (UDP) on port {dns_port}"))?;
        let tcp = transparent_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, dns_port)))
            .with_context(|| format!("binding the DNS proxy (TCP) on port {dns_port}"))?;
        {
            let dns = dns.clone();
            tasks.push(tokio::spawn(async move {
                let e = dns.serve_udp(udp).await;
                warn!(error = %e, "DNS proxy (UDP) stopped");
            }));
        }
        {
            let dns = dns.clone();
            tasks.push(tokio::spawn(async move {
                let e = dns.serve_tcp(tcp, Arc::new(TransparentDestination)).await;
                warn!(error = %e, "DNS proxy (TCP) stopped");
            }));
        }
        info!(
            http_egress = ports.http_egress,
            http_ingress = ports.http_ingress,
            dns_port,
            "proxies listening"
        );
        Ok(tasks)
    }
}

/// Flows, the Observer API and metrics (see `weir_agent::observe`).
mod observability {
    use std::sync::Arc;

    use anyhow::Context;
    use tokio::sync::Mutex;
    use tokio::task::JoinHandle;
    use tracing::{info, warn};
    use weir_agent::manager::Manager;
    use weir_agent::observe::{AgentObserver, spawn_dns_pump, spawn_event_pump, spawn_http_pump};
    use weir_datapath::Datapath;
    use weir_dns_proxy::DnsSink;
    use weir_l7_proxy::FlowSink;
    use weir_observe::{Observer, ObserverConfig};

    type Started = (
        Arc<AgentObserver>,
        Vec<JoinHandle<()>>,
        (Arc<dyn FlowSink>, Arc<dyn DnsSink>),
    );

    /// Starts the event pumps, the Observer API listeners and the metrics endpoint.
    pub async fn start<D: Datapath + Send + 'static>(
        args: &super::Args,
        manager: &Arc<Mutex<Manager<D>>>,
    ) -> anyhow::Result<Started> {
        let node_name = args.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "weir-node".to_string())
        });
        let observer = Arc::new(Observer::new(ObserverConfig {
            capacity: args.hubble_ring_size,
            node_name: node_name.clone(),
        }));
        let obs = Arc::new(AgentObserver::new(observer.clone(), &node_name));
        let mut tasks = Vec::new();
        if args.no_flow_export {
            info!("flow export off: datapath events are not read");
        } else {
            tasks.push(spawn_event_pump(manager.clone(), obs.clone()));
        }
        let (http_sink, t) = spawn_http_pump(manager.clone(), obs.clone());
        tasks.push(t);
        let (dns_sink, t) = spawn_dns_pump(manager.clone(), obs.clone());
        tasks.push(t);

        let hubble_socket = args.hubble_socket.clone().unwrap_or_else(|| {
            args.api_socket
                .parent()
                .map(|d| d.join("hubble.sock"))
                .unwrap_or_else(|| weir_observe::server::DEFAULT_HUBBLE_SOCKET.into())
        });
        let listener = weir_observe::server::bind_unix(&hubble_socket)
            .await
            .context("binding the Observer API socket")?;
        {
            let observer = observer.clone();
            let path = hubble_socket.clone();
            tasks.push(tokio::spawn(async move {
                let r = weir_observe::server::serve_unix_listener(
                    listener,
                    observer,
                    std::future::pending(),
                )
                .await;
                let _ = std::fs::remove_file(&path);
                if let Err(e) = r {
                    warn!(error = %e, "Observer API stopped");
                }
            }));
        }
        info!(socket = %hubble_socket.display(), ring = args.hubble_ring_size, "Observer API listening");
        if let Some(addr) = args.hubble_listen {
            let observer = observer.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) =
                    weir_observe::server::serve_tcp(addr, observer, std::future::pending()).await
                {
                    warn!(error = %e, "Observer API (TCP) stopped");
                }
            }));
            info!(%addr, "Observer API listening on TCP");
        }
        if !args.no_metrics {
            // Metrics are not worth refusing to enforce policy for: a taken port is a warning.
            match tokio::net::TcpListener::bind(args.metrics_listen).await {
                Ok(listener) => {
                    let metrics = observer.metrics().clone();
                    tasks.push(tokio::spawn(weir_observe::http::serve_metrics(
                        listener,
                        metrics,
                        std::future::pending(),
                    )));
                    info!(addr = %args.metrics_listen, "metrics at /metrics");
                }
                Err(e) => {
                    warn!(addr = %args.metrics_listen, error = %e, "metrics endpoint not served")
                }
            }
        }
        Ok((obs, tasks, (http_sink, dns_sink)))
    }
}

fn apply_events<D: Datapath>(manager: &mut Manager<D>, events: Vec<PolicyEvent>) {
    for ev in events {
        let result = match ev {
            PolicyEvent::Loaded(path, result) => manager.load_policy_file(&path, result),
            PolicyEvent::Removed(path) => manager.remove_policy_file(&path),
        };
        if let Err(e) = result {
            warn!(error = %e, "applying a policy change");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_seconds_minutes_hours() {
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "1.5s", "10ms", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_cache_flags_reach_the_manager_config() {
        let args = Args::try_parse_from([
            "weir-agent",
            "--tofqdns-min-ttl",
            "30",
            "--tofqdns-endpoint-max-ip-per-hostname",
            "50",
            "--tofqdns-idle-connection-grace-period",
            "1m",
        ])
        .expect("flags parse");
        assert_eq!(
            fqdn_cache_config(&args),
            weir_dns_proxy::CacheConfig {
                min_ttl: Duration::from_secs(30),
                max_ips_per_name: 50,
                idle_grace: Duration::from_secs(60),
            }
        );
        let defaults = Args::try_parse_from(["weir-agent"]).expect("defaults");
        assert_eq!(
            fqdn_cache_config(&defaults),
            weir_dns_proxy::CacheConfig::default()
        );
    }
}
