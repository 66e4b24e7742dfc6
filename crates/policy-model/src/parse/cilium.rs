//! `CiliumNetworkPolicy` and `CiliumClusterwideNetworkPolicy` rules.

use ipnet::IpNet;
use weir_identity::{Label, LabelSet, LabelSource, Selector};

use super::ports::{parse_dns_rule, parse_icmp_rule, parse_port_rule};
use super::selector::{self, ccnp_peer, cnp_peer, namespaced_subject};
use super::{Errors, optional_list};
use crate::model::{
    Direction, DirectionRules, Enforcement, Entity, Peer, PeerRule, Peers, PolicyKind, PolicyName,
    Rule, Section,
};
use crate::yaml::{Field, MapReader};

/// Parses `spec` and/or `specs` of a Cilium policy object.
pub(super) fn parse(m: &mut MapReader<'_>, policy: &PolicyName, errors: &mut Errors) -> Vec<Rule> {
    let spec = m.optional("spec");
    let specs = optional_list(m, "specs", errors);
    let mut rules = Vec::new();
    if spec.is_none() && specs.as_ref().is_none_or(|s| s.is_empty()) {
        errors.push(m.error("a Cilium policy needs `spec` or a non-empty `specs`"));
        return rules;
    }
    if let Some(s) = spec
        && let Some(r) = parse_rule(&s, policy, 0, false, errors)
    {
        rules.push(r);
    }
    for (i, s) in specs.unwrap_or_default().iter().enumerate() {
        if let Some(r) = parse_rule(s, policy, i, true, errors) {
            rules.push(r);
        }
    }
    rules
}

fn parse_rule(
    field: &Field<'_>,
    policy: &PolicyName,
    spec: usize,
    multi_spec: bool,
    errors: &mut Errors,
) -> Option<Rule> {
    let mut m = errors.ok(field.map())?;
    let before = errors.len();
    errors.extend(m.unsupported(&["log"]));
    let endpoint_selector = m.optional("endpointSelector");
    if m.has("nodeSelector") && endpoint_selector.is_some() {
        errors.push(m.error("endpointSelector and nodeSelector are mutually exclusive"));
    }
    let node_selector = m.unsupported(&["nodeSelector"]);
    let node_selector_given = !node_selector.is_empty();
    for mut e in node_selector {
        e.message.push_str(" (host policies)");
        errors.push(e);
    }
    let subject = match &endpoint_selector {
        Some(f) => selector::parse(f, selector::selector_key, errors),
        None => {
            if !node_selector_given {
                errors.push(m.error("one of endpointSelector or nodeSelector is required"));
            }
            None
        }
    };
    let subject = subject.map(|s| match &policy.namespace {
        Some(ns) => namespaced_subject(s, ns),
        None => s,
    });
    let description = m
        .optional("description")
        .and_then(|f| errors.ok(f.str()).map(str::to_string));
    let labels = optional_list(&mut m, "labels", errors)
        .map(|items| parse_labels(&items, errors))
        .unwrap_or_default();
    let mut default_deny = (None, None);
    if let Some(f) = m.optional("enableDefaultDeny")
        && let Some(mut d) = errors.ok(f.map())
    {
        default_deny.0 = d.optional("ingress").and_then(|f| errors.ok(f.bool()));
        default_deny.1 = d.optional("egress").and_then(|f| errors.ok(f.bool()));
        errors.extend(d.finish());
    }
    let mut sections = Vec::new();
    for section in [
        Section::Ingress,
        Section::IngressDeny,
        Section::Egress,
        Section::EgressDeny,
    ] {
        let items = optional_list(&mut m, section.as_str(), errors).unwrap_or_default();
        let rules: Vec<PeerRule> = items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| parse_peer_rule(it, i, section, policy, errors))
            .collect();
        sections.push(rules);
    }
    errors.extend(m.finish());
    if errors.len() != before {
        return None;
    }
    let mut sections = sections.into_iter();
    let (ingress, ingress_deny, egress, egress_deny) = (
        sections.next().unwrap_or_default(),
        sections.next().unwrap_or_default(),
        sections.next().unwrap_or_default(),
        sections.next().unwrap_or_default(),
    );
    Some(Rule {
        origin: policy.clone(),
        spec,
        multi_spec,
        subject: subject?,
        ingress: direction_rules(ingress, ingress_deny, default_deny.0),
        egress: direction_rules(egress, egress_deny, default_deny.1),
        description,
        labels,
    })
}

