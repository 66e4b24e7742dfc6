//! What a lab should hold for one scenario or a set of them: pods, the ports their servers
//! listen on, outside addresses, namespace labels and policy files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use weir_scenario::{FlowProto, FlowSpec, Peer, Scenario};

/// One pod the lab creates through the CNI plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// Pod name (unique in the lab).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// The pod's address, requested from the CNI plugin's IPAM.
    pub ip: Ipv4Addr,
    /// Named container ports.
    pub named_ports: BTreeMap<String, u16>,
    /// TCP ports its server listens on.
    pub tcp_ports: BTreeSet<u16>,
    /// UDP ports its server answers on.
    pub udp_ports: BTreeSet<u16>,
    /// Its service account (`k8s:io.cilium.k8s.policy.serviceaccount` in its identity).
    #[serde(default = "default_service_account")]
    pub service_account: String,
}

fn default_service_account() -> String {
    "default".into()
}

/// The label that carries a pod's service account to the agent, as Cilium names it.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";

impl PodSpec {
    /// Whether `other` can be kept in place of this pod (same identity inputs and address).
    pub fn same_pod(&self, other: &PodSpec) -> bool {
        self.name == other.name
            && self.namespace == other.namespace
            && self.labels == other.labels
            && self.ip == other.ip
            && self.named_ports == other.named_ports
            && self.service_account == other.service_account
    }

    /// The labels the CNI plugin passes to the agent: the pod's labels and its service
    /// account (Kubernetes keeps that in the pod spec; the agent reads it from this label).
    pub fn cni_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        if !self.service_account.is_empty() {
            labels.insert(
                SERVICE_ACCOUNT_LABEL.to_string(),
                self.service_account.clone(),
            );
        }
        labels
    }
}

/// The listening ports of a non-pod place (the node or the world namespace).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listeners {
    /// TCP ports.
    pub tcp: BTreeSet<u16>,
    /// UDP ports.
    pub udp: BTreeSet<u16>,
}

impl Listeners {
    fn add(&mut self, proto: FlowProto, port: u16) {
        match proto {
            FlowProto::Tcp => {
                self.tcp.insert(port);
            }
            FlowProto::Udp => {
                self.udp.insert(port);
            }
            FlowProto::Sctp | FlowProto::Icmp => {}
        }
    }

    /// `tcp:P udp:P ...` arguments for the lab's server.
    pub fn server_args(&self) -> Vec<String> {
        self.tcp
            .iter()
            .map(|p| format!("tcp:{p}"))
            .chain(self.udp.iter().map(|p| format!("udp:{p}")))
            .collect()
    }
}

/// A policy file the lab writes into the agent's policy directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyFile {
    /// File name (no directory).
    pub name: String,
    /// YAML text.
    pub text: String,
}

/// Everything the lab should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Labels of each namespace (passed to the agent).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The pods.
    pub pods: Vec<PodSpec>,
    /// IPv4 addresses held by the world namespace.
    pub world_ips: BTreeSet<Ipv4Addr>,
    /// The world namespace's servers.
    pub world: Listeners,
    /// The node's servers (flows to `host`).
    pub host: Listeners,
    /// Names the kube-dns pod answers, with their addresses.
    pub dns: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Policy files.
    pub policies: Vec<PolicyFile>,
    /// Pods left out, with the reason (address clash, IPv6).
    pub skipped: Vec<String>,
}

/// Which side listens for a flow and on what: a reply flow's listener is its source, since
/// the lab replays it as the original connection.
fn listener_of(flow: &FlowSpec) -> &Peer {
    if flow.reply { &flow.from } else { &flow.to }
}

