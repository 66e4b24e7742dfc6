//! The normalised policy model: what the compiler consumes.

use std::fmt;

use ipnet::IpNet;
use weir_identity::{LabelSet, Selector};
use weir_l7_match::{DnsRule, HttpRule};

/// The kind of a policy object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// `cilium.io/v2` `CiliumNetworkPolicy` (namespaced).
    CiliumNetworkPolicy,
    /// `cilium.io/v2` `CiliumClusterwideNetworkPolicy` (cluster-scoped).
    CiliumClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` `NetworkPolicy` (namespaced).
    NetworkPolicy,
}

impl PolicyKind {
    /// The `kind:` string.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

/// Which policy object a rule came from: kind, namespace (none for CCNP) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName {
    /// The object's kind.
    pub kind: PolicyKind,
    /// `metadata.namespace`; `None` for cluster-scoped policies.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// Where something came from in its source file (1-based line and column).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceLocation {
    /// The file name as given to the parser.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// One policy object, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Kind, namespace and name.
    pub name: PolicyName,
    /// Where the object starts.
    pub location: SourceLocation,
    /// The rules: one for `spec`, one per `specs` entry, one for a NetworkPolicy.
    pub rules: Vec<Rule>,
}

/// The direction of traffic as seen from the selected endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic into the endpoint.
    Ingress,
    /// Traffic out of the endpoint.
    Egress,
}

/// Which section of a rule a peer rule sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    /// `ingress`
    Ingress,
    /// `ingressDeny`
    IngressDeny,
    /// `egress`
    Egress,
    /// `egressDeny`
    EgressDeny,
}

impl Section {
    /// The field name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Ingress => "ingress",
            Section::IngressDeny => "ingressDeny",
            Section::Egress => "egress",
            Section::EgressDeny => "egressDeny",
        }
    }

    /// The traffic direction of the section.
    pub fn direction(self) -> Direction {
        match self {
            Section::Ingress | Section::IngressDeny => Direction::Ingress,
            Section::Egress | Section::EgressDeny => Direction::Egress,
        }
    }

    /// Whether the section denies.
    pub fn is_deny(self) -> bool {
        matches!(self, Section::IngressDeny | Section::EgressDeny)
    }
}

/// Names one peer rule of one policy: enough to tell a user which rule decided a packet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    /// The policy object.
    pub policy: PolicyName,
    /// Index into `specs` (0 for `spec` and for NetworkPolicy).
    pub spec: usize,
    /// `true` when the object used `specs` (so the index is shown).
    pub multi_spec: bool,
    /// The section.
    pub section: Section,
    /// Index within the section.
    pub index: usize,
}

impl fmt::Display for RuleRef {
    /// `production/api-l7-policy ingress[0]`, or with `specs[1].` when the object had `specs`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.policy)?;
        if self.multi_spec {
            write!(f, "specs[{}].", self.spec)?;
        }
        write!(f, "{}[{}]", self.section.as_str(), self.index)
    }
}

/// How a rule's section affects default deny for its direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Enforcement {
    /// The rule has nothing for this direction (section absent, null or empty).
    #[default]
    None,
    /// The rule switches the direction to default deny (Cilium's default).
    DefaultDeny,
    /// The rule has sections for the direction but `enableDefaultDeny` is false for it: its
    /// allows are added without switching to default deny.
    NoDefaultDeny,
}

/// One normalised rule (a `spec`, a `specs` entry, or a translated NetworkPolicy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Which object and spec the rule came from (its `section`/`index` are unused here).
    pub origin: PolicyName,
    /// Index into `specs`, 0 for `spec`.
    pub spec: usize,
    /// Whether the object used `specs`.
    pub multi_spec: bool,
    /// The endpoints the rule applies to, with the namespace already injected for namespaced
    /// kinds (`k8s:io.kubernetes.pod.namespace=<ns>`).
    pub subject: Selector,
    /// Ingress side.
    pub ingress: DirectionRules,
    /// Egress side.
    pub egress: DirectionRules,
    /// `spec.description`.
    pub description: Option<String>,
    /// `spec.labels`.
    pub labels: LabelSet,
}

/// A rule's allows and denies for one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectionRules {
    /// Whether and how this rule turns on default deny for the direction.
    pub enforcement: Enforcement,
    /// `ingress`/`egress` entries, in order.
    pub allow: Vec<PeerRule>,
    /// `ingressDeny`/`egressDeny` entries, in order.
    pub deny: Vec<PeerRule>,
}

/// One entry of `ingress`, `egress`, `ingressDeny` or `egressDeny`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRule {
    /// Index within its section (for [`RuleRef`]).
    pub index: usize,
    /// The peers (L3).
    pub peers: Peers,
    /// `toPorts` entries. Empty together with empty `icmps` means L3-only: every protocol and
    /// port, ICMP included.
    pub ports: Vec<PortRule>,
    /// `icmps` entries.
    pub icmps: Vec<IcmpRule>,
}

impl PeerRule {
    /// Whether the rule has no L4 part (allows all protocols and ports, ICMP included).
    pub fn is_l3_only(&self) -> bool {
        self.ports.is_empty() && self.icmps.is_empty()
    }
}

/// The L3 part of a peer rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// No L3 field was given: the rule applies to every peer (identity wildcard).
    /// An empty rule `{}` has `Any` peers *and* no ports, yet allows nothing (see
    /// [`PeerRule::allows_nothing`]).
    Any,
    /// The union of these peers. An explicitly empty list selects nothing.
    List(Vec<Peer>),
}

/// One L3 peer selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// `fromEndpoints`/`toEndpoints` (and NetworkPolicy pod/namespace selectors), namespace
    /// already injected.
    Endpoints(Selector),
    /// `fromEntities`/`toEntities`.
    Entity(Entity),
    /// `fromCIDR`/`fromCIDRSet`/`toCIDR`/`toCIDRSet`/`ipBlock`: selects only peers without a
    /// label-derived identity (world addresses) inside `cidr` and outside every `except`.
    Cidr {
        /// The prefix.
        cidr: IpNet,
        /// Prefixes inside `cidr` that are excluded.
        except: Vec<IpNet>,
    },
    /// A `toFQDNs` entry (egress only).
    Fqdn(DnsRule),
}

/// Cilium's entities (`fromEntities`/`toEntities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    /// `host`
    Host,
    /// `remote-node`
    RemoteNode,
    /// `kube-apiserver`
    KubeApiserver,
    /// `ingress`
    Ingress,
    /// `cluster`
    Cluster,
    /// `init`
    Init,
    /// `health`
    Health,
    /// `unmanaged`
    Unmanaged,
    /// `world`
    World,
    /// `world-ipv4`
    WorldIpv4,
    /// `world-ipv6`
    WorldIpv6,
    /// `all`
    All,
    /// `none`
    None,
}

