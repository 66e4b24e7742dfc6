//! Helpers to build rules and identities in tests (no YAML).

use weir_identity::{Identity, Label, LabelKey, LabelSet, Requirement, Selector};
use weir_l7_match::HttpRule;
use weir_policy_model::{
    DirectionRules, Enforcement, IcmpRule, IpFamily, L7Rules, Peer, PeerRule, Peers, Policy,
    PolicyKind, PolicyName, Port, PortProtocol, PortRule, Protocol, Rule, SourceLocation,
};

use crate::{EndpointInfo, NamedPorts};

pub(crate) const NS: &str = "io.kubernetes.pod.namespace";

pub(crate) fn sel(kv: &[(&str, &str)]) -> Selector {
    Selector::new(
        kv.iter()
            .map(|(k, v)| Requirement::equals(LabelKey::parse_selector_key(k), *v))
            .collect(),
    )
}

pub(crate) fn pod_labels(ns: &str, kv: &[(&str, &str)]) -> LabelSet {
    let mut s: LabelSet = kv.iter().map(|(k, v)| Label::k8s(*k, *v)).collect();
    s.insert(Label::k8s(NS, ns));
    s.insert(Label::k8s("io.cilium.k8s.policy.cluster", "default"));
    s
}

pub(crate) fn cidr_labels(prefix: &str) -> LabelSet {
    [
        Label::new(weir_identity::LabelSource::Cidr, prefix, ""),
        Label::reserved("world"),
    ]
    .into_iter()
    .collect()
}

pub(crate) fn endpoint(id: u32, labels: LabelSet) -> EndpointInfo {
    EndpointInfo {
        identity: Identity(id),
        labels,
        named_ports: NamedPorts::new(),
    }
}

pub(crate) fn cnp(ns: &str, name: &str) -> PolicyName {
    PolicyName {
        kind: PolicyKind::CiliumNetworkPolicy,
        namespace: Some(ns.to_string()),
        name: name.to_string(),
    }
}

pub(crate) fn policy(name: PolicyName, rules: Vec<Rule>) -> Policy {
    Policy {
        name,
        location: SourceLocation::default(),
        rules,
    }
}

/// A rule of `name` selecting `subject`, with nothing in it yet.
pub(crate) fn rule(name: &PolicyName, subject: Selector) -> Rule {
    Rule {
        origin: name.clone(),
        spec: 0,
        multi_spec: false,
        subject,
        ingress: DirectionRules::default(),
        egress: DirectionRules::default(),
        description: None,
        labels: LabelSet::new(),
    }
}

/// A CNP rule: the subject gets the namespace, as the parser injects it.
pub(crate) fn ns_rule(name: &PolicyName, subject: &[(&str, &str)]) -> Rule {
    let ns = name.namespace.clone().unwrap_or_default();
    let mut kv: Vec<(&str, &str)> = subject.to_vec();
    let nskey = format!("k8s:{NS}");
    kv.push((&nskey, &ns));
    rule(name, sel(&kv))
}

pub(crate) fn enforce(d: &mut DirectionRules) {
    if d.enforcement == Enforcement::None {
        d.enforcement = Enforcement::DefaultDeny;
    }
}

pub(crate) fn peer_rule(peers: Peers, ports: Vec<PortRule>, icmps: Vec<IcmpRule>) -> PeerRule {
    PeerRule {
        index: 0,
        peers,
        ports,
        icmps,
    }
}

pub(crate) fn eps(s: Selector) -> Peers {
    Peers::List(vec![Peer::Endpoints(s)])
}

pub(crate) fn pp(port: u16, end: Option<u16>, protocol: Protocol) -> PortProtocol {
    PortProtocol {
        port: Port::Number(port),
        end_port: end,
        protocol,
    }
}

pub(crate) fn ports(list: Vec<PortProtocol>) -> PortRule {
    PortRule {
        ports: list,
        l7: None,
    }
}

pub(crate) fn tcp(port: u16) -> PortRule {
    ports(vec![pp(port, None, Protocol::Tcp)])
}

pub(crate) fn http(port: u16, rules: &[(&str, &str)]) -> PortRule {
    PortRule {
        ports: vec![pp(port, None, Protocol::Tcp)],
        l7: Some(L7Rules::Http(
            rules
                .iter()
                .map(|(m, p)| HttpRule {
                    method: Some(m.to_string()),
                    path: Some(p.to_string()),
                    ..HttpRule::default()
                })
                .collect(),
        )),
    }
}

pub(crate) fn icmp4(t: u8) -> IcmpRule {
    IcmpRule {
        family: IpFamily::V4,
        icmp_type: t,
    }
}

/// Appends an allow to a direction, numbering it and switching on default deny.
pub(crate) fn push_allow(d: &mut DirectionRules, mut pr: PeerRule) {
    pr.index = d.allow.len();
    d.allow.push(pr);
    enforce(d);
}

/// Appends a deny to a direction, numbering it and switching on default deny.
pub(crate) fn push_deny(d: &mut DirectionRules, mut pr: PeerRule) {
    pr.index = d.deny.len();
    d.deny.push(pr);
    enforce(d);
}
