//! Weir's L7 proxy: enforces `rules.http` (Cilium's L7 HTTP/gRPC policy) on connections the
//! datapath redirects to it, and forwards allowed requests to where they were going.
//!
//! - Serves HTTP/1.1 (keep-alive, pipelining, chunked bodies, `Expect: 100-continue`, upgrades
//!   when the upgrade request is allowed) and HTTP/2 including h2c prior knowledge, so gRPC
//!   works. Bodies stream through; nothing is buffered whole.
//! - Each client connection gets its own upstream connection to its original destination,
//!   kept alive across its requests, so the request reaches the server as sent (minus
//!   hop-by-hop headers). A body-less HTTP/1.1 request (the common `GET`) is written and its
//!   response read in the client connection's own task, with no task or channel in between;
//!   requests with a body, upgrades and HTTP/1.0 go through hyper's client on a second
//!   upstream connection, opened when first needed, and HTTP/2 through an HTTP/2 one.
//! - Every request is decided against the current [`PolicySnapshot`] in the [`PolicyStore`];
//!   a published snapshot applies from the next request, on existing connections too.
//! - Fails closed: a connection to or from an address that is not a local endpoint, or a
//!   port the snapshot has no rules for, gets `403` on every request; a connection whose
//!   original destination cannot be found is closed.
//! - Denials: `403` with body `Access denied\r\n`, connection kept; gRPC calls get
//!   `PERMISSION_DENIED` (see [gRPC](#grpc) below).
//! - Ambiguous requests are refused, not guessed at: more than one `Host` header is `400`
//!   and closes the connection (RFC 9112), as hyper already does for malformed heads and
//!   conflicting `Content-Length`s.
//! - Every request produces an [`L7Record`] for a [`FlowSink`].
//! - Egress and ingress rules on one connection: when an egress connection's upstream is
//!   redirected back to this proxy's ingress listener (the server's ingress has HTTP rules
//!   too), the ingress side judges the original client's identity, not the node's address.
//!
//! # gRPC
//!
//! A denied gRPC call (`content-type: application/grpc*`) is answered in gRPC's trailers-only
//! form: HTTP `200`, `grpc-status: 7` (`PERMISSION_DENIED`), `grpc-message: Access denied`.
//! `7` is what the plain answer, HTTP `403`, maps to in gRPC's and Envoy's HTTP→gRPC status
//! mapping, so clients see the same error behind Weir as behind Cilium's Envoy. An unreachable
//! upstream is `14` (`UNAVAILABLE`, from `503`).
//!
//! # Paths
//!
//! Paths are matched as sent (no percent-decoding, no `..` folding), like Envoy without path
//! normalisation: a rule for `/api/products` does not admit `/api/%70roducts`, and `/api/users/[0-9]+` does not admit
//! `/api/users/42/../../admin`.

mod chain;
mod config;
mod context;
mod io;
mod policy;
mod proxy;
mod record;
mod respond;
mod service;
mod upstream;

pub use config::ProxyConfig;
pub use context::{
    ConnectionContext, IdentityResolver, NatDestination, OriginalDestination, StaticDestination,
    StaticIdentities, TransparentDestination, UpstreamMark, transparent_listener,
};
pub use policy::{Decision, DenyReason, EndpointId, HeaderAction, PolicySnapshot, PolicyStore};
pub use proxy::L7Proxy;
pub use record::{ChannelSink, FlowSink, L7Record, NullSink, RecordVerdict};
pub use respond::{ACCESS_DENIED_BODY, GRPC_PERMISSION_DENIED, GRPC_UNAVAILABLE, ProxyBody};