fn direction_rules(
    allow: Vec<PeerRule>,
    deny: Vec<PeerRule>,
    enable_default_deny: Option<bool>,
) -> DirectionRules {
    let enforcement = if allow.is_empty() && deny.is_empty() {
        Enforcement::None
    } else if enable_default_deny == Some(false) {
        Enforcement::NoDefaultDeny
    } else {
        Enforcement::DefaultDeny
    };
    DirectionRules {
        enforcement,
        allow,
        deny,
    }
}

/// `labels`: `{key, value, source}` objects as Cilium writes them, or `source:key=value` strings.
fn parse_labels(items: &[Field<'_>], errors: &mut Errors) -> LabelSet {
    let mut set = LabelSet::new();
    for item in items {
        if let Some(s) = item.node.as_scalar().filter(|_| item.str().is_ok()) {
            match s.value.parse::<Label>() {
                Ok(l) => set.insert(l),
                Err(e) => errors.push(item.error(e.to_string())),
            }
            continue;
        }
        let Some(mut m) = errors.ok(item.map()) else {
            continue;
        };
        let key = errors.ok(m.required("key")).and_then(|f| {
            let k = errors.ok(f.str())?;
            if k.is_empty() {
                errors.push(f.error("label key must not be empty"));
                return None;
            }
            Some(k)
        });
        let value = m
            .optional("value")
            .and_then(|f| errors.ok(f.str()))
            .unwrap_or("");
        let source = match m.optional("source") {
            None => Some(LabelSource::Unspec),
            Some(f) => errors.ok(f.str()).and_then(|s| match s {
                "" | "unspec" => Some(LabelSource::Unspec),
                "k8s" => Some(LabelSource::K8s),
                "reserved" => Some(LabelSource::Reserved),
                "cidr" => Some(LabelSource::Cidr),
                "fqdn" => Some(LabelSource::Fqdn),
                "container" => Some(LabelSource::Container),
                other => {
                    errors.push(f.error(format!("{other:?} is not a label source")));
                    None
                }
            }),
        };
        errors.extend(m.finish());
        if let (Some(key), Some(source)) = (key, source) {
            set.insert(Label::new(source, key, value));
        }
    }
    set
}

/// The L3 field names of a direction.
struct L3Names {
    endpoints: &'static str,
    entities: &'static str,
    cidr: &'static str,
    cidr_set: &'static str,
    unsupported: &'static [&'static str],
}

const INGRESS_NAMES: L3Names = L3Names {
    endpoints: "fromEndpoints",
    entities: "fromEntities",
    cidr: "fromCIDR",
    cidr_set: "fromCIDRSet",
    unsupported: &["fromRequires", "fromGroups", "fromNodes", "authentication"],
};

const EGRESS_NAMES: L3Names = L3Names {
    endpoints: "toEndpoints",
    entities: "toEntities",
    cidr: "toCIDR",
    cidr_set: "toCIDRSet",
    unsupported: &[
        "toRequires",
        "toServices",
        "toGroups",
        "toNodes",
        "authentication",
    ],
};

