//! One request: decide, then answer locally or forward to the original destination.
//!
//! # What is matched
//!
//! The path is matched **as sent**: `:path` (HTTP/2) or the request target (HTTP/1, origin
//! form), query included, with no percent-decoding and no `..` or `//` folding, like Envoy
//! with path normalisation off (Cilium's default). So `/api/%70roducts` does not match a rule
//! for `/api/products`, and `/api/users/42/../../admin` does not match `/api/users/[0-9]+`
//! (the regex is a full match and `.` is not a digit). A backend that normalises paths itself
//! can therefore see a path a rule did not name only if a rule's regex admits the unnormalised
//! form; write path regexes with that in mind. The method is compared case-sensitively, as
//! sent. The host is `:authority`, or the `Host` header for HTTP/1. Repeated headers are joined
//! with `,` when compared with a required value (see `weir_l7_match`).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Instant, SystemTime};

use bytes::Buf;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use weir_l7_match::{HttpRequestView, MismatchAction};
use weir_policy_model::{Direction, RuleRef};

use crate::chain::{OwnUpstreams, Registration};
use crate::config::ProxyConfig;
use crate::context::{ConnectionContext, UpstreamMark};
use crate::policy::{Decision, DenyReason, HeaderAction, PolicyStore};
use crate::record::{FlowSink, L7Record, RecordVerdict};
use crate::respond::{self, GRPC_PERMISSION_DENIED, GRPC_UNAVAILABLE, ProxyBody};
use crate::upstream::{self, FastError, H1Conn, IdleSlot, UpstreamBody};

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) policy: Arc<PolicyStore>,
    pub(crate) sink: Arc<dyn FlowSink>,
    pub(crate) upstream_mark: Option<Arc<dyn UpstreamMark>>,
    /// Egress upstream connections, so the ingress side knows them when they come back.
    pub(crate) own_upstreams: Arc<OwnUpstreams>,
}

/// The upstream connection of one client connection: one per client connection, to its
/// original destination, opened on the first allowed request and reopened when it closes.
enum Upstream {
    None,
    Http1(http1::SendRequest<Incoming>),
    Http2(http2::SendRequest<Incoming>),
}

/// Per client connection.
pub(crate) struct ConnState {
    pub(crate) ctx: ConnectionContext,
    pub(crate) shared: Arc<Shared>,
    upstream: Mutex<Upstream>,
    /// The kept-alive HTTP/1.1 connection of the fast path, while no request uses it.
    idle: IdleSlot,
    /// The deciding rule's text for flow records, formatted once per connection and rule.
    rule_text: StdMutex<Option<(Arc<RuleRef>, String)>>,
    /// Requests whose response head has not been sent yet (the idle timer ignores a connection
    /// with requests in flight).
    pub(crate) in_flight: AtomicUsize,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnState {
    pub(crate) fn new(ctx: ConnectionContext, shared: Arc<Shared>) -> Self {
        ConnState {
            ctx,
            shared,
            upstream: Mutex::new(Upstream::None),
            idle: IdleSlot::default(),
            rule_text: StdMutex::new(None),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// `rule` as `namespace/name section[index]`; most requests of a connection are decided
    /// by the same rule, so its text is kept.
    fn rule_text(&self, rule: &Arc<RuleRef>) -> String {
        let Ok(mut cached) = self.rule_text.lock() else {
            return rule.to_string();
        };
        match &*cached {
            Some((r, text)) if Arc::ptr_eq(r, rule) => text.clone(),
            _ => {
                let text = rule.to_string();
                *cached = Some((rule.clone(), text.clone()));
                text
            }
        }
    }
}

/// What the flow record of a request needs, gathered as the request is handled and moved
/// into the record once (no per-request copies beyond the URL and host).
struct Pending {
    time: SystemTime,
    start: Instant,
    method: Method,
    url: String,
    host: Option<String>,
    version: Version,
    rule: Option<String>,
}

impl Pending {
    fn record(
        self,
        state: &ConnState,
        status: StatusCode,
        grpc_status: Option<u32>,
        verdict: RecordVerdict,
    ) {
        let ctx = &state.ctx;
        state.shared.sink.record(L7Record {
            time: self.time,
            endpoint: ctx.endpoint,
            direction: ctx.direction,
            remote_identity: ctx.remote_identity,
            source: ctx.source,
            destination: ctx.original_destination,
            method: self.method,
            url: self.url,
            host: self.host,
            version: self.version,
            status: status.as_u16(),
            grpc_status,
            latency: self.start.elapsed(),
            verdict,
            rule: self.rule,
        });
    }
}

/// Handles one request; never fails (errors become local replies).
pub(crate) async fn handle(
    state: Arc<ConnState>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    state.in_flight.fetch_add(1, Ordering::Relaxed);
    let _guard = InFlight(&state.in_flight);
    let ctx = &state.ctx;
    let version = req.version();
    let grpc = respond::is_grpc(req.headers());
    let mut pending = Pending {
        time: SystemTime::now(),
        start: Instant::now(),
        method: req.method().clone(),
        url: req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| req.uri().path().to_owned()),
        host: req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                    .map(str::to_owned)
            }),
        version,
        rule: None,
    };

