//! The Observer gRPC service (`observer.Observer`) over an [`Observer`], and the listeners
//! it is served on: a unix socket by default, TCP when configured (Hubble's port 4244).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::enrich::timestamp;
use crate::filter::FilterSet;
use crate::observer::Observer;
use crate::proto::flow::Flow;
use crate::proto::observer::observer_server::{self, ObserverServer};
use crate::proto::observer::{
    GetFlowsRequest, GetFlowsResponse, GetNodesRequest, GetNodesResponse, Node,
    ServerStatusRequest, ServerStatusResponse, get_flows_response,
};
use crate::ring::Event;

/// Where `weir-agent` serves the Observer API unless configured otherwise.
pub const DEFAULT_HUBBLE_SOCKET: &str = "/run/weir/hubble.sock";

/// Failures while serving or connecting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening socket could not be prepared.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path or address.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("observer server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// Connecting failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Where.
        path: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct ObserverService {
    observer: Arc<Observer>,
}

impl ObserverService {
    /// A service reading from `observer`.
    pub fn new(observer: Arc<Observer>) -> Self {
        ObserverService { observer }
    }

    /// The tonic server to add to a router.
    pub fn into_server(self) -> ObserverServer<Self> {
        ObserverServer::new(self)
    }
}

fn ts_key(t: &prost_types::Timestamp) -> (i64, i32) {
    (t.seconds, t.nanos)
}

/// The request's window and filters, applied to one flow.
struct Selection {
    filters: FilterSet,
    since: Option<(i64, i32)>,
    until: Option<(i64, i32)>,
}

impl Selection {
    fn wants(&self, flow: &Flow) -> bool {
        let t = flow.time.as_ref().map(ts_key).unwrap_or((0, 0));
        self.since.is_none_or(|s| t >= s)
            && self.until.is_none_or(|u| t <= u)
            && self.filters.matches(flow)
    }
}

fn response(observer: &Observer, event: Event) -> GetFlowsResponse {
    let (types, time) = match event {
        Event::Flow(f) => {
            let time = f.time;
            (
                get_flows_response::ResponseTypes::Flow(Arc::unwrap_or_clone(f)),
                time,
            )
        }
        Event::Lost(l) => (
            get_flows_response::ResponseTypes::LostEvents(l),
            Some(timestamp(std::time::SystemTime::now())),
        ),
    };
    GetFlowsResponse {
        response_types: Some(types),
        node_name: observer.node_name().to_string(),
        time,
    }
}

/// The history part of a request: which ring events to send, oldest first.
fn history(events: Vec<Event>, req: &GetFlowsRequest, sel: &Selection) -> Vec<Event> {
    let wanted = |e: &Event| match e {
        Event::Flow(f) => sel.wants(f),
        Event::Lost(_) => true,
    };
    let number = usize::try_from(req.number).unwrap_or(usize::MAX);
    let is_flow = |e: &Event| matches!(e, Event::Flow(_));
    if req.first {
        let mut out = Vec::new();
        let mut flows = 0usize;
        for e in events.into_iter().filter(|e| wanted(e)) {
            if number != 0 && flows >= number {
                break;
            }
            flows += usize::from(is_flow(&e));
            out.push(e);
        }
        return out;
    }
    if number == 0 {
        // `follow` alone streams new flows only; a time window or a plain request reads
        // the whole ring.
        if req.follow && req.since.is_none() {
            return Vec::new();
        }
        return events.into_iter().filter(|e| wanted(e)).collect();
    }
    let mut out = Vec::new();
    let mut flows = 0usize;
    for e in events.into_iter().rev().filter(|e| wanted(e)) {
        if flows >= number {
            break;
        }
        flows += usize::from(is_flow(&e));
        out.push(e);
    }
    out.reverse();
    out
}

