//! Responses the proxy makes itself: denials and upstream failures.
//!
//! # gRPC
//!
//! A gRPC client only understands gRPC statuses, and HTTP errors other than a few are turned
//! into `UNKNOWN` or `INTERNAL` by client libraries. So for a gRPC request (`content-type:
//! application/grpc*`) the proxy answers in gRPC's *trailers-only* form: HTTP `200`,
//! `content-type: application/grpc`, `grpc-status` and `grpc-message` in the one header block,
//! which ends the stream. The status is the one gRPC's own HTTP-to-gRPC mapping (and Envoy's,
//! which Cilium uses) gives the plain-HTTP answer: `403` → `7 PERMISSION_DENIED` for a policy
//! denial, `503` → `14 UNAVAILABLE` when the upstream cannot be reached. A real client then
//! reports `PermissionDenied: Access denied`.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::upstream::UpstreamBody;

/// The body of every response the proxy sends: the upstream's, streamed, or its own.
#[derive(Debug)]
pub struct ProxyBody(Inner);

enum Inner {
    /// Through hyper's client (HTTP/2, requests with bodies, upgrades).
    Client(Incoming),
    /// Read from the upstream connection in the client connection's task (HTTP/1 fast path).
    Direct(UpstreamBody),
    /// The proxy's own answer.
    Local(Full<Bytes>),
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Inner::Client(_) => "Client",
            Inner::Direct(_) => "Direct",
            Inner::Local(_) => "Local",
        })
    }
}

impl ProxyBody {
    pub(crate) fn client(body: Incoming) -> Self {
        ProxyBody(Inner::Client(body))
    }

    pub(crate) fn direct(body: UpstreamBody) -> Self {
        ProxyBody(Inner::Direct(body))
    }

    fn local(bytes: Bytes) -> Self {
        ProxyBody(Inner::Local(Full::new(bytes)))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().0 {
            Inner::Client(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Local(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Client(b) => b.is_end_stream(),
            Inner::Direct(b) => b.is_end_stream(),
            Inner::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Client(b) => b.size_hint(),
            Inner::Direct(b) => b.size_hint(),
            Inner::Local(b) => b.size_hint(),
        }
    }
}

/// The body of a denial, as Cilium's Envoy sends it.
pub const ACCESS_DENIED_BODY: &str = "Access denied\r\n";
/// gRPC `PERMISSION_DENIED`.
pub const GRPC_PERMISSION_DENIED: u32 = 7;
/// gRPC `UNAVAILABLE`.
pub const GRPC_UNAVAILABLE: u32 = 14;

/// Whether a request is a gRPC call.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A response the proxy makes: (response, gRPC status if any).
pub(crate) fn local_reply(
    status: StatusCode,
    body: &'static str,
    grpc: Option<(u32, &'static str)>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(Bytes::new()));
    match grpc {
        Some((code, message)) => {
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static(message));
        }
        None => {
            *resp.status_mut() = status;
            *resp.body_mut() = ProxyBody::local(Bytes::from_static(body.as_bytes()));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
    }
    resp
}

/// The answer to a denied request.
pub(crate) fn access_denied(grpc: bool) -> Response<ProxyBody> {
    local_reply(
        StatusCode::FORBIDDEN,
        ACCESS_DENIED_BODY,
        grpc.then_some((GRPC_PERMISSION_DENIED, "Access denied")),
    )
}

/// The answer to a request the proxy refuses to decide because it is ambiguous.
pub(crate) fn bad_request() -> Response<ProxyBody> {
    let mut resp = local_reply(StatusCode::BAD_REQUEST, "Bad Request\r\n", None);
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The answer when the upstream cannot be reached or fails before its response head.
pub(crate) fn upstream_unavailable(grpc: bool) -> Response<ProxyBody> {
    local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream connect error\r\n",
        grpc.then_some((GRPC_UNAVAILABLE, "upstream connect error")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn denial_forms() {
        let r = access_denied(false);
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[CONTENT_LENGTH], "15");
        let body = r.into_body();
        let rt = tokio::runtime::Builder::new_current_thread().build();
        let bytes = rt
            .ok()
            .and_then(|rt| rt.block_on(body.collect()).ok())
            .map(|c| c.to_bytes());
        assert_eq!(bytes.as_deref(), Some(ACCESS_DENIED_BODY.as_bytes()));

        let g = access_denied(true);
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "7");
        assert_eq!(g.headers()["grpc-message"], "Access denied");
        assert!(g.body().is_end_stream(), "trailers-only");
    }

    #[test]
    fn grpc_detection() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&h));
    }
}