    // Two `Host`s: the policy would check one and the backend might use the other.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        let resp = respond::bad_request();
        pending.record(
            &state,
            resp.status(),
            None,
            RecordVerdict::Denied(DenyReason::MalformedRequest),
        );
        return Ok(resp);
    }

    let decision = match ctx.endpoint {
        None => Decision {
            denied: Some(DenyReason::NoPolicy),
            rule: None,
            header_actions: Vec::new(),
        },
        Some(ep) => {
            let headers = header_view(req.headers());
            let view = HttpRequestView {
                method: pending.method.as_str(),
                path: &pending.url,
                host: pending.host.as_deref(),
                headers: &headers,
            };
            state.shared.policy.decide(
                ep,
                ctx.direction,
                ctx.remote_identity,
                ctx.original_destination.port(),
                &view,
            )
        }
    };
    pending.rule = decision.rule.as_ref().map(|r| state.rule_text(r));

    if let Some(reason) = decision.denied {
        let mut resp = respond::access_denied(grpc);
        if version <= Version::HTTP_11 && !drain_denied_body(&state, req.body_mut()).await {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        pending.record(
            &state,
            resp.status(),
            grpc.then_some(GRPC_PERMISSION_DENIED),
            RecordVerdict::Denied(reason),
        );
        return Ok(resp);
    }

    apply_header_actions(req.headers_mut(), &decision.header_actions);
    let upgrade = (version <= Version::HTTP_11 && req.headers().contains_key(header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade.is_some());
    // The client side answers `Expect: 100-continue` itself, when the body is first read.
    req.headers_mut().remove(header::EXPECT);

    // A body-less HTTP/1.1 request takes the fast path (see `upstream`).
    let fast = version == Version::HTTP_11
        && upgrade.is_none()
        && req.method() != Method::CONNECT
        && req.body().is_end_stream();
    let forwarded = if fast {
        forward_fast(&state, &req).await
    } else {
        forward(&state, req, upgrade.is_some())
            .await
            .map(|resp| resp.map(ProxyBody::client))
    };
    match forwarded {
        Ok(mut resp) => {
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            if let (Some(client_up), true) = (upgrade, switching) {
                let server_up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(c), Ok(s)) = (client_up.await, server_up.await) {
                        let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                });
            } else {
                strip_hop_by_hop(resp.headers_mut(), false);
            }
            *resp.version_mut() = version;
            pending.record(&state, resp.status(), None, RecordVerdict::Forwarded);
            Ok(resp)
        }
        Err(e) => {
            tracing::debug!(error = %e, dst = %ctx.original_destination, "upstream failed");
            let resp = respond::upstream_unavailable(grpc);
            pending.record(
                &state,
                resp.status(),
                grpc.then_some(GRPC_UNAVAILABLE),
                RecordVerdict::Error,
            );
            Ok(resp)
        }
    }
}

