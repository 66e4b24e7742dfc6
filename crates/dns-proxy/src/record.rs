//! One record per query and one per answer, for `observe` (Hubble's DNS flows).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use weir_identity::Identity;
use weir_l7_proxy::EndpointId;

use crate::policy::{DnsDenyReason, Transport};

/// Whether a record is the query or the answer (Hubble's `REQUEST`/`RESPONSE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsRecordKind {
    /// The client's query, as decided.
    Query,
    /// The answer sent to the client.
    Response,
}

/// What happened to a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsVerdict {
    /// Allowed and forwarded; the answer is the upstream's.
    Forwarded,
    /// Denied by policy; the proxy answered REFUSED (or NXDOMAIN).
    Denied(DnsDenyReason),
    /// Malformed or unsupported query; the proxy answered FORMERR/NOTIMP.
    Malformed,
    /// Allowed, but the upstream failed or timed out, or learning failed: SERVFAIL.
    Error,
}

/// One DNS flow record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    /// When the query arrived.
    pub time: SystemTime,
    /// Query or answer.
    pub kind: DnsRecordKind,
    /// UDP or TCP.
    pub transport: Transport,
    /// The local endpoint (`None` when the client is not one).
    pub endpoint: Option<EndpointId>,
    /// The client.
    pub source: SocketAddr,
    /// The DNS server the query was for (the original destination).
    pub server: SocketAddr,
    /// The server's identity.
    pub server_identity: Identity,
    /// The query ID.
    pub id: u16,
    /// The query name (lower-case, trailing dot); empty when the query did not parse.
    pub query: String,
    /// The query types (`A`, `AAAA`, ...).
    pub qtypes: Vec<String>,
    /// The answer's response code (answers only).
    pub rcode: Option<u16>,
    /// Addresses of the answer's CNAME chain (answers only).
    pub ips: Vec<IpAddr>,
    /// CNAME targets followed (answers only).
    pub cnames: Vec<String>,
    /// The smallest TTL among `ips` (answers only).
    pub ttl: Option<u32>,
    /// What happened.
    pub verdict: DnsVerdict,
    /// The rule that allowed the query, as `namespace/name section[index]`.
    pub rule: Option<String>,
    /// From the query's arrival to the answer's release (zero for queries).
    pub latency: Duration,
}

/// Where records go. Must not block: the proxy calls it on the query path.
pub trait DnsSink: Send + Sync {
    /// Takes one record.
    fn record(&self, record: DnsRecord);
}

/// Discards every record.
#[derive(Debug, Clone, Copy, Default)]
pub struct DnsNullSink;

impl DnsSink for DnsNullSink {
    fn record(&self, _record: DnsRecord) {}
}

/// Sends records into a bounded channel; when it is full the record is dropped and counted.
#[derive(Debug)]
pub struct DnsChannelSink {
    tx: mpsc::Sender<DnsRecord>,
    dropped: AtomicU64,
}

impl DnsChannelSink {
    /// A sink and its receiver, holding up to `capacity` records (at least 1).
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<DnsRecord>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            DnsChannelSink {
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

impl DnsSink for DnsChannelSink {
    fn record(&self, record: DnsRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
