//! MapState: the per-endpoint policy map, as data.

use std::collections::{BTreeMap, BTreeSet};

use weir_identity::Identity;
use weir_policy_model::{Direction, RuleRef};

/// IP protocol numbers used in policy keys.
pub mod proto {
    /// ICMP
    pub const ICMP: u8 = 1;
    /// TCP
    pub const TCP: u8 = 6;
    /// UDP
    pub const UDP: u8 = 17;
    /// ICMPv6
    pub const ICMPV6: u8 = 58;
    /// SCTP
    pub const SCTP: u8 = 132;
}

/// Cilium's drop reason for "no policy allowed this" (`DROP_POLICY`).
pub const DROP_POLICY_DENIED: u8 = 133;
/// Cilium's drop reason for "a deny policy matched" (`DROP_POLICY_DENY`).
pub const DROP_POLICY_DENY: u8 = 181;

/// A policy map key, as the kernel keys the per-endpoint policy LPM map.
///
/// The prefix covers the remote identity and direction fully, then `prefix_len` bits (0–24) of
/// protocol (8 bits) followed by destination port (16 bits). So: `prefix_len` 0 = every protocol
/// and port; 8 = every port of `protocol`; 24 = exactly `port`; in between, a power-of-two
/// aligned port block. For ICMP and ICMPv6 the port field holds the ICMP type (the code is not
/// matched), as Cilium does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// Remote identity; [`Identity::ANY`] (0) matches every identity.
    pub identity: Identity,
    /// Direction as seen from the endpoint.
    pub direction: Direction,
    /// IP protocol number; 0 when `prefix_len` is 0.
    pub protocol: u8,
    /// Destination port (host order); bits beyond the prefix are zero.
    pub port: u16,
    /// Number of significant bits of protocol+port, 0–24.
    pub prefix_len: u8,
}

/// What a matching entry does with the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryAction {
    /// Allow.
    Allow,
    /// Deny with [`DROP_POLICY_DENY`].
    Deny,
    /// Allow, but steer the connection to the local proxy listening on `proxy_port`.
    Redirect {
        /// The proxy's port.
        proxy_port: u16,
        /// Listener priority: the higher wins when several redirect entries match.
        priority: u8,
    },
}

/// A policy map value, with the rules that produced it (for explanations and dumps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    /// What the entry does.
    pub action: EntryAction,
    /// The rules that produced the entry (empty for synthesised entries such as allow-all
    /// when a direction is not enforced, or host-to-local-endpoint access).
    pub derived_from: BTreeSet<RuleRef>,
}

/// The per-endpoint policy map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// The entries.
    pub entries: BTreeMap<PolicyKey, PolicyEntry>,
}

/// The change from one MapState to another: apply `upserts` first, then `removals`, so that
/// no packet ever sees a state that is neither the old nor the new policy's decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapStateDiff {
    /// Entries to insert or overwrite.
    pub upserts: Vec<(PolicyKey, PolicyEntry)>,
    /// Keys to delete.
    pub removals: Vec<PolicyKey>,
}
