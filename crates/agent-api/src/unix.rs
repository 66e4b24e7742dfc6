//! gRPC over a unix socket: a tonic client channel and a server listener.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/weir/agent.sock";

/// Failures while connecting to or serving the agent API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Connecting the client channel failed (socket missing, agent down, ...).
    #[error("cannot connect to the agent at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Underlying transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Creating or preparing the listening socket failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Another process is answering on the socket already.
    #[error("{0} is in use by a running agent")]
    InUse(PathBuf),
    /// The server stopped with a transport error.
    #[error("agent API server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Opens a gRPC channel to the agent over the unix socket at `path`.
///
/// The connection is made eagerly, so a missing agent shows up here rather than
/// at the first call.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Channel, ApiError> {
    let path = path.as_ref().to_path_buf();
    let dial = path.clone();
    // The URI is required by tonic but never resolved: the connector ignores it.
    Endpoint::from_static("http://weir-agent.invalid")
        .connect_with_connector(service_fn(move |_: Uri| {
            let dial = dial.clone();
            async move { UnixStream::connect(dial).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ApiError::Connect { path, source })
}

/// Binds the agent's unix socket at `path` with mode 0600.
///
/// A stale socket left by a crashed agent is removed first; a socket that still
/// accepts connections is refused with [`ApiError::InUse`]. Missing parent
/// directories are created with mode 0700.
pub async fn bind_unix(path: impl AsRef<Path>) -> Result<UnixListener, ApiError> {
    let path = path.as_ref();
    let listen_err = |source| ApiError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(listen_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(listen_err)?;
        }
        // Never delete something that is not a socket: the path is misconfigured.
        Ok(_) => {
            return Err(listen_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    // Root-only access is the API's only authentication.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok(listener)
}

/// Serves `router` on the unix socket at `path` (see [`bind_unix`]) until
/// `shutdown` completes, then removes the socket file.
pub async fn serve_unix<F>(
    path: impl AsRef<Path>,
    router: Router,
    shutdown: F,
) -> Result<(), ApiError>
where
    F: Future<Output = ()> + Send,
{
    let path = path.as_ref();
    let listener = bind_unix(path).await?;
    let result = router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(ApiError::Serve);
    // Best effort: a leftover socket is cleaned by the next bind anyway.
    let _ = std::fs::remove_file(path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::status_service_client::StatusServiceClient;
    use crate::v1::status_service_server::{StatusService, StatusServiceServer};
    use crate::v1::{StatusRequest, StatusResponse};
    use tonic::{Request, Response, Status};

    struct FixedStatus;

    #[tonic::async_trait]
    impl StatusService for FixedStatus {
        async fn status(
            &self,
            _request: Request<StatusRequest>,
        ) -> Result<Response<StatusResponse>, Status> {
            Ok(Response::new(StatusResponse {
                version: "test".into(),
                datapath_backend: "fake".into(),
                endpoint_count: 3,
                ..Default::default()
            }))
        }
    }

    #[tokio::test]
    async fn round_trip_over_unix_socket_with_root_only_mode()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join("sub/agent.sock");
        // A stale socket file (nobody listening) must be replaced.
        std::fs::create_dir_all(dir.path().join("sub"))?;
        drop(std::os::unix::net::UnixListener::bind(&sock)?);

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let router =
            tonic::transport::Server::builder().add_service(StatusServiceServer::new(FixedStatus));
        let listener = bind_unix(&sock).await?;
        let mode = std::fs::metadata(&sock)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second bind while the first is live is refused.
        assert!(matches!(bind_unix(&sock).await, Err(ApiError::InUse(_))));

        let server = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await
        });
        let channel = connect_unix(&sock).await?;
        let reply = StatusServiceClient::new(channel)
            .status(StatusRequest {})
            .await?
            .into_inner();
        assert_eq!(reply.endpoint_count, 3);
        assert_eq!(reply.datapath_backend, "fake");
        let _ = stop_tx.send(());
        server.await??;
        Ok(())
    }

    #[tokio::test]
    async fn connect_to_missing_socket_fails_cleanly() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { return };
        let err = connect_unix(dir.path().join("none.sock")).await;
        assert!(matches!(err, Err(ApiError::Connect { .. })));
    }

    #[tokio::test]
    async fn refuses_to_replace_a_regular_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("file");
        std::fs::write(&path, b"x")?;
        assert!(matches!(
            bind_unix(&path).await,
            Err(ApiError::Listen { .. })
        ));
        assert!(path.exists());
        Ok(())
    }
}
