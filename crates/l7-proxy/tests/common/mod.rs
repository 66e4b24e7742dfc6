//! Loopback harness: a real hyper upstream, the proxy in front of it, real clients.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use weir_identity::{Identity, LabelFilter, pod_identity_labels};
use weir_l7_proxy::{
    ChannelSink, EndpointId, L7Proxy, L7Record, PolicySnapshot, PolicyStore, ProxyConfig,
    StaticDestination, StaticIdentities,
};
use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, L7Policy, NamedPorts};
use weir_policy_model::{Direction, parse_policies};

pub const API_L7_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api-l7-policy
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: api-server
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: frontend
      toPorts:
        - ports:
            - port: '8080'
              protocol: TCP
          rules:
            http:
              - method: GET
                path: '/api/products'
              - method: POST
                path: '/api/orders'
              - method: GET
                path: '/api/users/[0-9]+'
"#;

pub const GRPC_L7_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: grpc-l7-policy
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: api-server
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: frontend
      toPorts:
        - ports:
            - port: '8080'
              protocol: TCP
          rules:
            http:
              - method: POST
                path: '/mypackage.MyService/GetItems'
              - method: POST
                path: '/mypackage.MyService/CreateItem'
"#;

pub const FRONTEND: Identity = Identity(1000);
pub const API: Identity = Identity(1001);
pub const ENDPOINT: EndpointId = EndpointId(7);
pub const UPSTREAM_PORT: u16 = 8080;

/// Compiles `yaml` for the api-server endpoint, with frontend and api-server identities.
pub fn compile(yaml: &str) -> L7Policy {
    let filter = LabelFilter::default();
    let labels = |app: &str| {
        pod_identity_labels(
            "production",
            [("app", app)],
            [("env", "prod")],
            "default",
            "default",
            &filter,
        )
    };
    let mut c = Compiler::new(CompilerConfig::default());
    c.upsert_identity(FRONTEND, labels("frontend"), NamedPorts::new());
    c.upsert_identity(API, labels("api-server"), NamedPorts::new());
    for p in parse_policies("test.yaml", yaml).expect("policy parses") {
        c.upsert_policy(p);
    }
    let ep = EndpointInfo {
        identity: API,
        labels: labels("api-server"),
        named_ports: NamedPorts::new(),
    };
    c.compile(&ep).l7
}

pub fn snapshot(yaml: &str) -> PolicySnapshot {
    PolicySnapshot::empty().with_endpoint(ENDPOINT, Arc::new(compile(yaml)))
}

pub struct Harness {
    pub proxy_addr: SocketAddr,
    pub upstream_addr: SocketAddr,
    pub store: Arc<PolicyStore>,
    pub sink: Arc<ChannelSink>,
    pub records: tokio::sync::mpsc::Receiver<L7Record>,
}

/// Binds the upstream on some 127.x.y.z:8080 (loopback is a /8), so the policy's port 8080 is
/// the original destination's port without clashing with anything else.
async fn bind_upstream() -> TcpListener {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for i in 0..200u64 {
        let x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(i * 1442695040888963407);
        let ip = Ipv4Addr::new(
            127,
            10 + (x % 200) as u8,
            (x >> 8) as u8,
            1 + (x >> 16) as u8 % 250,
        );
        if let Ok(l) = TcpListener::bind((ip, UPSTREAM_PORT)).await {
            return l;
        }
    }
    panic!("no free loopback address for the upstream");
}

pub async fn start(snapshot: PolicySnapshot, config: ProxyConfig) -> Harness {
    let upstream = bind_upstream().await;
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(run_upstream(upstream));

    let store = Arc::new(PolicyStore::new(snapshot));
    let (sink, records) = ChannelSink::new(10_000);
    let sink = Arc::new(sink);
    let identities = StaticIdentities {
        identities: HashMap::from([(IpAddr::from([127, 0, 0, 1]), FRONTEND)]),
        endpoints: HashMap::from([(upstream_addr.ip(), ENDPOINT)]),
    };
    let proxy = Arc::new(L7Proxy::new(
        config,
        store.clone(),
        Arc::new(StaticDestination::always(upstream_addr)),
        Arc::new(identities),
        sink.clone(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    tokio::spawn(proxy.serve(listener, Direction::Ingress));
    Harness {
        proxy_addr,
        upstream_addr,
        store,
        sink,
        records,
    }
}

async fn run_upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service_fn(upstream_service))
                .await;
        });
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// The upstream: counts the request body, and answers `<method> <path> <bytes>`, plus the
/// request's `x-token` values in `x-saw-token`. gRPC paths get a gRPC answer with trailers;
/// a request with `x-echo` gets its own body back, streamed.
async fn upstream_service(mut req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        // Switch to a byte echo.
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        resp.headers_mut()
            .insert("upgrade", "echo".parse().unwrap());
        return Ok(resp);
    }
    if req.headers().contains_key("x-echo") {
        // Streams the request body back as it arrives: the answer starts before the body ends.
        return Ok(Response::new(req.into_body().boxed()));
    }
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let tokens: Vec<String> = req
        .headers()
        .get_all("x-token")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut body = req.into_body();
    let mut n = 0usize;
    while let Some(Ok(f)) = body.frame().await {
        if let Some(d) = f.data_ref() {
            n += d.len();
        }
    }
    if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        // One gRPC message: uncompressed, 2 bytes.
        let msg = Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]);
        let b = Full::new(msg)
            .with_trailers(async move { Some(Ok(trailers)) })
            .map_err(|e| match e {})
            .boxed();
        let mut resp = Response::new(b);
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(resp);
    }
    let mut resp = Response::new(full(format!("{method} {path} {n}")));
    resp.headers_mut()
        .insert("x-saw-token", tokens.join("|").parse().unwrap());
    Ok(resp)
}

/// A request body of `left` bytes, produced in 64 KiB chunks as it is read.
pub struct Repeat {
    pub left: usize,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(64 * 1024);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
    }
}

/// An HTTP/1.1 client connection through the proxy.
pub async fn h1_client<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// An HTTP/2 prior-knowledge client connection through the proxy.
pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    req("GET", path, "")
}

pub fn req(method: &str, path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "api-server:8080")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Status and body of a response.
pub async fn read(resp: Response<Incoming>) -> (u16, String) {
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
