//! `networking.k8s.io/v1` NetworkPolicy, translated into a Cilium rule.

use weir_identity::{LabelSet, Selector};

use super::cilium::parse_cidr_with_except;
use super::ports::{check_range, parse_end_port};
use super::selector::{self, any_pod, in_namespace, namespaced_subject};
use super::{Errors, optional_list};
use crate::model::{
    Direction, DirectionRules, Enforcement, Entity, Peer, PeerRule, Peers, PolicyName, Port,
    PortProtocol, PortRule, Protocol, Rule,
};
use crate::yaml::{Field, MapReader};

/// Parses the `spec` of a NetworkPolicy object into one rule.
pub(super) fn parse(
    object: &mut MapReader<'_>,
    policy: &PolicyName,
    errors: &mut Errors,
) -> Option<Rule> {
    let spec = errors.ok(object.required("spec"))?;
    let mut m = errors.ok(spec.map())?;
    let before = errors.len();
    let ns = policy.namespace.clone().unwrap_or_else(|| "default".into());
    let subject = match m.optional("podSelector") {
        Some(f) => selector::parse(&f, selector::selector_key, errors),
        None => Some(Selector::all()),
    }
    .map(|s| namespaced_subject(s, &ns));

    let types_field = m.optional("policyTypes");
    let ingress = optional_list(&mut m, "ingress", errors);
    let egress = optional_list(&mut m, "egress", errors);
    let (mut want_ingress, mut want_egress) = (false, false);
    match &types_field {
        Some(f) => {
            for t in errors.ok(f.list()).unwrap_or_default() {
                match errors.ok(t.str()) {
                    Some("Ingress") => want_ingress = true,
                    Some("Egress") => want_egress = true,
                    Some(other) => errors.push(t.error(format!(
                        "{other:?} is not a policy type (expected Ingress or Egress)"
                    ))),
                    None => {}
                }
            }
        }
        // Kubernetes' default: Ingress, plus Egress when there are egress rules.
        None => {
            want_ingress = true;
            want_egress = egress.as_ref().is_some_and(|e| !e.is_empty());
        }
    }
    let ingress = parse_section(ingress, Direction::Ingress, &ns, errors);
    let egress = parse_section(egress, Direction::Egress, &ns, errors);
    errors.extend(m.finish());
    if errors.len() != before {
        return None;
    }
    let side = |wanted: bool, allow: Vec<PeerRule>| {
        if wanted {
            DirectionRules {
                enforcement: Enforcement::DefaultDeny,
                allow,
                deny: Vec::new(),
            }
        } else {
            // Rules for a direction not in policyTypes have no effect.
            DirectionRules::default()
        }
    };
    Some(Rule {
        origin: policy.clone(),
        spec: 0,
        multi_spec: false,
        subject: subject?,
        ingress: side(want_ingress, ingress),
        egress: side(want_egress, egress),
        description: None,
        labels: LabelSet::new(),
    })
}

fn parse_section(
    items: Option<Vec<Field<'_>>>,
    direction: Direction,
    ns: &str,
    errors: &mut Errors,
) -> Vec<PeerRule> {
    items
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, it)| parse_entry(it, i, direction, ns, errors))
        .collect()
}

fn parse_entry(
    item: &Field<'_>,
    index: usize,
    direction: Direction,
    ns: &str,
    errors: &mut Errors,
) -> Option<PeerRule> {
    let mut m = errors.ok(item.map())?;
    let before = errors.len();
    let peers_name = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let mut peers = Vec::new();
    for p in optional_list(&mut m, peers_name, errors).unwrap_or_default() {
        if let Some(peer) = parse_peer(&p, ns, errors) {
            peers.push(peer);
        }
    }
    if peers.is_empty() {
        // No peers: every source or destination, world included.
        peers.push(Peer::Entity(Entity::All));
    }
    let mut ports = Vec::new();
    for p in optional_list(&mut m, "ports", errors).unwrap_or_default() {
        if let Some(pp) = parse_port(&p, errors) {
            ports.push(pp);
        }
    }
    errors.extend(m.finish());
    if errors.len() != before {
        return None;
    }
    Some(PeerRule {
        index,
        peers: Peers::List(peers),
        ports: if ports.is_empty() {
            Vec::new()
        } else {
            vec![PortRule { ports, l7: None }]
        },
        icmps: Vec::new(),
    })
}

fn parse_peer(item: &Field<'_>, ns: &str, errors: &mut Errors) -> Option<Peer> {
    let mut m = errors.ok(item.map())?;
    let pods = m.optional("podSelector");
    let namespaces = m.optional("namespaceSelector");
    let block = m.optional("ipBlock");
    let peer = match (pods, namespaces, block) {
        (None, None, None) => {
            errors.push(item.error("a peer needs podSelector, namespaceSelector or ipBlock"));
            None
        }
        (Some(_), _, Some(b)) | (_, Some(_), Some(b)) => {
            errors
                .push(b.error("ipBlock cannot be combined with podSelector or namespaceSelector"));
            None
        }
        (None, None, Some(b)) => errors.ok(b.map()).and_then(|mut bm| {
            let p = parse_cidr_with_except(&mut bm, errors);
            errors.extend(bm.finish());
            p
        }),
        (pods, namespaces, None) => {
            let pod_sel = match &pods {
                Some(f) => selector::parse(f, selector::selector_key, errors),
                None => Some(Selector::all()),
            };
            let ns_sel = match &namespaces {
                Some(f) => selector::parse(f, selector::namespace_label_key, errors).map(Some),
                None => Some(None),
            };
            let (pod_sel, ns_sel) = (pod_sel?, ns_sel?);
            let sel = match ns_sel {
                // Only podSelector: pods of the policy's namespace.
                None => pod_sel.with(in_namespace(ns)),
                // namespaceSelector `{}`: pods of every namespace.
                Some(n) if n.is_empty() => pod_sel.with(any_pod()),
                Some(n) => {
                    let mut reqs = pod_sel.requirements().to_vec();
                    reqs.extend(n.requirements().iter().cloned());
                    Selector::new(reqs)
                }
            };
            Some(Peer::Endpoints(sel))
        }
    };
    errors.extend(m.finish());
    peer
}

fn parse_port(item: &Field<'_>, errors: &mut Errors) -> Option<PortProtocol> {
    let mut m = errors.ok(item.map())?;
    let before = errors.len();
    let port = match m.optional("port") {
        Some(f) => super::ports::parse_port(&f, errors),
        None => Some(Port::Number(0)),
    };
    let end = m
        .optional("endPort")
        .and_then(|f| parse_end_port(&f, errors).map(|e| (e, f)));
    let protocol = match m.optional("protocol") {
        None => Some(Protocol::Tcp),
        Some(f) => match errors.ok(f.str())? {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            other => {
                errors.push(f.error(format!(
                    "{other:?} is not a protocol (expected TCP, UDP or SCTP)"
                )));
                None
            }
        },
    };
    errors.extend(m.finish());
    let port = port?;
    let end_port = check_range(&port, end, errors)?;
    if errors.len() != before {
        return None;
    }
    Some(PortProtocol {
        port,
        end_port,
        protocol: protocol?,
    })
}
