//! The agent's gRPC services (`weir.agent.v1`) over the [`Manager`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use weir_agent_api::v1::{
    self, CreateEndpointRequest, CreateEndpointResponse, DeleteEndpointRequest,
    DeleteEndpointResponse, EndpointState as ApiState, GetEndpointRequest, ListEndpointsRequest,
    ListEndpointsResponse, StatusRequest, StatusResponse, endpoint_service_server::EndpointService,
    get_endpoint_request::Key, status_service_server::StatusService,
};
use weir_datapath::{Datapath, EndpointId};

use crate::manager::{Endpoint, EndpointSpec, EndpointState, Manager, port_protocol};

/// The manager shared by the API, the policy watcher and the event reader.
pub type Shared<D> = Arc<Mutex<Manager<D>>>;

/// Serves `EndpointService` and `StatusService`.
pub struct AgentApi<D: Datapath> {
    manager: Shared<D>,
    started: Instant,
    backend: &'static str,
    pod_cidrs: Arc<[ipnet::IpNet]>,
}

impl<D: Datapath> AgentApi<D> {
    /// The services over a shared manager; `backend` names the datapath (`aya`, `libbpf`).
    pub fn new(manager: Shared<D>, backend: &'static str) -> Self {
        AgentApi {
            manager,
            started: Instant::now(),
            backend,
            pod_cidrs: Arc::from(Vec::new()),
        }
    }

    /// Only endpoints whose addresses are inside one of these prefixes (the node's pod
    /// CIDRs) are accepted; none means any address.
    pub fn with_pod_cidrs(mut self, cidrs: Vec<ipnet::IpNet>) -> Self {
        self.pod_cidrs = Arc::from(cidrs);
        self
    }
}

impl<D: Datapath> Clone for AgentApi<D> {
    fn clone(&self) -> Self {
        AgentApi {
            manager: self.manager.clone(),
            started: self.started,
            backend: self.backend,
            pod_cidrs: self.pod_cidrs.clone(),
        }
    }
}

fn to_api(ep: &Endpoint) -> v1::Endpoint {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = ep.spec.addresses.iter().partition(|a| a.is_ipv4());
    v1::Endpoint {
        endpoint_id: u64::from(ep.id.0),
        container_id: ep.spec.container_id.clone(),
        identity: ep.identity.0,
        state: match ep.state {
            EndpointState::Ready => ApiState::Ready,
            EndpointState::WaitingForPolicy => ApiState::WaitingForPolicy,
        } as i32,
        netns_path: ep.spec.netns_path.clone(),
        ifname: ep.spec.ifname.clone(),
        host_ifname: ep.spec.host_ifname.clone(),
        host_ifindex: 0,
        ipv4_addresses: v4.iter().map(ToString::to_string).collect(),
        ipv6_addresses: v6.iter().map(ToString::to_string).collect(),
        namespace: ep.spec.namespace.clone(),
        pod_name: ep.spec.pod_name.clone(),
        labels: ep.spec.labels.clone().into_iter().collect(),
        named_ports: ep
            .spec
            .named_ports
            .iter()
            .map(|(name, (p, port))| v1::NamedPort {
                name: name.clone(),
                port: u32::from(*port),
                protocol: match *p {
                    17 => "UDP",
                    132 => "SCTP",
                    _ => "TCP",
                }
                .into(),
            })
            .collect(),
        policy_revision: ep.policy.revision.0,
        ingress_enforced: ep.policy.ingress_enforced,
        egress_enforced: ep.policy.egress_enforced,
    }
}

fn spec_from(
    req: CreateEndpointRequest,
    pod_cidrs: &[ipnet::IpNet],
) -> Result<EndpointSpec, Status> {
    if req.container_id.is_empty() || req.host_ifname.is_empty() {
        return Err(Status::invalid_argument(
            "container_id and host_ifname are required",
        ));
    }
    let mut addresses = Vec::new();
    for a in req.ipv4_addresses.iter().chain(&req.ipv6_addresses) {
        // The CNI may send `10.0.0.5/32`.
        let ip = a.split('/').next().unwrap_or(a);
        let ip = ip
            .parse::<IpAddr>()
            .map_err(|_| Status::invalid_argument(format!("{a:?} is not an IP address")))?;
        if !pod_cidrs.is_empty() && !pod_cidrs.iter().any(|c| c.contains(&ip)) {
            let cidrs: Vec<String> = pod_cidrs.iter().map(ToString::to_string).collect();
            return Err(Status::invalid_argument(format!(
                "{ip} is outside the node's pod CIDR ({})",
                cidrs.join(", ")
            )));
        }
        addresses.push(ip);
    }
    let mut named_ports = std::collections::BTreeMap::new();
    for p in req.named_ports {
        let port = u16::try_from(p.port).map_err(|_| {
            Status::invalid_argument(format!("named port {}: {} is not a port", p.name, p.port))
        })?;
        named_ports.insert(
            p.name.to_ascii_lowercase(),
            (port_protocol(&p.protocol), port),
        );
    }
    Ok(EndpointSpec {
        container_id: req.container_id,
        netns_path: req.netns_path,
        ifname: req.ifname,
        host_ifname: req.host_ifname,
        addresses,
        namespace: if req.namespace.is_empty() {
            "default".into()
        } else {
            req.namespace
        },
        pod_name: req.pod_name,
        labels: req.labels.into_iter().collect(),
        named_ports,
    })
}

