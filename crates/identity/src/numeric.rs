//! Numeric identities and Cilium's reserved numbers.

use std::fmt;

use crate::labels::{Label, LabelSet};

/// A numeric security identity, as carried in the datapath (`sec_label`).
///
/// Ranges follow Cilium: 0 is "unknown / any", 1–10 are reserved, 256–65535 are cluster
/// identities (cluster id 0), and local-scope identities (CIDR, FQDN) start at 2^24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(pub u32);

impl Identity {
    /// No identity; in a policy key it means "any remote identity".
    pub const ANY: Identity = Identity(0);
    /// First number of the cluster-scoped range.
    pub const MIN_CLUSTER: u32 = 256;
    /// Last number of the cluster-scoped range for cluster id 0.
    pub const MAX_CLUSTER: u32 = 65535;
    /// Flag that marks node-local identities (CIDR and FQDN derived).
    pub const LOCAL_FLAG: u32 = 1 << 24;
    /// Last local-scope number.
    pub const MAX_LOCAL: u32 = (1 << 25) - 1;

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Whether this is one of the reserved identities 1–10.
    pub fn is_reserved(self) -> bool {
        ReservedIdentity::from_identity(self).is_some()
    }

    /// Whether this is a node-local (CIDR or FQDN) identity.
    pub fn is_local(self) -> bool {
        self.0 & Self::LOCAL_FLAG != 0 && self.0 <= Self::MAX_LOCAL
    }

    /// Whether this is a cluster-scoped identity.
    pub fn is_cluster(self) -> bool {
        (Self::MIN_CLUSTER..=Self::MAX_CLUSTER).contains(&self.0)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<ReservedIdentity> for Identity {
    fn from(r: ReservedIdentity) -> Self {
        Identity(r as u32)
    }
}

/// Cilium's reserved identities (`pkg/identity/numericidentity.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum ReservedIdentity {
    /// The local node, including host-network pods.
    Host = 1,
    /// Everything outside the cluster.
    World = 2,
    /// In-cluster endpoints not managed by Weir.
    Unmanaged = 3,
    /// Health-check endpoints.
    Health = 4,
    /// Endpoints whose identity is not yet resolved.
    Init = 5,
    /// Other nodes of the cluster.
    RemoteNode = 6,
    /// kube-apiserver backends.
    KubeApiserver = 7,
    /// The ingress proxy's source identity.
    Ingress = 8,
    /// IPv4 half of world (dual stack).
    WorldIpv4 = 9,
    /// IPv6 half of world (dual stack).
    WorldIpv6 = 10,
}

impl ReservedIdentity {
    /// All reserved identities, in numeric order.
    pub const ALL: [ReservedIdentity; 10] = [
        ReservedIdentity::Host,
        ReservedIdentity::World,
        ReservedIdentity::Unmanaged,
        ReservedIdentity::Health,
        ReservedIdentity::Init,
        ReservedIdentity::RemoteNode,
        ReservedIdentity::KubeApiserver,
        ReservedIdentity::Ingress,
        ReservedIdentity::WorldIpv4,
        ReservedIdentity::WorldIpv6,
    ];

    /// The reserved identity with this number, if any.
    pub fn from_identity(id: Identity) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u32 == id.0)
    }

    /// The name used in its `reserved:` label and in entity names.
    pub fn name(self) -> &'static str {
        match self {
            ReservedIdentity::Host => "host",
            ReservedIdentity::World => "world",
            ReservedIdentity::Unmanaged => "unmanaged",
            ReservedIdentity::Health => "health",
            ReservedIdentity::Init => "init",
            ReservedIdentity::RemoteNode => "remote-node",
            ReservedIdentity::KubeApiserver => "kube-apiserver",
            ReservedIdentity::Ingress => "ingress",
            ReservedIdentity::WorldIpv4 => "world-ipv4",
            ReservedIdentity::WorldIpv6 => "world-ipv6",
        }
    }

    /// The labels of this reserved identity. The world halves also carry `reserved:world`,
    /// so that a `world` selector selects them.
    pub fn labels(self) -> LabelSet {
        let mut s = LabelSet::new();
        s.insert(Label::reserved(self.name()));
        if matches!(
            self,
            ReservedIdentity::WorldIpv4 | ReservedIdentity::WorldIpv6
        ) {
            s.insert(Label::reserved("world"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(Identity(1).is_reserved());
        assert!(Identity(10).is_reserved());
        assert!(!Identity(11).is_reserved());
        assert!(Identity(256).is_cluster());
        assert!(Identity((1 << 24) + 1).is_local());
        assert_eq!(Identity::from(ReservedIdentity::RemoteNode), Identity(6));
    }
}
