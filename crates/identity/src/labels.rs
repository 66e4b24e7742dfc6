//! Labels with a source, as Cilium writes them: `k8s:app=frontend`, `reserved:host`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Where a label comes from. Cilium writes it as the prefix before the first `:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LabelSource {
    /// Kubernetes pod and namespace labels (`k8s:`).
    K8s,
    /// Labels of reserved identities such as `reserved:host` (`reserved:`).
    Reserved,
    /// CIDR identities (`cidr:10.0.0.0/8`).
    Cidr,
    /// Identities learned through `toFQDNs` (`fqdn:*.example.com`).
    Fqdn,
    /// Container runtime labels (`container:`).
    Container,
    /// Labels with no known source (`unspec:`).
    Unspec,
    /// Only in selectors: a key without a prefix matches the key from any source (`any:`).
    Any,
}

impl LabelSource {
    /// The prefix as written before the `:`.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelSource::K8s => "k8s",
            LabelSource::Reserved => "reserved",
            LabelSource::Cidr => "cidr",
            LabelSource::Fqdn => "fqdn",
            LabelSource::Container => "container",
            LabelSource::Unspec => "unspec",
            LabelSource::Any => "any",
        }
    }

    pub(crate) fn from_prefix(s: &str) -> Option<Self> {
        Some(match s {
            "k8s" => LabelSource::K8s,
            "reserved" => LabelSource::Reserved,
            "cidr" => LabelSource::Cidr,
            "fqdn" => LabelSource::Fqdn,
            "container" => LabelSource::Container,
            "unspec" => LabelSource::Unspec,
            "any" => LabelSource::Any,
            _ => return None,
        })
    }
}

impl fmt::Display for LabelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label key with its source, such as `k8s:app` or `any:app`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey {
    /// The source; [`LabelSource::Any`] only appears in selectors.
    pub source: LabelSource,
    /// The key without its source prefix.
    pub key: String,
}

impl LabelKey {
    /// Parses a key as written in a selector: `k8s:app`, `reserved:host`, or `app` (= `any:app`).
    ///
    /// Only a known source prefix is split off, so keys that contain a `:` of their own keep it.
    pub fn parse_selector_key(s: &str) -> LabelKey {
        if let Some((prefix, rest)) = s.split_once(':')
            && let Some(source) = LabelSource::from_prefix(prefix)
        {
            return LabelKey {
                source,
                key: rest.to_string(),
            };
        }
        LabelKey {
            source: LabelSource::Any,
            key: s.to_string(),
        }
    }

    /// Whether this (selector) key matches a label's key: same key, and same source unless
    /// this key's source is [`LabelSource::Any`].
    pub fn matches(&self, label: &Label) -> bool {
        self.key == label.key && (self.source == LabelSource::Any || self.source == label.source)
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)
    }
}

/// One label: `source:key=value` (the value may be empty, as in `reserved:host`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    /// Where the label comes from.
    pub source: LabelSource,
    /// The key, without the source prefix.
    pub key: String,
    /// The value; empty for labels such as `reserved:world`.
    pub value: String,
}

/// A label that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// The key is empty.
    #[error("label key is empty")]
    EmptyKey,
    /// A label on an identity must have a concrete source.
    #[error("label `{0}` has source `any`, which is only valid in selectors")]
    AnySource(String),
}

impl Label {
    /// A label with the given source, key and value.
    pub fn new(source: LabelSource, key: impl Into<String>, value: impl Into<String>) -> Self {
        Label {
            source,
            key: key.into(),
            value: value.into(),
        }
    }

    /// A `k8s:` label.
    pub fn k8s(key: impl Into<String>, value: impl Into<String>) -> Self {
        Label::new(LabelSource::K8s, key, value)
    }

    /// A `reserved:` label with an empty value, such as `reserved:host`.
    pub fn reserved(key: impl Into<String>) -> Self {
        Label::new(LabelSource::Reserved, key, "")
    }
}

impl FromStr for Label {
    type Err = LabelError;

    /// Parses `source:key=value`; a missing source means `unspec`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (source, rest) = match s.split_once(':') {
            Some((p, rest)) => match LabelSource::from_prefix(p) {
                Some(LabelSource::Any) => return Err(LabelError::AnySource(s.to_string())),
                Some(src) => (src, rest),
                None => (LabelSource::Unspec, s),
            },
            None => (LabelSource::Unspec, s),
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        if key.is_empty() {
            return Err(LabelError::EmptyKey);
        }
        Ok(Label::new(source, key, value))
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

/// A sorted set of labels: what an identity *is*.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(BTreeSet<Label>);

impl LabelSet {
    /// An empty set.
    pub fn new() -> Self {
        LabelSet(BTreeSet::new())
    }

    /// Adds a label, replacing any label with the same source and key.
    pub fn insert(&mut self, label: Label) {
        self.0
            .retain(|l| !(l.source == label.source && l.key == label.key));
        self.0.insert(label);
    }

    /// The labels in order.
    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    /// How many labels there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of the first label whose key the selector key matches.
    pub fn get(&self, key: &LabelKey) -> Option<&str> {
        self.0
            .iter()
            .find(|l| key.matches(l))
            .map(|l| l.value.as_str())
    }

    /// Whether any label matches the selector key.
    pub fn has(&self, key: &LabelKey) -> bool {
        self.0.iter().any(|l| key.matches(l))
    }

    /// Whether the set holds exactly this label.
    pub fn contains(&self, label: &Label) -> bool {
        self.0.contains(label)
    }
}

impl FromIterator<Label> for LabelSet {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Self {
        let mut s = LabelSet::new();
        for l in iter {
            s.insert(l);
        }
        s
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for l in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let l: Label = "k8s:app=frontend".parse().unwrap();
        assert_eq!(l, Label::k8s("app", "frontend"));
        assert_eq!(l.to_string(), "k8s:app=frontend");
        assert_eq!(
            "reserved:host".parse::<Label>().unwrap(),
            Label::reserved("host")
        );
        assert!("any:x=y".parse::<Label>().is_err());
    }

    #[test]
    fn any_key_matches_every_source() {
        let k = LabelKey::parse_selector_key("io.kubernetes.pod.namespace");
        assert_eq!(k.source, LabelSource::Any);
        assert!(k.matches(&Label::k8s("io.kubernetes.pod.namespace", "x")));
        let k8s = LabelKey::parse_selector_key("k8s:app");
        assert!(!k8s.matches(&Label::new(LabelSource::Container, "app", "x")));
        // A key with a colon that is not a source keeps it.
        let odd = LabelKey::parse_selector_key("example.com:thing");
        assert_eq!(odd.key, "example.com:thing");
    }
}