#[tonic::async_trait]
impl<D: Datapath + Send + 'static> EndpointService for AgentApi<D> {
    async fn create_endpoint(
        &self,
        request: Request<CreateEndpointRequest>,
    ) -> Result<Response<CreateEndpointResponse>, Status> {
        let spec = spec_from(request.into_inner(), &self.pod_cidrs)?;
        let mut m = self.manager.lock().await;
        let ep = m
            .create_endpoint(spec)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(CreateEndpointResponse {
            endpoint_id: u64::from(ep.id.0),
            identity: ep.identity.0,
            ready: ep.state == EndpointState::Ready,
        }))
    }

    async fn delete_endpoint(
        &self,
        request: Request<DeleteEndpointRequest>,
    ) -> Result<Response<DeleteEndpointResponse>, Status> {
        let req = request.into_inner();
        let found = self
            .manager
            .lock()
            .await
            .delete_endpoint(&req.container_id)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(DeleteEndpointResponse { found }))
    }

    async fn get_endpoint(
        &self,
        request: Request<GetEndpointRequest>,
    ) -> Result<Response<v1::Endpoint>, Status> {
        let m = self.manager.lock().await;
        let ep = match request.into_inner().key {
            Some(Key::ContainerId(c)) => m.endpoint_by_container(&c),
            Some(Key::EndpointId(id)) => u32::try_from(id)
                .ok()
                .and_then(|id| m.endpoint(EndpointId(id))),
            None => None,
        };
        ep.map(|e| Response::new(to_api(e)))
            .ok_or_else(|| Status::not_found("no such endpoint"))
    }

    async fn list_endpoints(
        &self,
        _: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let m = self.manager.lock().await;
        Ok(Response::new(ListEndpointsResponse {
            endpoints: m.endpoints().map(to_api).collect(),
        }))
    }
}

#[tonic::async_trait]
impl<D: Datapath + Send + 'static> StatusService for AgentApi<D> {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let m = self.manager.lock().await;
        let errors: Vec<String> = m
            .policy_files()
            .values()
            .filter_map(|f| f.error.clone())
            .collect();
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            datapath_backend: self.backend.into(),
            endpoint_count: u32::try_from(m.endpoints().count()).unwrap_or(u32::MAX),
            policy_revision: m.compiler().repository().revision().0,
            last_policy_error: errors.join("\n"),
            identity_count: u32::try_from(m.identities().len()).unwrap_or(u32::MAX),
            uptime_seconds: self.started.elapsed().as_secs(),
            cluster_name: m.config().cluster_name.clone(),
        }))
    }
}

use weir_agent_api::v1::{
    BpfCtListRequest, BpfCtListResponse, BpfIpcacheListRequest, BpfIpcacheListResponse,
    BpfPolicyEntry, BpfPolicyGetRequest, BpfPolicyGetResponse, FqdnCacheEntry,
    FqdnCacheListRequest, FqdnCacheListResponse, GetPoliciesRequest, GetPoliciesResponse,
    IdentityEntry, IpcacheEntry, ListIdentitiesRequest, ListIdentitiesResponse, PolicyFileStatus,
    inspect_service_server::InspectService,
};
use weir_policy_compiler::EntryAction;
use weir_policy_model::Direction;

fn dir_name(d: Direction) -> String {
    match d {
        Direction::Ingress => "ingress".into(),
        Direction::Egress => "egress".into(),
    }
}