#[tonic::async_trait]
impl observer_server::Observer for ObserverService {
    type GetFlowsStream = ReceiverStream<Result<GetFlowsResponse, Status>>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = request.into_inner();
        if req.first && req.follow {
            return Err(Status::invalid_argument(
                "first cannot be combined with follow",
            ));
        }
        let filters = FilterSet::new(&req.whitelist, &req.blacklist)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let sel = Selection {
            filters,
            since: req.since.as_ref().map(ts_key),
            until: req.until.as_ref().map(ts_key),
        };
        let (tx, rx) = mpsc::channel(1024);
        let observer = self.observer.clone();
        // Taken before the call returns: a follower receives every flow published after the
        // client saw the stream open, however late the task below first runs.
        let (events, next) = observer.snapshot();
        tokio::spawn(async move {
            for e in history(events, &req, &sel) {
                if tx.send(Ok(response(&observer, e))).await.is_err() {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            let mut follower = observer.follow_from(next);
            loop {
                let batch = tokio::select! {
                    b = follower.next_batch(256) => b,
                    () = tx.closed() => return,
                };
                let Some(batch) = batch else {
                    return;
                };
                for e in batch {
                    let keep = match &e {
                        Event::Flow(f) => sel.wants(f),
                        Event::Lost(_) => true,
                    };
                    if keep && tx.send(Ok(response(&observer, e))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_nodes(
        &self,
        _request: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let s = self.observer.status();
        Ok(Response::new(GetNodesResponse {
            nodes: vec![Node {
                name: self.observer.node_name().to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                address: String::new(),
                state: 1,
                uptime_ns: s.uptime_ns,
                num_flows: s.num_flows,
                max_flows: s.max_flows,
                seen_flows: s.seen_flows,
            }],
        }))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let s = self.observer.status();
        Ok(Response::new(ServerStatusResponse {
            num_flows: s.num_flows,
            max_flows: s.max_flows,
            seen_flows: s.seen_flows,
            uptime_ns: s.uptime_ns,
            num_connected_nodes: Some(1),
            num_unavailable_nodes: Some(0),
            unavailable_nodes: Vec::new(),
            version: format!("weir {}", env!("CARGO_PKG_VERSION")),
        }))
    }
}

/// Binds a unix socket (mode 0600), replacing a stale socket file but never anything else.
pub async fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Listen {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "a running server answers on this socket",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves the Observer service on a bound unix listener until `shutdown`.
pub async fn serve_unix_listener<F>(
    listener: UnixListener,
    observer: Arc<Observer>,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    tonic::transport::Server::builder()
        .add_service(ObserverService::new(observer).into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Serve)
}

/// Serves the Observer service on a unix socket at `path` until `shutdown`, then removes it.
pub async fn serve_unix<F>(
    path: &Path,
    observer: Arc<Observer>,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let listener = bind_unix(path).await?;
    let result = serve_unix_listener(listener, observer, shutdown).await;
    let _ = std::fs::remove_file(path);
    result
}

/// Serves the Observer service on a TCP address until `shutdown`.
pub async fn serve_tcp<F>(
    addr: SocketAddr,
    observer: Arc<Observer>,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen {
            path: addr.to_string(),
            source,
        })?;
    tonic::transport::Server::builder()
        .add_service(ObserverService::new(observer).into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Serve)
}

/// A client channel to an Observer on a unix socket.
pub async fn connect_unix(path: impl Into<PathBuf>) -> Result<Channel, ServeError> {
    let path = path.into();
    let dial = path.clone();
    // The URI is required by tonic but never resolved: the connector ignores it.
    Endpoint::from_static("http://weir-observer.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let dial = dial.clone();
            async move { UnixStream::connect(dial).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ServeError::Connect {
            path: path.display().to_string(),
            source,
        })
}

/// A client channel to an Observer on a TCP address (`host:port`, no TLS).
pub async fn connect_tcp(addr: &str) -> Result<Channel, ServeError> {
    let uri = format!("http://{addr}");
    let err = |source| ServeError::Connect {
        path: addr.to_string(),
        source,
    };
    Endpoint::from_shared(uri)
        .map_err(err)?
        .connect()
        .await
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::flow::{FlowFilter, Verdict};

    fn flows(n: u32) -> Vec<Event> {
        (0..n)
            .map(|i| {
                Event::Flow(Arc::new(Flow {
                    verdict: if i % 2 == 0 {
                        Verdict::Dropped as i32
                    } else {
                        Verdict::Forwarded as i32
                    },
                    drop_reason: i,
                    time: Some(prost_types::Timestamp {
                        seconds: i64::from(i),
                        nanos: 0,
                    }),
                    ..Flow::default()
                }))
            })
            .collect()
    }

    fn sel(verdict: Option<Verdict>) -> Selection {
        let wl: Vec<FlowFilter> = verdict
            .map(|v| FlowFilter {
                verdict: vec![v as i32],
                ..FlowFilter::default()
            })
            .into_iter()
            .collect();
        Selection {
            filters: FilterSet::new(&wl, &[]).unwrap_or_default(),
            since: None,
            until: None,
        }
    }

    fn ids(events: &[Event]) -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Flow(f) => Some(f.drop_reason),
                Event::Lost(_) => None,
            })
            .collect()
    }

    #[test]
    fn last_first_and_all() {
        let last = GetFlowsRequest {
            number: 2,
            ..GetFlowsRequest::default()
        };
        assert_eq!(
            ids(&history(flows(10), &last, &sel(Some(Verdict::Dropped)))),
            [6, 8]
        );
        let first = GetFlowsRequest {
            number: 2,
            first: true,
            ..GetFlowsRequest::default()
        };
        assert_eq!(ids(&history(flows(10), &first, &sel(None))), [0, 1]);
        let all = GetFlowsRequest::default();
        assert_eq!(history(flows(10), &all, &sel(None)).len(), 10);
        let follow = GetFlowsRequest {
            follow: true,
            ..GetFlowsRequest::default()
        };
        assert!(history(flows(10), &follow, &sel(None)).is_empty());
        let mut window = sel(None);
        window.since = Some((3, 0));
        window.until = Some((5, 0));
        assert_eq!(ids(&history(flows(10), &all, &window)), [3, 4, 5]);
    }
}
