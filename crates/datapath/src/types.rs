//! Plain data exchanged through the [`Datapath`](crate::Datapath) trait.

use std::collections::BTreeMap;
use std::net::IpAddr;

use weir_identity::Identity;
use weir_policy_compiler::EntryAction;
use weir_policy_model::Direction;

/// The numeric id of an endpoint on this node (key part of its policy entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(pub u32);

/// An endpoint as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointAttachment {
    /// Name of the host-side veth, in the caller's network namespace.
    pub ifname: String,
    /// The endpoint's id.
    pub endpoint_id: EndpointId,
    /// The endpoint's own security identity.
    pub identity: Identity,
    /// The endpoint's addresses: packets leaving it must carry its (first) IPv4 and IPv6
    /// address as their source, or are dropped with reason 132 (Cilium's source IP check). A
    /// family it has no address in is not checked.
    pub addresses: Vec<IpAddr>,
}

/// What the datapath did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Forwarded.
    Allow,
    /// Forwarded to the local proxy listening on this port.
    Redirect {
        /// The proxy port.
        proxy_port: u16,
    },
    /// Dropped with a Cilium drop reason (133 policy denied, 181 deny entry, 134 invalid…).
    Drop {
        /// The drop reason.
        reason: u8,
    },
}

/// Kind of a verdict event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A packet was dropped.
    Drop,
    /// Policy allowed a new connection.
    AllowNew,
    /// Policy redirected a new connection to a proxy.
    RedirectNew,
    /// A kind this version does not know.
    Unknown(u8),
}

/// A verdict event from the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathEvent {
    /// Monotonic clock, nanoseconds.
    pub timestamp_ns: u64,
    /// What happened.
    pub kind: EventKind,
    /// Drop reason, 0 when not dropped.
    pub drop_reason: u8,
    /// Direction of the policy applied, from the endpoint's view.
    pub direction: Direction,
    /// IP protocol number.
    pub protocol: u8,
    /// Source address (None for packets too malformed to parse).
    pub src: Option<IpAddr>,
    /// Destination address.
    pub dst: Option<IpAddr>,
    /// Source port.
    pub sport: u16,
    /// Destination port; the ICMP type for ICMP.
    pub dport: u16,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// Source identity.
    pub src_identity: Identity,
    /// Destination identity.
    pub dst_identity: Identity,
    /// The endpoint whose hook saw the packet.
    pub endpoint_id: EndpointId,
    /// ifindex of the endpoint's host-side interface.
    pub ifindex: u32,
    /// Proxy port, 0 = none.
    pub proxy_port: u16,
}

/// A conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtRecord {
    /// Source address of the packet that opened the connection.
    pub src: IpAddr,
    /// Its destination address.
    pub dst: IpAddr,
    /// Its source port (ICMP echo: identifier).
    pub sport: u16,
    /// Its destination port (ICMP echo: identifier in replies).
    pub dport: u16,
    /// IP protocol.
    pub protocol: u8,
    /// Direction of the policy that allowed it.
    pub direction: Direction,
    /// Expiry, monotonic nanoseconds.
    pub expires_ns: u64,
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen.
    pub bytes: u64,
    /// State flags (`weir_datapath_abi::ct_flag`).
    pub flags: u16,
    /// Proxy port of a redirected connection, 0 = none.
    pub proxy_port: u16,
}

/// A policy entry as the datapath holds it, with the counters of the packets it decided.
///
/// The counters cover the packets whose policy decision this entry made: the first packet of
/// each connection it allowed or redirected, and every packet it denied. Packets of
/// established connections pass through conntrack without a policy lookup and are not
/// counted. The counts restart when the entry is rewritten with a different action (or
/// removed and added again); upserts that leave the entry as it is keep them. Entries with a
/// partial port range (the kernel's LPM trie) are counted without atomics and may miss
/// increments under concurrent decisions on several CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstalledPolicyEntry {
    /// What the entry does.
    pub action: EntryAction,
    /// Packets decided by this entry.
    pub packets: u64,
    /// Bytes of those packets (whole frames as the hook sees them).
    pub bytes: u64,
}

/// Counters summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded.
    pub forwarded: u64,
    /// Packets redirected to a proxy.
    pub redirected: u64,
    /// Events lost because the ring buffer was full.
    pub events_lost: u64,
    /// Drops by reason.
    pub drops: BTreeMap<u8, u64>,
}

/// Datapath failures.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The endpoint is not attached.
    #[error("endpoint {0:?} is not attached")]
    UnknownEndpoint(EndpointId),
    /// An interface name could not be resolved.
    #[error("interface {0:?} not found")]
    UnknownInterface(String),
    /// A policy key cannot be encoded (prefix length above 24).
    #[error("invalid policy key: {0}")]
    InvalidKey(String),
    /// Loading, attaching or a map operation failed in the backend.
    #[error("{context}: {message}")]
    Backend {
        /// What was being done.
        context: String,
        /// The backend's error.
        message: String,
    },
}

impl DatapathError {
    /// A backend error with context.
    pub fn backend(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        DatapathError::Backend {
            context: context.into(),
            message: err.to_string(),
        }
    }
}