#[tonic::async_trait]
impl<D: Datapath + Send + 'static> InspectService for AgentApi<D> {
    async fn list_identities(
        &self,
        _: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let m = self.manager.lock().await;
        let mut identities: Vec<IdentityEntry> = m
            .identities()
            .into_iter()
            .map(|(id, labels)| IdentityEntry {
                identity: id.0,
                labels: labels.iter().map(ToString::to_string).collect(),
            })
            .collect();
        identities.sort_by_key(|i| i.identity);
        Ok(Response::new(ListIdentitiesResponse { identities }))
    }

    async fn get_policies(
        &self,
        _: Request<GetPoliciesRequest>,
    ) -> Result<Response<GetPoliciesResponse>, Status> {
        let m = self.manager.lock().await;
        let files = m
            .policy_files()
            .iter()
            .map(|(path, f)| PolicyFileStatus {
                path: path.display().to_string(),
                policies: f
                    .policies
                    .iter()
                    .map(|p| format!("{} {p}", p.kind.as_str()))
                    .collect(),
                error: f.error.clone().unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(GetPoliciesResponse {
            revision: m.compiler().repository().revision().0,
            files,
        }))
    }

    async fn bpf_policy_get(
        &self,
        request: Request<BpfPolicyGetRequest>,
    ) -> Result<Response<BpfPolicyGetResponse>, Status> {
        let want = request.into_inner().endpoint_id;
        let m = self.manager.lock().await;
        let labels: std::collections::BTreeMap<u32, Vec<String>> = m
            .identities()
            .into_iter()
            .map(|(id, l)| (id.0, l.iter().map(ToString::to_string).collect()))
            .collect();
        let mut entries = Vec::new();
        for ep in m.endpoints().filter(|e| want == 0 || e.id.0 == want) {
            // What the kernel holds, annotated with the rules the compiler says produced it.
            let dumped = m
                .datapath()
                .dump_policy_entries(ep.id)
                .map_err(|e| Status::internal(e.to_string()))?;
            for (key, installed) in dumped {
                let (name, proxy_port) = match installed.action {
                    EntryAction::Allow => ("allow", 0),
                    EntryAction::Deny => ("deny", 0),
                    EntryAction::Redirect { proxy_port, .. } => ("redirect", proxy_port),
                };
                let derived_from = ep
                    .policy
                    .map_state
                    .get(&key)
                    .map(|e| e.derived_from.iter().map(ToString::to_string).collect())
                    .unwrap_or_default();
                entries.push(BpfPolicyEntry {
                    endpoint_id: ep.id.0,
                    direction: dir_name(key.direction),
                    identity: key.identity.0,
                    identity_labels: labels.get(&key.identity.0).cloned().unwrap_or_default(),
                    protocol: u32::from(key.protocol),
                    port: u32::from(key.port),
                    prefix_len: u32::from(key.prefix_len),
                    action: name.into(),
                    proxy_port: u32::from(proxy_port),
                    derived_from,
                    packets: installed.packets,
                    bytes: installed.bytes,
                });
            }
        }
        Ok(Response::new(BpfPolicyGetResponse { entries }))
    }

    async fn bpf_ipcache_list(
        &self,
        _: Request<BpfIpcacheListRequest>,
    ) -> Result<Response<BpfIpcacheListResponse>, Status> {
        let m = self.manager.lock().await;
        let entries = m
            .datapath()
            .list_ipcache()
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|(prefix, id)| IpcacheEntry {
                prefix: prefix.to_string(),
                identity: id.0,
            })
            .collect();
        Ok(Response::new(BpfIpcacheListResponse { entries }))
    }

    async fn fqdn_cache_list(
        &self,
        _: Request<FqdnCacheListRequest>,
    ) -> Result<Response<FqdnCacheListResponse>, Status> {
        let m = self.manager.lock().await;
        let entries = m
            .proxy_handles()
            .name_cache
            .entries()
            .into_iter()
            .map(|e| {
                let id = EndpointId(u32::from(e.endpoint));
                FqdnCacheEntry {
                    endpoint_id: id.0,
                    pod: m
                        .endpoint(id)
                        .map(|ep| format!("{}/{}", ep.spec.namespace, ep.spec.pod_name))
                        .unwrap_or_default(),
                    name: e.name,
                    ip: e.ip.to_string(),
                    identity: m.fqdn_identity(e.ip).map_or(0, |i| i.0),
                    learned_ms: e.learned_ms,
                    expires_ms: e.expires_ms,
                }
            })
            .collect();
        Ok(Response::new(FqdnCacheListResponse { entries }))
    }

    async fn bpf_ct_list(
        &self,
        _: Request<BpfCtListRequest>,
    ) -> Result<Response<BpfCtListResponse>, Status> {
        let m = self.manager.lock().await;
        let entries = m
            .datapath()
            .list_conntrack()
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|c| weir_agent_api::v1::CtEntry {
                src: c.src.to_string(),
                dst: c.dst.to_string(),
                sport: u32::from(c.sport),
                dport: u32::from(c.dport),
                protocol: u32::from(c.protocol),
                direction: dir_name(c.direction),
                expires_ns: c.expires_ns,
                packets: c.packets,
                bytes: c.bytes,
                flags: u32::from(c.flags),
                proxy_port: u32::from(c.proxy_port),
            })
            .collect();
        Ok(Response::new(BpfCtListResponse { entries }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(addr: &str) -> CreateEndpointRequest {
        CreateEndpointRequest {
            container_id: "c1".into(),
            host_ifname: "lxc1".into(),
            ipv4_addresses: vec![addr.into()],
            ..Default::default()
        }
    }

    #[test]
    fn addresses_outside_the_pod_cidr_are_refused() {
        let cidrs: Vec<ipnet::IpNet> = vec!["10.0.0.0/16".parse().expect("cidr")];
        let spec = spec_from(request("10.0.3.4/32"), &cidrs).expect("inside");
        assert_eq!(
            spec.addresses,
            vec!["10.0.3.4".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(spec.namespace, "default");
        let e = spec_from(request("10.1.0.1"), &cidrs).expect_err("outside");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message()
                .contains("outside the node's pod CIDR (10.0.0.0/16)"),
            "{e}"
        );
        assert!(
            spec_from(request("192.168.1.1"), &[]).is_ok(),
            "no CIDR: anything"
        );
    }
}
