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
}

impl<D: Datapath> AgentApi<D> {
    /// The services over a shared manager; `backend` names the datapath (`aya`, `libbpf`).
    pub fn new(manager: Shared<D>, backend: &'static str) -> Self {
        AgentApi {
            manager,
            started: Instant::now(),
            backend,
        }
    }
}

impl<D: Datapath> Clone for AgentApi<D> {
    fn clone(&self) -> Self {
        AgentApi {
            manager: self.manager.clone(),
            started: self.started,
            backend: self.backend,
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

fn spec_from(req: CreateEndpointRequest) -> Result<EndpointSpec, Status> {
    if req.container_id.is_empty() || req.host_ifname.is_empty() {
        return Err(Status::invalid_argument(
            "container_id and host_ifname are required",
        ));
    }
    let mut addresses = Vec::new();
    for a in req.ipv4_addresses.iter().chain(&req.ipv6_addresses) {
        // The CNI may send `10.0.0.5/32`.
        let ip = a.split('/').next().unwrap_or(a);
        addresses.push(
            ip.parse::<IpAddr>()
                .map_err(|_| Status::invalid_argument(format!("{a:?} is not an IP address")))?,
        );
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
        let spec = spec_from(request.into_inner())?;
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
