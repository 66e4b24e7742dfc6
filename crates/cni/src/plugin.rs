//! ADD, DEL, CHECK and VERSION, composed from the spec, IPAM, netlink and agent
//! modules.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weir_agent_api::v1::CreateEndpointRequest;

use crate::agent::AgentClient;
use crate::ipam::{Ipam, IpamError};
use crate::netlink::{self, NetError};
use crate::spec::{
    AddResult, Attachment, CniError, Command, DEFAULT_READY_TIMEOUT_SECS, DEFAULT_STATE_DIR,
    ErrorCode, Invocation, NetConf, format_mac, host_ifname, requested_version, version_json,
};

/// Runs one plugin invocation; `Ok` holds what to print on stdout (empty for
/// DEL and CHECK).
pub fn run(invocation: &Invocation, stdin: &[u8]) -> Result<String, CniError> {
    if invocation.command == Command::Version {
        return Ok(version_json(requested_version(stdin).as_deref()));
    }
    let conf = NetConf::parse(stdin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::with_details(ErrorCode::Io, "cannot start runtime", e))?;
    runtime.block_on(async {
        match invocation.command {
            Command::Add => add(invocation, &conf).await,
            Command::Del => del(invocation, &conf).await.map(|()| String::new()),
            Command::Check => check(invocation, &conf).await.map(|()| String::new()),
            Command::Version => Ok(version_json(Some(&conf.cni_version))),
        }
    })
}

fn ipam_err(e: IpamError) -> CniError {
    match e {
        IpamError::Exhausted(_) => {
            CniError::with_details(ErrorCode::AddressesExhausted, "pod CIDR exhausted", e)
        }
        IpamError::InvalidNetworkName(_) => {
            CniError::with_details(ErrorCode::InvalidConfig, "bad network name", e)
        }
        IpamError::Io { .. } => CniError::with_details(ErrorCode::Io, "IPAM state failure", e),
        IpamError::Unavailable(_) => {
            CniError::with_details(ErrorCode::InvalidConfig, "requested address", e)
        }
    }
}

fn net_err(msg: &str) -> impl FnOnce(NetError) -> CniError + '_ {
    move |e| match e {
        NetError::Mismatch(_) => CniError::with_details(ErrorCode::CheckFailed, msg, e),
        NetError::Io { .. } => CniError::with_details(ErrorCode::Io, msg, e),
        NetError::Netlink { .. } => CniError::with_details(ErrorCode::Netlink, msg, e),
    }
}

fn open_ipam(conf: &NetConf) -> Result<Ipam, CniError> {
    let subnet = conf.subnet()?;
    let gateway = conf.gateway(subnet)?;
    let state_dir = conf
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    Ipam::open(&state_dir, &conf.name, subnet, gateway).map_err(ipam_err)
}

fn agent_socket(conf: &NetConf) -> PathBuf {
    conf.agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(weir_agent_api::DEFAULT_SOCKET_PATH))
}

fn netns_of(inv: &Invocation) -> Result<&Path, CniError> {
    inv.netns
        .as_deref()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, "CNI_NETNS is not set"))
}

fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        let code = if e.kind() == io::ErrorKind::NotFound {
            ErrorCode::UnknownContainer
        } else {
            ErrorCode::Io
        };
        CniError::with_details(code, format!("cannot open netns {}", path.display()), e)
    })
}

async fn add(inv: &Invocation, conf: &NetConf) -> Result<String, CniError> {
    let netns_path = netns_of(inv)?;
    let netns = open_netns(netns_path)?;
    let labels = conf.labels()?;
    let ipam = open_ipam(conf)?;
    let ip = match inv.args.ip {
        Some(wanted) => ipam.allocate_requested(&inv.container_id, &inv.ifname, wanted),
        None => ipam.allocate(&inv.container_id, &inv.ifname),
    }
    .map_err(ipam_err)?;
    let host_name = host_ifname(&inv.container_id, &inv.ifname);
    let attached = attach(inv, conf, netns_path, &netns, &host_name, ip, labels).await;
    match attached {
        Ok(attachment) => AddResult::new(&conf.cni_version, &attachment).to_json(),
        Err(e) => {
            // Undo what this ADD may have done so a retry starts clean; the
            // runtime also calls DEL after a failed ADD, which is idempotent.
            if let Ok(handle) = netlink::connect() {
                let _ = netlink::delete_link(&handle, &host_name).await;
            }
            let _ = ipam.release(&inv.container_id, &inv.ifname);
            Err(e)
        }
    }
}

