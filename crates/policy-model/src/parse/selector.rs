//! Label selectors and Cilium's namespace scoping of them.

use std::collections::BTreeSet;

use weir_identity::{LabelKey, LabelSource, Operator, Requirement, Selector, SelectorError};

use super::Errors;
use crate::yaml::Field;

/// The label Cilium gives every pod for its namespace.
pub(super) const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels that carry a pod's namespace labels.
pub(super) const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// How a selector's keys are turned into label keys.
pub(super) type KeyMap = fn(&str) -> LabelKey;

/// Keys as written in Cilium selectors: an optional source prefix, `any:` otherwise.
pub(super) fn selector_key(k: &str) -> LabelKey {
    LabelKey::parse_selector_key(k)
}

/// Keys of a NetworkPolicy `namespaceSelector`: labels of the pod's namespace.
pub(super) fn namespace_label_key(k: &str) -> LabelKey {
    k8s_key(&format!("{NAMESPACE_LABELS_PREFIX}{k}"))
}

fn k8s_key(k: &str) -> LabelKey {
    LabelKey {
        source: LabelSource::K8s,
        key: k.to_string(),
    }
}

/// Parses a Kubernetes `LabelSelector` (`matchLabels`, `matchExpressions`).
pub(super) fn parse(field: &Field<'_>, keys: KeyMap, errors: &mut Errors) -> Option<Selector> {
    let mut m = errors.ok(field.map())?;
    let before = errors.len();
    let mut reqs = Vec::new();
    if let Some(labels) = m.optional("matchLabels")
        && let Some(pairs) = errors.ok(labels.string_map())
    {
        for (k, v) in pairs {
            let (Ok(k), Ok(v)) = (k.str(), v.str()) else {
                continue;
            };
            if k.is_empty() {
                errors.push(labels.error("label key must not be empty"));
                continue;
            }
            reqs.push(Requirement::equals(keys(k), v));
        }
    }
    if let Some(exprs) = m.optional("matchExpressions")
        && let Some(items) = errors.ok(exprs.list())
    {
        for item in &items {
            if let Some(r) = parse_expression(item, keys, errors) {
                reqs.push(r);
            }
        }
    }
    errors.extend(m.finish());
    (errors.len() == before).then(|| Selector::new(reqs))
}

fn parse_expression(item: &Field<'_>, keys: KeyMap, errors: &mut Errors) -> Option<Requirement> {
    let mut m = errors.ok(item.map())?;
    let key = errors.ok(m.required("key")).and_then(|f| {
        let k = errors.ok(f.str())?;
        if k.is_empty() {
            errors.push(f.error("label key must not be empty"));
            return None;
        }
        Some(k)
    });
    let op_field = errors.ok(m.required("operator"));
    let op = op_field.as_ref().and_then(|f| match errors.ok(f.str())? {
        "In" => Some(Operator::In),
        "NotIn" => Some(Operator::NotIn),
        "Exists" => Some(Operator::Exists),
        "DoesNotExist" => Some(Operator::DoesNotExist),
        other => {
            errors.push(f.error(format!(
                "{other:?} is not a selector operator (expected In, NotIn, Exists or DoesNotExist)"
            )));
            None
        }
    });
    let mut values = BTreeSet::new();
    if let Some(vs) = m.optional("values")
        && let Some(items) = errors.ok(vs.list())
    {
        for v in &items {
            if let Some(s) = errors.ok(v.str()) {
                values.insert(s.to_string());
            }
        }
    }
    errors.extend(m.finish());
    let (key, op) = (key?, op?);
    match Requirement::new(keys(key), op, values) {
        Ok(r) => Some(r),
        Err(e) => {
            let msg = match e {
                SelectorError::MissingValues(op) => {
                    format!("operator {op:?} needs at least one value")
                }
                SelectorError::UnexpectedValues(op) => format!("operator {op:?} takes no values"),
            };
            errors.push(item.error(msg));
            None
        }
    }
}

fn has_reserved_key(sel: &Selector) -> bool {
    sel.requirements()
        .iter()
        .any(|r| r.key.source == LabelSource::Reserved)
}

fn has_namespace_key(sel: &Selector) -> bool {
    sel.requirements()
        .iter()
        .any(|r| r.key.key == NAMESPACE_KEY || r.key.key.starts_with(NAMESPACE_LABELS_PREFIX))
}

/// `k8s:io.kubernetes.pod.namespace=<ns>`.
pub(super) fn in_namespace(ns: &str) -> Requirement {
    Requirement::equals(k8s_key(NAMESPACE_KEY), ns)
}

/// `k8s:io.kubernetes.pod.namespace` exists: any pod, in any namespace.
pub(super) fn any_pod() -> Requirement {
    Requirement {
        key: k8s_key(NAMESPACE_KEY),
        operator: Operator::Exists,
        values: BTreeSet::new(),
    }
}

/// The subject of a namespaced policy: only pods of its own namespace, whatever namespace
/// requirement the author wrote.
pub(super) fn namespaced_subject(sel: Selector, ns: &str) -> Selector {
    let kept = sel
        .requirements()
        .iter()
        .filter(|r| r.key.key != NAMESPACE_KEY)
        .cloned()
        .collect();
    Selector::new(kept).with(in_namespace(ns))
}

/// A CNP peer selector: the policy's namespace unless the selector names a namespace itself
/// or selects reserved identities.
pub(super) fn cnp_peer(sel: Selector, ns: &str) -> Selector {
    if has_reserved_key(&sel) || has_namespace_key(&sel) {
        sel
    } else {
        sel.with(in_namespace(ns))
    }
}

/// A CCNP peer selector: pods of any namespace unless the selector names a namespace itself
/// or selects reserved identities (so `{}` never selects world or host).
pub(super) fn ccnp_peer(sel: Selector) -> Selector {
    if has_reserved_key(&sel) || has_namespace_key(&sel) {
        sel
    } else {
        sel.with(any_pod())
    }
}