/// The IPv4 world addresses a flow names.
fn world_ip(peer: &Peer) -> Option<Ipv4Addr> {
    match peer {
        Peer::World(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    }
}

/// Whether the scenario's policies use L7 or FQDN rules (which need the proxies).
pub fn has_l7_rules(s: &Scenario) -> bool {
    s.policies.text.lines().any(|l| {
        let t = l.trim_start().trim_start_matches("- ");
        t.starts_with("rules:") || t.starts_with("toFQDNs:")
    })
}

/// Whether a scenario can run in the lab at all: IPv4 pods only.
pub fn is_ipv4_only(s: &Scenario) -> bool {
    s.endpoints.iter().all(|e| e.ip.is_ipv4())
}

/// The scenario's policy text without the objects it expects to be rejected (the agent
/// rejects a file whole, while `kubectl apply` would still apply the others).
pub fn accepted_policy_text(s: &Scenario) -> String {
    if s.rejected_policies.is_empty() {
        return s.policies.text.clone();
    }
    let mut out = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    let flush = |doc: &mut Vec<&str>, out: &mut Vec<String>| {
        let rejected = doc.iter().any(|l| {
            s.rejected_policies
                .iter()
                .any(|n| l.trim() == format!("name: {n}"))
        });
        if !rejected && doc.iter().any(|l| !l.trim().is_empty()) {
            out.push(doc.join("\n"));
        }
        doc.clear();
    };
    for line in s.policies.text.lines() {
        if line.trim_end() == "---" {
            flush(&mut doc, &mut out);
        } else {
            doc.push(line);
        }
    }
    flush(&mut doc, &mut out);
    out.join("\n---\n")
}

/// A file name for a scenario's policies.
pub fn policy_file_name(s: &Scenario) -> String {
    let base: String = s
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{base}.yaml")
}

impl ClusterSpec {
    /// The cluster of one scenario.
    pub fn from_scenario(s: &Scenario) -> Self {
        Self::merged(std::slice::from_ref(s))
    }

    /// One cluster holding the pods of every scenario (the first pod of a name or address
    /// wins) and the policies of all of them, one file per scenario.
    pub fn merged(scenarios: &[Scenario]) -> Self {
        let mut c = ClusterSpec::default();
        for s in scenarios {
            for (ns, labels) in &s.namespaces {
                c.namespaces
                    .entry(ns.clone())
                    .or_insert_with(|| labels.clone());
            }
            for e in &s.endpoints {
                let IpAddr::V4(ip) = e.ip else {
                    c.skipped
                        .push(format!("{}: IPv6 pods are not in the lab", e.name));
                    continue;
                };
                if let Some(p) = c.pods.iter().find(|p| p.name == e.name || p.ip == ip) {
                    if !(p.name == e.name && p.ip == ip) {
                        c.skipped.push(format!(
                            "{} ({}) from {}: clashes with {} ({})",
                            e.name, ip, s.name, p.name, p.ip
                        ));
                    }
                    continue;
                }
                c.namespaces.entry(e.namespace.clone()).or_default();
                c.pods.push(PodSpec {
                    name: e.name.clone(),
                    namespace: e.namespace.clone(),
                    labels: e.labels.clone(),
                    ip,
                    named_ports: e.ports.clone(),
                    tcp_ports: e.ports.values().copied().collect(),
                    udp_ports: BTreeSet::new(),
                    service_account: e.service_account.clone(),
                });
            }
            for (name, ips) in &s.dns {
                let v4: Vec<Ipv4Addr> = ips
                    .iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V4(v) => Some(*v),
                        IpAddr::V6(_) => None,
                    })
                    .collect();
                c.world_ips.extend(v4.iter().copied());
                c.dns.entry(name.clone()).or_insert(v4);
            }
            for flow in &s.flows {
                c.world_ips.extend(world_ip(&flow.from));
                c.world_ips.extend(world_ip(&flow.to));
                let proto = if flow.dns_query.is_some() {
                    FlowProto::Udp
                } else {
                    flow.proto
                };
                match listener_of(flow) {
                    Peer::Endpoint(name) => {
                        if let Some(p) = c.pods.iter_mut().find(|p| &p.name == name) {
                            match proto {
                                FlowProto::Tcp => {
                                    p.tcp_ports.insert(flow.port);
                                }
                                FlowProto::Udp => {
                                    p.udp_ports.insert(flow.port);
                                }
                                FlowProto::Sctp | FlowProto::Icmp => {}
                            }
                        }
                    }
                    Peer::Host => c.host.add(proto, flow.port),
                    Peer::World(_) => c.world.add(proto, flow.port),
                    Peer::RemoteNode => {}
                }
            }
            let text = accepted_policy_text(s);
            if !text.trim().is_empty() {
                c.policies.push(PolicyFile {
                    name: policy_file_name(s),
                    text,
                });
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCENARIO: &str = r#"
name: t
endpoints:
  - {name: a, namespace: n, labels: {app: a}, ip: 10.0.9.1, ports: {http: 8080}}
  - {name: b, namespace: n, labels: {app: b}, ip: 10.0.9.2}
  - {name: c, namespace: n, labels: {app: c}, ip: "fd00::1"}
policies: |
  apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata:
    name: good
    namespace: n
  spec:
    endpointSelector: {}
  ---
  apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata:
    name: bad
    namespace: n
  spec:
    endpointSelector: {}
rejected_policies: [bad]
flows:
  - {from: a, to: b, proto: TCP, dport: 80, expect: allow}
  - {from: b, to: a, proto: UDP, dport: 53, expect: allow}
  - {from: b, to: a, proto: TCP, sport: 9000, reply: true, expect: allow}
  - {from: a, to: "world:203.0.113.9", proto: TCP, dport: 443, expect: allow}
  - {from: host, to: a, proto: ICMP, icmp_type: 8, expect: allow}
"#;

    #[test]
    fn ports_world_and_rejected_objects() {
        let s = weir_scenario::parse_scenario("t.yaml", SCENARIO).expect("valid scenario");
        let c = ClusterSpec::from_scenario(&s);
        assert_eq!(c.pods.len(), 2);
        assert_eq!(c.skipped.len(), 1);
        let a = c.pods.iter().find(|p| p.name == "a").expect("a");
        assert_eq!(a.tcp_ports, BTreeSet::from([8080]));
        assert_eq!(a.udp_ports, BTreeSet::from([53]));
        let b = c.pods.iter().find(|p| p.name == "b").expect("b");
        // The reply flow is replayed as a connection to its source.
        assert_eq!(b.tcp_ports, BTreeSet::from([80, 9000]));
        assert_eq!(c.world.tcp, BTreeSet::from([443]));
        assert!(c.world_ips.contains(&Ipv4Addr::new(203, 0, 113, 9)));
        let text = &c.policies.first().expect("one file").text;
        assert!(
            text.contains("name: good") && !text.contains("name: bad"),
            "{text}"
        );
        assert!(!has_l7_rules(&s));
        assert!(!is_ipv4_only(&s));
    }
}