/// Every header as (name, value) for the matcher. Names are lower-case already; values that
/// are not UTF-8 are left out (a rule can then not be satisfied by them).
fn header_view(headers: &HeaderMap) -> Vec<(&str, &str)> {
    headers
        .iter()
        .filter_map(|(n, v)| {
            std::str::from_utf8(v.as_bytes())
                .ok()
                .map(|v| (n.as_str(), v))
        })
        .collect()
}

/// Reads and discards a denied request's body so the next request on the connection can be
/// parsed. `false` when the body is too long (or broken) and the connection must close.
async fn drain_denied_body(state: &ConnState, body: &mut Incoming) -> bool {
    if body.is_end_stream() {
        return true;
    }
    let mut left = state.shared.config.max_denied_body_drain;
    let drained = tokio::time::timeout(state.shared.config.header_read_timeout, async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                match left.checked_sub(data.remaining()) {
                    Some(l) => left = l,
                    None => return false,
                }
            }
        }
        true
    })
    .await;
    drained.unwrap_or(false)
}

fn apply_header_actions(headers: &mut HeaderMap, actions: &[HeaderAction]) {
    for a in actions {
        let Ok(name) = HeaderName::from_bytes(a.name.as_bytes()) else {
            continue;
        };
        let value = a
            .value
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok());
        match (a.action, value) {
            (MismatchAction::Add, Some(v)) => {
                headers.append(name, v);
            }
            (MismatchAction::Replace, Some(v)) => {
                headers.insert(name, v);
            }
            (MismatchAction::Delete, _) => {
                headers.remove(name);
            }
            (MismatchAction::Log, _) => {
                tracing::info!(header = %a.name, "header mismatch (LOG)");
            }
            _ => {}
        }
    }
}

