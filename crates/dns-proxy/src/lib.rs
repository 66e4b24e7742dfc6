//! Weir's DNS proxy: enforces `rules.dns` (Cilium's DNS L7 policy) on the queries the datapath
//! redirects to it, and learns name → IP answers so `toFQDNs` policies work.
//!
//! - **Enforcement.** Each query is decided against the current [`DnsPolicySnapshot`]: the
//!   endpoint's egress L7 verdict for (DNS server identity, UDP/TCP, port), and the query
//!   name, lower-cased and fully qualified, against the rules' `matchName`/`matchPattern`.
//!   Denied queries get REFUSED (or NXDOMAIN, [`DenyResponse`]) at once, without reaching
//!   upstream. Fails closed: unknown clients, unredirected ports and uncompilable rules are
//!   refused.
//! - **Forwarding.** Allowed queries go to the server the client addressed (its original
//!   destination). Over UDP they share a few connected sockets per server, each query under
//!   a fresh random ID that is swapped back to the client's in the answer (the sockets are
//!   replaced every few thousand queries, so the source port still changes); over TCP they
//!   are pipelined on one connection per server, under random IDs too. Only a message that matches the forwarded query (ID, QR,
//!   the single question) is accepted; anything else is dropped and counted, and nothing is
//!   learned from it. No answer within `upstream_timeout`: SERVFAIL.
//! - **Learning.** From an allowed NOERROR answer, the A/AAAA records of the query name's
//!   CNAME chain (and only those) are extracted with their TTLs. If any `toFQDNs` selector
//!   selects a name of the chain, the [`DnsLearner`] is awaited **before** the answer is
//!   released, so the client's first packet to a learned IP is already allowed; if it fails
//!   the client gets SERVFAIL. The answer is then recorded in the [`NameCache`].
//! - **Expiry.** [`NameCache::gc`] drops an IP when its TTL (raised to `min_ttl`) has passed
//!   and no connection to it was live within `idle_grace` (default 0, as Cilium's
//!   `--tofqdns-idle-connection-grace-period`), as the agent's [`ConnectionActivity`] reports
//!   from conntrack: as in Cilium, expiry never cuts a live connection.
//! - **Robustness.** Messages under 12 bytes or with QR set are dropped; messages that do
//!   not parse (truncated, compression loops, bad counts) get a header-only FORMERR; opcodes
//!   other than QUERY get NOTIMP; more or fewer than one question FORMERR; classes other than
//!   IN REFUSED. Bounded: at most `max_outstanding` forwarded queries, 64 KiB messages.
//! - **Flows.** Every query and every answer produces a [`DnsRecord`] for a [`DnsSink`].
//!
//! Interception: [`DnsUdpSocket::transparent`] (TPROXY, `IP_RECVORIGDSTADDR`, answers sent
//! from the original server address) and, for TCP, the HTTP proxy's
//! [`weir_l7_proxy::transparent_listener`] with [`weir_l7_proxy::TransparentDestination`]. Both
//! need `CAP_NET_ADMIN`, as does [`DnsProxyConfig::upstream_mark`].
//!
//! The wire format is `hickory-proto`'s, used only inside [`wire`]; the public API speaks plain
//! data.

mod cache;
mod config;
mod learn;
mod policy;
mod proxy;
mod record;
mod stats;
mod tcp_upstream;
mod udp;
mod upstream;
pub mod wire;

pub use cache::{
    CacheConfig, CacheEntry, CacheError, CacheRow, ConnectionActivity, NameCache, NoConnections,
};
pub use config::{DenyResponse, DnsProxyConfig};
pub use learn::{DnsLearner, LearnError, LearnFuture, Learned, LearnedIp, NoLearning};
pub use policy::{
    DnsDecision, DnsDenyReason, DnsPolicySnapshot, DnsPolicyStore, FqdnSelectors, Transport,
};
pub use proxy::{DnsProxy, QueryContext};
pub use record::{DnsChannelSink, DnsNullSink, DnsRecord, DnsRecordKind, DnsSink, DnsVerdict};
pub use stats::DnsProxyStats;
pub use udp::DnsUdpSocket;
pub use weir_l7_proxy::{EndpointId, IdentityResolver, OriginalDestination, StaticIdentities};
pub use wire::{ParseError, parse_message};
