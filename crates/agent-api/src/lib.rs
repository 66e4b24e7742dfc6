//! The Weir agent's local gRPC API (`weir.agent.v1`) and the unix-socket plumbing
//! around it.
//!
//! The agent serves [`EndpointService`](v1::endpoint_service_server::EndpointService)
//! and [`StatusService`](v1::status_service_server::StatusService) on a unix socket
//! that only root can open (mode 0600); the CNI plugin and the `weir` CLI are its
//! clients. There is no TCP listener here: a deployment that wants one builds it
//! from the same generated services.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weir_agent_api::ApiError> {
//! use weir_agent_api::{connect_unix, v1::status_service_client::StatusServiceClient};
//! let channel = connect_unix("/run/weir/agent.sock").await?;
//! let status = StatusServiceClient::new(channel)
//!     .status(weir_agent_api::v1::StatusRequest {})
//!     .await;
//! # let _ = status; Ok(()) }
//! ```

mod unix;

pub use unix::{ApiError, DEFAULT_SOCKET_PATH, bind_unix, connect_unix, serve_unix};

/// Generated messages, clients and servers of package `weir.agent.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("weir.agent.v1");
}
