//! From YAML documents to normalised [`Policy`] values.
//!
//! The walking code is private: the public surface is [`parse_policies`].

mod cilium;
mod knp;
mod ports;
mod selector;

use crate::error::{ParseError, ParseErrors};
use crate::model::{Policy, PolicyKind, PolicyName, SourceLocation};
use crate::yaml::{Field, MapReader, YamlError, parse_documents};

/// Collects errors so that parsing can go on after the first one.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<YamlError>);

impl Errors {
    fn push(&mut self, e: YamlError) {
        self.0.push(e);
    }

    fn extend(&mut self, es: Vec<YamlError>) {
        self.0.extend(es);
    }

    /// The value, or `None` after recording the error.
    fn ok<T>(&mut self, r: Result<T, YamlError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Parses every policy object in a (multi-document) YAML or JSON text.
///
/// `file` is only used in error locations. Empty and null documents are skipped; `kind: List`
/// objects are unpacked. Every error found is returned, and any error rejects the whole text.
pub fn parse_policies(file: &str, text: &str) -> Result<Vec<Policy>, ParseErrors> {
    let docs =
        parse_documents(text).map_err(|e| ParseErrors(vec![ParseError::from_yaml(file, e)]))?;
    let mut errors = Errors::default();
    let mut policies = Vec::new();
    for doc in &docs {
        if doc.is_null() {
            continue;
        }
        parse_object(file, &Field::new(doc, ""), true, &mut errors, &mut policies);
    }
    if errors.0.is_empty() {
        return Ok(policies);
    }
    let mut list = errors.0;
    list.sort_by_key(|e| e.position);
    Err(ParseErrors(
        list.into_iter()
            .map(|e| ParseError::from_yaml(file, e))
            .collect(),
    ))
}

/// Parses each object of a stream on its own, as `kubectl apply -f` submits them: one result per
/// document (a `List` counts as one), so that a caller can apply the valid objects and report the
/// invalid ones. [`parse_policies`] is the strict form that rejects the whole file.
pub fn parse_objects(file: &str, text: &str) -> Vec<Result<Vec<Policy>, ParseErrors>> {
    let docs = match parse_documents(text) {
        Ok(d) => d,
        Err(e) => return vec![Err(ParseErrors(vec![ParseError::from_yaml(file, e)]))],
    };
    let mut results = Vec::new();
    for doc in &docs {
        if doc.is_null() {
            continue;
        }
        let mut errors = Errors::default();
        let mut policies = Vec::new();
        parse_object(file, &Field::new(doc, ""), true, &mut errors, &mut policies);
        if errors.0.is_empty() {
            results.push(Ok(policies));
        } else {
            let mut list = errors.0;
            list.sort_by_key(|e| e.position);
            results.push(Err(ParseErrors(
                list.into_iter()
                    .map(|e| ParseError::from_yaml(file, e))
                    .collect(),
            )));
        }
    }
    results
}

const CILIUM_API: &str = "cilium.io/v2";
const KNP_API: &str = "networking.k8s.io/v1";

fn parse_object(
    file: &str,
    object: &Field<'_>,
    allow_list: bool,
    errors: &mut Errors,
    out: &mut Vec<Policy>,
) {
    let Some(mut m) = errors.ok(object.map()) else {
        return;
    };
    let kind_field = errors.ok(m.required("kind"));
    let api_field = errors.ok(m.required("apiVersion"));
    let Some(kind_field) = kind_field else {
        return;
    };
    let Some(kind_str) = errors.ok(kind_field.str()) else {
        return;
    };
    let (kind, api) = match kind_str {
        "CiliumNetworkPolicy" => (PolicyKind::CiliumNetworkPolicy, CILIUM_API),
        "CiliumClusterwideNetworkPolicy" => {
            (PolicyKind::CiliumClusterwideNetworkPolicy, CILIUM_API)
        }
        "NetworkPolicy" => (PolicyKind::NetworkPolicy, KNP_API),
        "List" if allow_list => {
            m.ignore("metadata");
            if let Some(items) = errors
                .ok(m.required("items"))
                .and_then(|f| errors.ok(f.list()))
            {
                for item in &items {
                    if item.node.is_null() {
                        continue;
                    }
                    parse_object(file, item, false, errors, out);
                }
            }
            errors.extend(m.finish());
            return;
        }
        other => {
            errors.push(kind_field.error(format!(
                "unsupported kind {other:?} (expected CiliumNetworkPolicy, \
                 CiliumClusterwideNetworkPolicy, NetworkPolicy{})",
                if allow_list { " or List" } else { "" }
            )));
            return;
        }
    };
    if let Some(api_field) = api_field
        && let Some(v) = errors.ok(api_field.str())
        && v != api
    {
        errors.push(api_field.error(format!(
            "apiVersion {v:?} is not supported for {kind_str} (expected {api:?})",
        )));
    }
    let name = errors
        .ok(m.required("metadata"))
        .and_then(|f| parse_metadata(&f, kind, errors));
    m.ignore("status");
    let Some(name) = name else {
        // Without a name there is nothing to attach rules to; still report unknown fields.
        m.ignore("spec");
        m.ignore("specs");
        errors.extend(m.finish());
        return;
    };
    let before = errors.len();
    let rules = match kind {
        PolicyKind::NetworkPolicy => knp::parse(&mut m, &name, errors).into_iter().collect(),
        _ => cilium::parse(&mut m, &name, errors),
    };
    errors.extend(m.finish());
    if errors.len() == before {
        out.push(Policy {
            name,
            location: SourceLocation {
                file: file.to_string(),
                line: object.node.position.line,
                column: object.node.position.column,
            },
            rules,
        });
    }
}

/// `metadata` fields that Kubernetes manages and that do not affect enforcement.
const IGNORED_METADATA: &[&str] = &[
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "managedFields",
    "generateName",
    "finalizers",
    "ownerReferences",
    "selfLink",
];

fn parse_metadata(field: &Field<'_>, kind: PolicyKind, errors: &mut Errors) -> Option<PolicyName> {
    let mut m = errors.ok(field.map())?;
    let name = errors
        .ok(m.required("name"))
        .and_then(|f| match errors.ok(f.str()) {
            Some("") => {
                errors.push(f.error("must not be empty"));
                None
            }
            other => other,
        });
    let namespace = m.optional("namespace").and_then(|f| errors.ok(f.str()));
    for f in IGNORED_METADATA {
        m.ignore(f);
    }
    errors.extend(m.finish());
    let namespace = match kind {
        // Kubernetes drops a namespace given to a cluster-scoped object.
        PolicyKind::CiliumClusterwideNetworkPolicy => None,
        _ => Some(match namespace {
            Some("") | None => "default".to_string(),
            Some(ns) => ns.to_string(),
        }),
    };
    Some(PolicyName {
        kind,
        namespace,
        name: name?.to_string(),
    })
}

/// Reads an optional list field: `None` when absent or null, otherwise its items (an
/// explicitly empty list is `Some(vec![])`).
fn optional_list<'a>(
    m: &mut MapReader<'a>,
    name: &str,
    errors: &mut Errors,
) -> Option<Vec<Field<'a>>> {
    let f = m.optional(name)?;
    Some(errors.ok(f.list()).unwrap_or_default())
}
