//! Limits and timeouts, so a slow or hostile client cannot exhaust the proxy.

use std::time::Duration;

/// Proxy settings. The defaults suit a node-local sidecar-less proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Connections served at once; further connections wait in the listen backlog.
    pub max_connections: usize,
    /// HTTP/1: most header lines in a request.
    pub max_headers: usize,
    /// HTTP/1: read buffer size, which bounds the request head (at least 8192);
    /// HTTP/2: bound on the decoded header list.
    pub max_header_bytes: usize,
    /// HTTP/1: time allowed to receive a complete request head once the connection is
    /// waiting for one.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2: concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Time allowed to connect to the original destination.
    pub connect_timeout: Duration,
    /// HTTP/1: bytes of a denied request's body read and discarded so the connection stays
    /// usable; a longer body closes the connection after the 403.
    pub max_denied_body_drain: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_connections: 10_000,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_streams: 256,
            connect_timeout: Duration::from_secs(5),
            max_denied_body_drain: 64 * 1024,
        }
    }
}