async fn attach(
    inv: &Invocation,
    conf: &NetConf,
    netns_path: &Path,
    netns: &File,
    host_name: &str,
    ip: Ipv4Addr,
    labels: std::collections::BTreeMap<String, String>,
) -> Result<Attachment, CniError> {
    let handle = netlink::connect().map_err(net_err("netlink"))?;
    // A leftover pair from an interrupted ADD for the same container.
    netlink::delete_link(&handle, host_name)
        .await
        .map_err(net_err("remove stale host veth"))?;
    let host = netlink::create_veth(&handle, host_name, &inv.ifname, netns, conf.mtu)
        .await
        .map_err(net_err("create veth pair"))?;
    netlink::configure_host(&handle, &host, ip)
        .await
        .map_err(net_err("configure host side"))?;
    let ifname = inv.ifname.clone();
    let host_mac = host.mac;
    let container = netlink::in_netns(netns_path, move |h| async move {
        netlink::configure_container(&h, &ifname, ip, host_mac).await
    })
    .map_err(net_err("configure container side"))?;

    let mut agent = AgentClient::connect(&agent_socket(conf)).await?;
    let request = CreateEndpointRequest {
        container_id: inv.container_id.clone(),
        netns_path: netns_path.display().to_string(),
        ifname: inv.ifname.clone(),
        host_ifname: host.name.clone(),
        host_ifindex: host.index,
        ipv4_addresses: vec![ip.to_string()],
        ipv6_addresses: Vec::new(),
        namespace: inv.args.pod_namespace.clone().unwrap_or_default(),
        pod_name: inv.args.pod_name.clone().unwrap_or_default(),
        labels: labels.into_iter().collect(),
        named_ports: conf.named_ports()?,
        host_mac: format_mac(&host.mac),
        container_mac: format_mac(&container.mac),
    };
    let timeout = Duration::from_secs(
        conf.ready_timeout_seconds
            .unwrap_or(DEFAULT_READY_TIMEOUT_SECS),
    );
    if let Err(e) = agent.register(request, timeout).await {
        let _ = agent.unregister(&inv.container_id).await;
        return Err(e);
    }
    Ok(Attachment {
        host_ifname: host.name,
        host_mac: host.mac,
        ifname: inv.ifname.clone(),
        container_mac: container.mac,
        netns: netns_path.display().to_string(),
        ip,
    })
}

async fn del(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    // The agent is told first so it stops enforcing for an address about to be
    // reused. An unreachable agent must not wedge pod deletion: it reconciles
    // its endpoints against existing veths when it comes back.
    match AgentClient::connect(&agent_socket(conf)).await {
        Ok(mut agent) => {
            agent.unregister(&inv.container_id).await?;
        }
        Err(e) => eprintln!("weir-cni: DEL {}: {e}; continuing", inv.container_id),
    }
    let handle = netlink::connect().map_err(net_err("netlink"))?;
    netlink::delete_link(&handle, &host_ifname(&inv.container_id, &inv.ifname))
        .await
        .map_err(net_err("delete host veth"))?;
    let ipam = open_ipam(conf)?;
    ipam.release(&inv.container_id, &inv.ifname)
        .map_err(ipam_err)?;
    Ok(())
}

async fn check(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let netns_path = netns_of(inv)?.to_path_buf();
    open_netns(&netns_path)?;
    let ipam = open_ipam(conf)?;
    let ip = ipam
        .lookup(&inv.container_id, &inv.ifname)
        .map_err(ipam_err)?
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::CheckFailed,
                "no address allocated for this container",
            )
        })?;
    if let Some(prev) = conf.prev_ipv4()
        && prev.addr() != ip
    {
        return Err(CniError::new(
            ErrorCode::CheckFailed,
            format!("prevResult says {} but IPAM holds {ip}", prev.addr()),
        ));
    }
    let handle = netlink::connect().map_err(net_err("netlink"))?;
    let host_name = host_ifname(&inv.container_id, &inv.ifname);
    netlink::check_host(&handle, &host_name, ip)
        .await
        .map_err(net_err("host side"))?;
    let ifname = inv.ifname.clone();
    netlink::in_netns(&netns_path, move |h| async move {
        netlink::check_container(&h, &ifname, ip).await
    })
    .map_err(net_err("container side"))?;

    let mut agent = AgentClient::connect(&agent_socket(conf)).await?;
    let endpoint = agent.endpoint(&inv.container_id).await?.ok_or_else(|| {
        CniError::new(
            ErrorCode::CheckFailed,
            "the agent does not know this endpoint",
        )
    })?;
    if !endpoint.ipv4_addresses.iter().any(|a| a == &ip.to_string()) {
        return Err(CniError::new(
            ErrorCode::CheckFailed,
            format!("the agent's endpoint lacks {ip}"),
        ));
    }
    if endpoint.host_ifname != host_name {
        return Err(CniError::new(
            ErrorCode::CheckFailed,
            format!(
                "the agent's endpoint is on {}, not {host_name}",
                endpoint.host_ifname
            ),
        ));
    }
    Ok(())
}
