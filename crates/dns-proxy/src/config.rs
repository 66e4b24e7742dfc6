//! Proxy settings.

use std::time::Duration;

/// The code a denied query is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyResponse {
    /// REFUSED (Cilium's default).
    #[default]
    Refused,
    /// NXDOMAIN (Cilium's `--tofqdns-dns-reject-response-code=nameError`).
    NameError,
}

/// DNS proxy settings.
#[derive(Debug, Clone)]
pub struct DnsProxyConfig {
    /// How long to wait for the upstream's answer before answering SERVFAIL.
    pub upstream_timeout: Duration,
    /// How long the learner may take before the answer becomes SERVFAIL.
    pub learn_timeout: Duration,
    /// Queries forwarded and not yet answered, at most; beyond it queries get SERVFAIL.
    pub max_outstanding: usize,
    /// How denied queries are answered.
    pub deny_response: DenyResponse,
    /// A TCP client connection idle for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// `SO_MARK` for upstream sockets, so the datapath does not redirect the proxy's own
    /// queries back to it. Setting it needs `CAP_NET_ADMIN`.
    pub upstream_mark: Option<u32>,
    /// UDP sockets kept open per upstream server; forwarded queries are spread over them.
    pub upstream_sockets: usize,
}

impl Default for DnsProxyConfig {
    fn default() -> Self {
        DnsProxyConfig {
            upstream_timeout: Duration::from_secs(2),
            learn_timeout: Duration::from_secs(2),
            max_outstanding: 4096,
            deny_response: DenyResponse::Refused,
            tcp_idle_timeout: Duration::from_secs(10),
            upstream_mark: None,
            upstream_sockets: 4,
        }
    }
}