impl Entity {
    /// Every entity with its YAML name.
    pub const ALL: [(Entity, &'static str); 13] = [
        (Entity::Host, "host"),
        (Entity::RemoteNode, "remote-node"),
        (Entity::KubeApiserver, "kube-apiserver"),
        (Entity::Ingress, "ingress"),
        (Entity::Cluster, "cluster"),
        (Entity::Init, "init"),
        (Entity::Health, "health"),
        (Entity::Unmanaged, "unmanaged"),
        (Entity::World, "world"),
        (Entity::WorldIpv4, "world-ipv4"),
        (Entity::WorldIpv6, "world-ipv6"),
        (Entity::All, "all"),
        (Entity::None, "none"),
    ];

    /// The entity with this YAML name.
    pub fn from_name(s: &str) -> Option<Entity> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(e, _)| *e)
    }

    /// The YAML name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(e, _)| *e == self)
            .map(|(_, n)| *n)
            .unwrap_or("none")
    }
}

/// One `toPorts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// The ports; empty means every port of every protocol in `ANY` (TCP, UDP, SCTP).
    pub ports: Vec<PortProtocol>,
    /// L7 rules, if any.
    pub l7: Option<L7Rules>,
}

/// One `ports` entry: a port or range and a protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortProtocol {
    /// The port; `Number(0)` means every port.
    pub port: Port,
    /// `endPort`: the inclusive end of a range (numbers only).
    pub end_port: Option<u16>,
    /// The protocol; `Any` stands for TCP, UDP and SCTP.
    pub protocol: Protocol,
}

/// A port number or an IANA-style name resolved against the destination's named ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Port {
    /// A number; 0 means all ports.
    Number(u16),
    /// A named port, lower-case.
    Named(String),
}

/// An L4 protocol in `toPorts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (6)
    Tcp,
    /// UDP (17)
    Udp,
    /// SCTP (132)
    Sctp,
    /// TCP, UDP and SCTP (not ICMP).
    Any,
}

impl Protocol {
    /// The IP protocol numbers this stands for.
    pub fn numbers(self) -> &'static [u8] {
        match self {
            Protocol::Tcp => &[6],
            Protocol::Udp => &[17],
            Protocol::Sctp => &[132],
            Protocol::Any => &[6, 17, 132],
        }
    }
}

/// L7 rules on a port (exactly one kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L7Rules {
    /// `rules.http`
    Http(Vec<HttpRule>),
    /// `rules.dns` (egress only)
    Dns(Vec<DnsRule>),
}

/// IP family of an ICMP rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// ICMPv4
    V4,
    /// ICMPv6
    V6,
}

/// One `icmps[].fields[]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IcmpRule {
    /// The family (`IPv4` default).
    pub family: IpFamily,
    /// The ICMP type (names such as `EchoRequest` are resolved to numbers).
    pub icmp_type: u8,
}

impl PeerRule {
    /// Whether this entry allows (or denies) nothing at all: an empty rule `{}` or an explicitly
    /// empty peer list. Such an entry still counts for default-deny activation.
    pub fn allows_nothing(&self) -> bool {
        match &self.peers {
            Peers::List(l) => l.is_empty(),
            Peers::Any => self.is_l3_only(),
        }
    }
}

impl Policy {
    /// Every L3 peer named anywhere in the policy (allow and deny sections, both directions),
    /// for callers that allocate per-peer state such as CIDR identities or `toFQDNs` selectors.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.rules.iter().flat_map(|rule| {
            [
                &rule.ingress.allow,
                &rule.ingress.deny,
                &rule.egress.allow,
                &rule.egress.deny,
            ]
            .into_iter()
            .flatten()
            .flat_map(|pr| match &pr.peers {
                Peers::List(list) => list.as_slice(),
                Peers::Any => &[],
            })
        })
    }
}
