//! The plugin's side of the agent API: register, wait for ready, unregister.

use std::path::Path;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;
use weir_agent_api::v1::endpoint_service_client::EndpointServiceClient;
use weir_agent_api::v1::get_endpoint_request::Key;
use weir_agent_api::v1::{
    CreateEndpointRequest, CreateEndpointResponse, DeleteEndpointRequest, Endpoint, EndpointState,
    GetEndpointRequest,
};

use crate::spec::{CniError, ErrorCode};

/// How long to wait for the agent's socket to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll interval while waiting for an endpoint to become ready.
const READY_POLL: Duration = Duration::from_millis(50);

/// A connected agent client.
#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoints: EndpointServiceClient<Channel>,
}

fn agent_err(msg: &str, status: &tonic::Status) -> CniError {
    let code = if matches!(status.code(), Code::Unavailable | Code::ResourceExhausted) {
        ErrorCode::TryAgainLater
    } else {
        ErrorCode::Agent
    };
    CniError::with_details(
        code,
        msg,
        format!("{}: {}", status.code(), status.message()),
    )
}

impl AgentClient {
    /// Connects to the agent's unix socket.
    pub async fn connect(socket: &Path) -> Result<Self, CniError> {
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, weir_agent_api::connect_unix(socket))
            .await
            .map_err(|_| {
                CniError::new(
                    ErrorCode::TryAgainLater,
                    format!("timed out connecting to the agent at {}", socket.display()),
                )
            })?
            .map_err(|e| {
                CniError::with_details(
                    ErrorCode::TryAgainLater,
                    "the Weir agent is not reachable",
                    e,
                )
            })?;
        Ok(Self {
            endpoints: EndpointServiceClient::new(channel),
        })
    }

    /// Registers the endpoint and waits until the agent reports it ready
    /// (policy in the datapath) or `timeout` passes.
    pub async fn register(
        &mut self,
        request: CreateEndpointRequest,
        timeout: Duration,
    ) -> Result<CreateEndpointResponse, CniError> {
        let container_id = request.container_id.clone();
        let deadline = Instant::now() + timeout;
        let response = tokio::time::timeout(timeout, self.endpoints.create_endpoint(request))
            .await
            .map_err(|_| {
                CniError::new(
                    ErrorCode::AgentNotReady,
                    "agent did not answer CreateEndpoint in time",
                )
            })?
            .map_err(|s| agent_err("agent refused the endpoint", &s))?
            .into_inner();
        if response.ready {
            return Ok(response);
        }
        loop {
            if Instant::now() >= deadline {
                return Err(CniError::new(
                    ErrorCode::AgentNotReady,
                    format!(
                        "endpoint {container_id} not ready after {}s",
                        timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(READY_POLL).await;
            match self.endpoint(&container_id).await? {
                Some(ep) if ep.state == EndpointState::Ready as i32 => {
                    return Ok(CreateEndpointResponse {
                        endpoint_id: ep.endpoint_id,
                        identity: ep.identity,
                        ready: true,
                    });
                }
                Some(_) => {}
                None => {
                    return Err(CniError::new(
                        ErrorCode::Agent,
                        format!("agent forgot endpoint {container_id} while it was being created"),
                    ));
                }
            }
        }
    }

    /// The agent's record of `container_id`, `None` when unknown.
    pub async fn endpoint(&mut self, container_id: &str) -> Result<Option<Endpoint>, CniError> {
        let request = GetEndpointRequest {
            key: Some(Key::ContainerId(container_id.to_string())),
        };
        match self.endpoints.get_endpoint(request).await {
            Ok(ep) => Ok(Some(ep.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(agent_err("cannot read the endpoint from the agent", &s)),
        }
    }

    /// Unregisters `container_id`; `false` when the agent did not know it.
    pub async fn unregister(&mut self, container_id: &str) -> Result<bool, CniError> {
        let request = DeleteEndpointRequest {
            container_id: container_id.to_string(),
        };
        match self.endpoints.delete_endpoint(request).await {
            Ok(r) => Ok(r.into_inner().found),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(agent_err("agent refused to delete the endpoint", &s)),
        }
    }
}