/// Removes the headers that describe one hop, not the message: each side of the proxy has its
/// own connection and framing. For an upgrade, `Connection: upgrade` and `Upgrade` stay.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names instead of a lookup each.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // Options, not header names (and `keep-alive` goes below anyway): the usual
        // `Connection: keep-alive` then costs no list.
        .filter(|n| !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The headers `strip_hop_by_hop` removes whatever `Connection` lists.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::UPGRADE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Errors on the way to the upstream.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Fast(#[from] FastError),
}

/// Forwards a body-less HTTP/1.1 request on the connection's own kept-alive upstream
/// connection, reading the response in this task (see `upstream`).
async fn forward_fast(
    state: &Arc<ConnState>,
    req: &Request<Incoming>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let cfg = &state.shared.config;
    let max_head = cfg.max_header_bytes.max(8192);
    let idle = state.idle.lock().ok().and_then(|mut slot| slot.take());
    let (mut conn, mut reused) = match idle.filter(|c| c.idle_ok()) {
        Some(c) => (c, true),
        None => (H1Conn::connected(connect_stream(state).await?), false),
    };
    upstream::encode_head(req, &mut conn.head);
    let head_request = req.method() == Method::HEAD;
    loop {
        match upstream::roundtrip(&mut conn, head_request, reused, max_head, cfg.max_headers).await
        {
            Ok((resp, body)) => {
                let body = UpstreamBody::new(conn, body, state.idle.clone(), max_head);
                return Ok(resp.map(|()| ProxyBody::direct(body)));
            }
            // The upstream had timed the idle connection out; the request never reached it.
            // Retried once on a new connection when repeating it is harmless.
            Err(FastError::Stale) if reused && req.method().is_idempotent() => {
                let head = std::mem::take(&mut conn.head);
                conn = H1Conn::connected(connect_stream(state).await?);
                conn.head = head;
                reused = false;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn forward(
    state: &ConnState,
    req: Request<Incoming>,
    upgrade: bool,
) -> Result<Response<Incoming>, UpstreamError> {
    let h2 = req.version() == Version::HTTP_2;
    let mut slot = state.upstream.lock().await;
    let usable = match &mut *slot {
        Upstream::None => false,
        Upstream::Http1(s) => !s.is_closed() && s.ready().await.is_ok(),
        Upstream::Http2(s) => !s.is_closed() && s.ready().await.is_ok(),
    };
    if !usable {
        *slot = connect(state, h2).await?;
    }
    match &mut *slot {
        Upstream::Http1(s) => {
            s.ready().await?;
            let fut = s.send_request(req);
            if upgrade {
                // The connection becomes the tunnel; the next request opens a new one.
                *slot = Upstream::None;
            }
            drop(slot);
            Ok(fut.await?)
        }
        Upstream::Http2(s) => {
            let mut s = s.clone();
            drop(slot);
            s.ready().await?;
            Ok(s.send_request(req).await?)
        }
        Upstream::None => Err(UpstreamError::Timeout),
    }
}

/// A new connection to the original destination (marked, `TCP_NODELAY`), with its
/// registration when it is an egress client's (dropped with the connection).
async fn connect_stream(
    state: &ConnState,
) -> Result<(TcpStream, Option<Registration>), UpstreamError> {
    let mark = state
        .shared
        .upstream_mark
        .as_ref()
        .and_then(|m| m.mark(&state.ctx));
    let to = state.ctx.original_destination;
    let (stream, registration) = tokio::time::timeout(state.shared.config.connect_timeout, async {
        match state.ctx.direction {
            // It may come back to this proxy's ingress listener (see `chain`).
            Direction::Egress => {
                let own = &state.shared.own_upstreams;
                let (s, r) = own.connect(to, mark, state.ctx.local_identity).await?;
                Ok::<_, io::Error>((s, Some(r)))
            }
            Direction::Ingress => Ok((connect_marked(to, mark).await?, None)),
        }
    })
    .await
    .map_err(|_| UpstreamError::Timeout)??;
    let _ = stream.set_nodelay(true);
    Ok((stream, registration))
}

async fn connect(state: &ConnState, h2: bool) -> Result<Upstream, UpstreamError> {
    let (stream, registration) = connect_stream(state).await?;
    let io = TokioIo::new(stream);
    if h2 {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            let _registered = registration;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection");
            }
        });
        Ok(Upstream::Http2(send))
    } else {
        let (send, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            let _registered = registration;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream h1 connection");
            }
        });
        Ok(Upstream::Http1(send))
    }
}

/// Connects to `addr`, with `SO_MARK` set first when a mark is given.
async fn connect_marked(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(addr).await;
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    TcpSocket::from_std_stream(socket.into())
        .connect(addr)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upstream_connections_carry_the_mark() {
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            return;
        };
        let Ok(addr) = listener.local_addr() else {
            return;
        };
        match connect_marked(addr, Some(0x0A00)).await {
            Ok(stream) => {
                let mark = socket2::SockRef::from(&stream).mark();
                assert_eq!(mark.ok(), Some(0x0A00));
            }
            // SO_MARK needs CAP_NET_ADMIN.
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        }
        assert!(connect_marked(addr, None).await.is_ok());
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end"));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn header_actions() {
        let mut h = HeaderMap::new();
        h.insert("x-replace", HeaderValue::from_static("old"));
        h.insert("x-delete", HeaderValue::from_static("old"));
        let act = |action, name: &str, value: Option<&str>| HeaderAction {
            action,
            name: name.into(),
            value: value.map(str::to_string),
        };
        apply_header_actions(
            &mut h,
            &[
                act(MismatchAction::Add, "X-Add", Some("v")),
                act(MismatchAction::Replace, "X-Replace", Some("new")),
                act(MismatchAction::Delete, "X-Delete", Some("x")),
                act(MismatchAction::Add, "bad name", Some("v")),
                act(MismatchAction::Log, "X-Log", None),
            ],
        );
        assert_eq!(h["x-add"], "v");
        assert_eq!(h["x-replace"], "new");
        assert!(!h.contains_key("x-delete"));
        assert_eq!(h.len(), 2);
    }
}
