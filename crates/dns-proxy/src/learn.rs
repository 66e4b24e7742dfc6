//! The hook the agent implements to turn an allowed answer into access: allocate identities
//! with the selectors' `fqdn:` labels for the IPs, update the ipcache and the policy maps.
//! The proxy awaits it before releasing the answer, so the client's first packet to a learned
//! IP is already allowed.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use weir_l7_match::DnsRule;
use weir_l7_proxy::EndpointId;

/// One address from an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LearnedIp {
    /// The address.
    pub ip: IpAddr,
    /// Seconds it may be used for: the smallest TTL along its CNAME chain, raised to the
    /// cache's minimum TTL.
    pub ttl: u32,
}

/// What one allowed answer teaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The endpoint that asked.
    pub endpoint: EndpointId,
    /// The query name (lower-case, trailing dot).
    pub name: String,
    /// The CNAME targets followed from it, in order (lower-case, trailing dot).
    pub aliases: Vec<String>,
    /// The addresses at the end of the chain.
    pub ips: Vec<LearnedIp>,
    /// The `toFQDNs` selectors that select the name or one of its aliases, each once: the
    /// `fqdn:` labels (see `weir_policy_compiler::fqdn_label`) the IPs' identities carry.
    pub selectors: Vec<DnsRule>,
}

/// The learner refused or failed; the client gets SERVFAIL (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("learning DNS answer failed: {0}")]
pub struct LearnError(pub String);

/// The future [`DnsLearner::learn`] returns.
pub type LearnFuture<'a> = Pin<Box<dyn Future<Output = Result<(), LearnError>> + Send + 'a>>;

/// Applies what an answer teaches. Called only for answers to queries the proxy forwarded,
/// with addresses whose names at least one `toFQDNs` selector selects; the answer is held
/// until the returned future completes (bounded by the proxy's `learn_timeout`).
pub trait DnsLearner: Send + Sync {
    /// Makes `learned.ips` reachable for the selectors' identities. Must be idempotent:
    /// repeated answers teach the same thing again.
    fn learn<'a>(&'a self, learned: &'a Learned) -> LearnFuture<'a>;
}

/// Learns nothing and always succeeds (a proxy that only filters).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLearning;

impl DnsLearner for NoLearning {
    fn learn<'a>(&'a self, _learned: &'a Learned) -> LearnFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}
