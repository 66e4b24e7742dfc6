//! One record per request, for `observe` (Hubble's L7 flows).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::{Method, Version};
use tokio::sync::mpsc;
use weir_identity::Identity;
use weir_policy_model::Direction;

use crate::policy::{DenyReason, EndpointId};

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordVerdict {
    /// Allowed and forwarded; the status is the upstream's.
    Forwarded,
    /// Denied by policy; the proxy answered itself.
    Denied(DenyReason),
    /// Allowed, but the upstream could not be reached or failed.
    Error,
}

/// One proxied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7Record {
    /// When the request head arrived.
    pub time: SystemTime,
    /// The local endpoint (`None` when the connection matched no local endpoint).
    pub endpoint: Option<EndpointId>,
    /// Direction as seen from the endpoint.
    pub direction: Direction,
    /// The remote identity.
    pub remote_identity: Identity,
    /// The client's address.
    pub source: SocketAddr,
    /// The original destination.
    pub destination: SocketAddr,
    /// The request method.
    pub method: Method,
    /// The request target as sent: path and query (HTTP/2: `:path`).
    pub url: String,
    /// `:authority` or `Host`.
    pub host: Option<String>,
    /// The HTTP version on the client side.
    pub version: Version,
    /// The status sent to the client (for gRPC denials, 200; see `grpc_status`).
    pub status: u16,
    /// The gRPC status the proxy answered with, for a denied gRPC call.
    pub grpc_status: Option<u32>,
    /// From the request head to the response head.
    pub latency: Duration,
    /// What happened.
    pub verdict: RecordVerdict,
    /// The rule that decided (allowing rule), as `namespace/name section[index]`.
    pub rule: Option<String>,
}

/// Where records go. Must not block: the proxy calls it on the request path.
pub trait FlowSink: Send + Sync {
    /// Takes one record.
    fn record(&self, record: L7Record);
}

/// Discards every record.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullSink;

impl FlowSink for NullSink {
    fn record(&self, _record: L7Record) {}
}

/// Sends records into a bounded channel; when it is full the record is dropped and counted,
/// so a slow consumer never slows requests.
#[derive(Debug)]
pub struct ChannelSink {
    tx: mpsc::Sender<L7Record>,
    dropped: AtomicU64,
}

impl ChannelSink {
    /// A sink and the receiver to read records from, holding up to `capacity` records
    /// (at least 1).
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<L7Record>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            ChannelSink {
                tx,
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// How many records were dropped because the channel was full or closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl FlowSink for ChannelSink {
    fn record(&self, record: L7Record) {
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