fn parse_peer_rule(
    item: &Field<'_>,
    index: usize,
    section: Section,
    policy: &PolicyName,
    errors: &mut Errors,
) -> Option<PeerRule> {
    let mut m = errors.ok(item.map())?;
    let before = errors.len();
    let names = match section.direction() {
        Direction::Ingress => &INGRESS_NAMES,
        Direction::Egress => &EGRESS_NAMES,
    };
    errors.extend(m.unsupported(names.unsupported));
    let mut peers: Vec<Peer> = Vec::new();
    let mut l3_fields: Vec<&str> = Vec::new();

    if let Some(items) = optional_list(&mut m, names.endpoints, errors) {
        l3_fields.push(names.endpoints);
        for it in &items {
            if let Some(sel) = selector::parse(it, selector::selector_key, errors) {
                peers.push(Peer::Endpoints(scope_peer(sel, policy)));
            }
        }
    }
    if let Some(items) = optional_list(&mut m, names.entities, errors) {
        l3_fields.push(names.entities);
        for it in &items {
            let Some(s) = errors.ok(it.str()) else {
                continue;
            };
            match Entity::from_name(s) {
                Some(e) => peers.push(Peer::Entity(e)),
                None => errors.push(it.error(format!("{s:?} is not an entity"))),
            }
        }
    }
    if let Some(items) = optional_list(&mut m, names.cidr, errors) {
        l3_fields.push(names.cidr);
        for it in &items {
            if let Some(cidr) = parse_cidr(it, errors) {
                peers.push(Peer::Cidr {
                    cidr,
                    except: Vec::new(),
                });
            }
        }
    }
    if let Some(items) = optional_list(&mut m, names.cidr_set, errors) {
        l3_fields.push(names.cidr_set);
        for it in &items {
            if let Some(p) = parse_cidr_rule(it, errors) {
                peers.push(p);
            }
        }
    }
    if section.direction() == Direction::Egress
        && let Some(f) = m.optional("toFQDNs")
    {
        if section.is_deny() {
            errors.push(f.error("toFQDNs is not allowed in a deny rule"));
        } else if let Some(other) = l3_fields.first() {
            errors.push(f.error(format!(
                "toFQDNs cannot be combined with {other} in the same rule"
            )));
        } else {
            l3_fields.push("toFQDNs");
            for it in errors.ok(f.list()).unwrap_or_default() {
                if let Some(r) = parse_dns_rule(&it, errors) {
                    peers.push(Peer::Fqdn(r));
                }
            }
        }
    }
    let ports = optional_list(&mut m, "toPorts", errors)
        .unwrap_or_default()
        .iter()
        .filter_map(|it| parse_port_rule(it, section, errors))
        .collect();
    let icmps = optional_list(&mut m, "icmps", errors)
        .unwrap_or_default()
        .iter()
        .flat_map(|it| parse_icmp_rule(it, errors))
        .collect();
    errors.extend(m.finish());
    if errors.len() != before {
        return None;
    }
    Some(PeerRule {
        index,
        peers: if l3_fields.is_empty() {
            Peers::Any
        } else {
            Peers::List(peers)
        },
        ports,
        icmps,
    })
}

fn scope_peer(sel: Selector, policy: &PolicyName) -> Selector {
    match (&policy.namespace, policy.kind) {
        (Some(ns), _) => cnp_peer(sel, ns),
        (None, PolicyKind::CiliumClusterwideNetworkPolicy) => ccnp_peer(sel),
        (None, _) => sel,
    }
}

/// A prefix (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (a /32 or /128). Host bits
/// are cleared, as Cilium does.
pub(super) fn parse_cidr(field: &Field<'_>, errors: &mut Errors) -> Option<IpNet> {
    let s = errors.ok(field.str())?;
    let parsed = s
        .parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from));
    match parsed {
        Some(net) => Some(net.trunc()),
        None => {
            errors.push(field.error(format!("{s:?} is not a CIDR prefix or IP address")));
            None
        }
    }
}

/// `{cidr, except}`, shared with NetworkPolicy `ipBlock`.
pub(super) fn parse_cidr_with_except(m: &mut MapReader<'_>, errors: &mut Errors) -> Option<Peer> {
    let cidr = errors
        .ok(m.required("cidr"))
        .and_then(|f| parse_cidr(&f, errors));
    let mut except = Vec::new();
    let mut ok = true;
    for it in optional_list(m, "except", errors).unwrap_or_default() {
        let Some(e) = parse_cidr(&it, errors) else {
            ok = false;
            continue;
        };
        if let Some(c) = cidr
            && !c.contains(&e)
        {
            errors.push(it.error(format!("except {e} is not inside cidr {c}")));
            ok = false;
            continue;
        }
        except.push(e);
    }
    let cidr = cidr?;
    ok.then_some(Peer::Cidr { cidr, except })
}

fn parse_cidr_rule(item: &Field<'_>, errors: &mut Errors) -> Option<Peer> {
    let mut m = errors.ok(item.map())?;
    let groups = m.unsupported(&["cidrGroupRef", "cidrGroupSelector"]);
    let had_group = !groups.is_empty();
    errors.extend(groups);
    if had_group && !m.has("cidr") {
        // Only a group reference: already reported as unsupported.
        m.ignore("except");
        errors.extend(m.finish());
        return None;
    }
    let peer = parse_cidr_with_except(&mut m, errors);
    errors.extend(m.finish());
    peer
}
