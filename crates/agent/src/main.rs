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

#[cfg(not(feature = "aya"))]
compile_error!("weir-agent needs a datapath backend: build with the `aya` feature (the default)");

#[derive(Parser, Debug)]
#[command(name = "weir-agent", version, about = "The Weir agent")]
struct Args {
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
    /// How often the policy directory is checked, in milliseconds.
    #[arg(long, default_value_t = 200)]
    policy_poll_ms: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
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
    let datapath =
        weir_datapath_aya::AyaDatapath::load(&args.bpffs).context("loading the eBPF datapath")?;
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
        ..ManagerConfig::default()
    };
    let mut manager = Manager::new(config, datapath).context("starting the endpoint manager")?;

    // Policies first, then endpoints: restored endpoints are reconciled against the same
    // policy they had, so nothing opens up while the agent restarts.
    let mut source = DirectorySource::new(&args.policy_dir);
    apply_events(&mut manager, source.poll());
    let restored = manager.restore_endpoints()?;
    info!(restored, policy_dir = %args.policy_dir.display(), "agent started");

    let manager = Arc::new(Mutex::new(manager));
    let watcher = {
        let manager = manager.clone();
        let period = Duration::from_millis(args.policy_poll_ms.max(20));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let events = tokio::task::block_in_place(|| source.poll());
                if !events.is_empty() {
                    apply_events(&mut *manager.lock().await, events);
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
                // Events feed `weir observe` later; until then drops are logged.
                if let Ok(events) = m.datapath_mut().drain_events() {
                    for e in events.iter().filter(|e| e.drop_reason != 0) {
                        tracing::debug!(reason = e.drop_reason, src = ?e.src, dst = ?e.dst, dport = e.dport, "drop");
                    }
                }
                if tick.is_multiple_of(30)
                    && let Err(e) = m.datapath_mut().gc_conntrack()
                {
                    warn!(error = %e, "conntrack gc");
                }
            }
        })
    };

    let api = AgentApi::new(manager.clone(), "aya");
    let router = tonic::transport::Server::builder()
        .add_service(EndpointServiceServer::new(api.clone()))
        .add_service(InspectServiceServer::new(api.clone()))
        .add_service(StatusServiceServer::new(api));
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
    Ok(())
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
