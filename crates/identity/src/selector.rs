//! Kubernetes label selectors over Cilium labels.

use std::collections::BTreeSet;
use std::fmt;

use crate::labels::{LabelKey, LabelSet};

/// A selector operator, as in a Kubernetes `matchExpressions` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    /// The key is present with one of the values.
    In,
    /// The key is absent, or present with none of the values.
    NotIn,
    /// The key is present.
    Exists,
    /// The key is absent.
    DoesNotExist,
}

/// One requirement of a selector; all requirements of a selector must hold.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    /// The key, with its source (`any` for keys written without one).
    pub key: LabelKey,
    /// How the key is tested.
    pub operator: Operator,
    /// The values for `In` and `NotIn`; empty for `Exists` and `DoesNotExist`.
    pub values: BTreeSet<String>,
}

/// A selector that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// `In` or `NotIn` with no values.
    #[error("operator {0:?} needs at least one value")]
    MissingValues(Operator),
    /// `Exists` or `DoesNotExist` with values.
    #[error("operator {0:?} takes no values")]
    UnexpectedValues(Operator),
}

impl Requirement {
    /// A checked requirement.
    pub fn new(
        key: LabelKey,
        operator: Operator,
        values: BTreeSet<String>,
    ) -> Result<Self, SelectorError> {
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(SelectorError::MissingValues(operator));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(SelectorError::UnexpectedValues(operator));
            }
            _ => {}
        }
        Ok(Requirement {
            key,
            operator,
            values,
        })
    }

    /// `key = value` (a `matchLabels` entry).
    pub fn equals(key: LabelKey, value: impl Into<String>) -> Self {
        Requirement {
            key,
            operator: Operator::In,
            values: BTreeSet::from([value.into()]),
        }
    }

    /// Whether the labels satisfy this requirement. With an `any:` key, a label from any source
    /// with that key counts.
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let mut values = labels
            .iter()
            .filter(|l| self.key.matches(l))
            .map(|l| l.value.as_str());
        match self.operator {
            Operator::In => values.any(|v| self.values.contains(v)),
            Operator::NotIn => values.all(|v| !self.values.contains(v)),
            Operator::Exists => values.next().is_some(),
            Operator::DoesNotExist => values.next().is_none(),
        }
    }
}

/// A label selector: the AND of its requirements. An empty selector selects everything.
///
/// Namespace defaulting (Cilium adds `k8s:io.kubernetes.pod.namespace` to CNP selectors) is done
/// by `policy-model` when it normalises a rule; a `Selector` is always taken literally.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that selects every label set.
    pub fn all() -> Self {
        Selector::default()
    }

    /// A selector from requirements; they are sorted and deduplicated so that equal selectors
    /// compare equal.
    pub fn new(mut requirements: Vec<Requirement>) -> Self {
        requirements.sort();
        requirements.dedup();
        Selector { requirements }
    }

    /// The requirements, sorted.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether the selector has no requirements (selects everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// This selector with one more requirement.
    pub fn with(mut self, r: Requirement) -> Self {
        self.requirements.push(r);
        Selector::new(self.requirements)
    }

    /// Whether some requirement tests this key (by source and key exactly, or with `any`).
    pub fn has_key(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key.key == key)
    }

    /// Whether the labels satisfy every requirement.
    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let mut first = true;
        for r in &self.requirements {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            let vals = r.values.iter().cloned().collect::<Vec<_>>().join(",");
            match r.operator {
                Operator::In if r.values.len() == 1 => write!(f, "{}={}", r.key, vals)?,
                Operator::In => write!(f, "{} in ({})", r.key, vals)?,
                Operator::NotIn => write!(f, "{} notin ({})", r.key, vals)?,
                Operator::Exists => write!(f, "{}", r.key)?,
                Operator::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;

    fn key(s: &str) -> LabelKey {
        LabelKey::parse_selector_key(s)
    }

    #[test]
    fn operators() {
        let labels: LabelSet = [
            Label::k8s("app", "web"),
            Label::k8s("io.kubernetes.pod.namespace", "prod"),
        ]
        .into_iter()
        .collect();
        assert!(Selector::all().matches(&labels));
        assert!(Selector::new(vec![Requirement::equals(key("app"), "web")]).matches(&labels));
        assert!(
            !Selector::new(vec![Requirement::equals(key("reserved:app"), "web")]).matches(&labels)
        );
        let notin = Requirement::new(
            key("io.kubernetes.pod.namespace"),
            Operator::NotIn,
            ["kube-system".into()].into(),
        )
        .unwrap();
        assert!(notin.matches(&labels));
        let absent = Requirement::new(key("tier"), Operator::NotIn, ["x".into()].into()).unwrap();
        assert!(
            absent.matches(&labels),
            "NotIn holds when the key is absent"
        );
        let dne = Requirement::new(key("tier"), Operator::DoesNotExist, BTreeSet::new()).unwrap();
        assert!(dne.matches(&labels));
        assert!(Requirement::new(key("a"), Operator::In, BTreeSet::new()).is_err());
    }
}
