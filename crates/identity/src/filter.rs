//! Which labels are *identity-relevant*.
//!
//! Pods carry many labels that change per replica (`pod-template-hash`, the StatefulSet pod name);
//! putting them into the identity would give every pod its own identity. The filter decides, per
//! label, whether it goes into the identity, with the rules Cilium uses for `--labels`:
//!
//! * a pattern is `[source:][!]regex`; `!` marks an exclusion;
//! * the regex must match at the *start* of the label key (leftmost-first search);
//! * a label is kept when the longest matching inclusion is longer than the shortest matching
//!   exclusion, or when nothing excludes it and no user-supplied inclusion exists.

use regex_automata::meta::Regex;

use crate::labels::{Label, LabelSet, LabelSource};

/// A label filter pattern that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelFilterError {
    /// The pattern has nothing after its source and `!`.
    #[error("label filter pattern `{0}` is empty")]
    Empty(String),
    /// The regex does not compile.
    #[error("label filter pattern `{pattern}`: {reason}")]
    Regex {
        /// The pattern as given.
        pattern: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// Cilium's default identity-relevant label patterns (`pkg/labelsfilter`), plus the
/// `io.cilium.k8s.policy.*` and topology entries that the documentation lists.
const DEFAULT_PATTERNS: &[&str] = &[
    "reserved:.*",
    r"io\.kubernetes\.pod\.namespace",
    r"io\.cilium\.k8s\.namespace\.labels",
    r"app\.kubernetes\.io",
    r"io\.cilium\.k8s\.policy",
    r"!io\.kubernetes",
    r"!kubernetes\.io",
    r"!statefulset\.kubernetes\.io/pod-name",
    r"!apps\.kubernetes\.io/pod-index",
    r"!batch\.kubernetes\.io/job-completion-index",
    r"!topology\.kubernetes\.io",
    r"!.*beta\.kubernetes\.io",
    r"!k8s\.io",
    r"!pod-template-generation",
    r"!pod-template-hash",
    r"!controller-revision-hash",
    r"!controller-uid",
    r"!annotation.*",
    r"!etcd_node",
];

/// Keys are short; a small limit keeps a hostile `--labels` value from costing much.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
struct LabelPattern {
    exclude: bool,
    source: Option<LabelSource>,
    text: String,
    regex: Regex,
}

impl LabelPattern {
    fn parse(spec: &str) -> Result<Self, LabelFilterError> {
        // `!` may come before the source (`!k8s:foo`) or after it (`k8s:!foo`, Cilium's form).
        let (mut exclude, rest) = match spec.strip_prefix('!') {
            Some(r) => (true, r),
            None => (false, spec),
        };
        let (source, mut pattern) = match rest.split_once(':') {
            Some((p, r)) => match LabelSource::from_prefix(p) {
                Some(LabelSource::Any) => (None, r),
                Some(s) => (Some(s), r),
                None => (None, rest),
            },
            None => (None, rest),
        };
        if let Some(r) = pattern.strip_prefix('!') {
            exclude = true;
            pattern = r;
        }
        if pattern.is_empty() {
            return Err(LabelFilterError::Empty(spec.to_string()));
        }
        let regex = Regex::builder()
            .configure(Regex::config().nfa_size_limit(Some(PATTERN_SIZE_LIMIT)))
            .syntax(regex_automata::util::syntax::Config::new().nest_limit(64))
            .build(pattern)
            .map_err(|e| LabelFilterError::Regex {
                pattern: spec.to_string(),
                reason: e.to_string(),
            })?;
        Ok(LabelPattern {
            exclude,
            source,
            text: spec.to_string(),
            regex,
        })
    }

    /// The length of the match if the pattern matches at the start of the key.
    fn match_len(&self, label: &Label) -> Option<usize> {
        if self.source.is_some_and(|s| s != label.source) {
            return None;
        }
        let m = self.regex.find(label.key.as_str())?;
        (m.start() == 0).then_some(m.end())
    }
}

/// Decides which labels are identity-relevant. [`LabelFilter::default`] is Cilium's default.
#[derive(Debug, Clone)]
pub struct LabelFilter {
    patterns: Vec<LabelPattern>,
    /// Set once a user adds an inclusion: from then on only included labels are kept.
    only_included: bool,
}

impl Default for LabelFilter {
    /// Cilium's default filter: reserved labels, the namespace and namespace labels,
    /// `app.kubernetes.io`, `io.cilium.k8s.policy.*`, and every other label except the
    /// Kubernetes-managed per-pod ones (`pod-template-hash`, `controller-revision-hash`,
    /// `statefulset.kubernetes.io/pod-name`, `*.kubernetes.io`, `k8s.io*`, ...).
    fn default() -> Self {
        let mut f = LabelFilter::keep_all();
        for p in DEFAULT_PATTERNS {
            // The defaults are constants that compile; a failure would only drop one pattern.
            if let Ok(p) = LabelPattern::parse(p) {
                f.patterns.push(p);
            }
        }
        f
    }
}

impl LabelFilter {
    /// A filter with no patterns: every label is identity-relevant.
    pub fn keep_all() -> Self {
        LabelFilter {
            patterns: Vec::new(),
            only_included: false,
        }
    }

    /// Adds a pattern in Cilium's `--labels` syntax: `[source:][!]regex`.
    ///
    /// Adding an inclusion switches the filter to keep *only* included labels (plus the default
    /// inclusions already present), as Cilium does for user-supplied label prefixes.
    pub fn add(&mut self, spec: &str) -> Result<(), LabelFilterError> {
        let p = LabelPattern::parse(spec)?;
        if !p.exclude {
            self.only_included = true;
        }
        self.patterns.push(p);
        Ok(())
    }

    /// This filter with one more inclusion (`[source:]regex`).
    pub fn with_include(mut self, pattern: &str) -> Result<Self, LabelFilterError> {
        let p = LabelPattern::parse(pattern)?;
        if p.exclude {
            return Err(LabelFilterError::Regex {
                pattern: pattern.to_string(),
                reason: "an inclusion cannot start with `!`".to_string(),
            });
        }
        self.only_included = true;
        self.patterns.push(p);
        Ok(self)
    }

    /// This filter with one more exclusion (`[source:]regex`, without the `!`).
    pub fn with_exclude(mut self, pattern: &str) -> Result<Self, LabelFilterError> {
        let mut p = LabelPattern::parse(pattern)?;
        p.exclude = true;
        self.patterns.push(p);
        Ok(self)
    }

    /// The patterns, as given (`!` marks exclusions).
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(|p| p.text.as_str())
    }

    /// Whether the label is identity-relevant.
    pub fn keeps(&self, label: &Label) -> bool {
        let mut included = 0usize;
        let mut excluded: Option<usize> = None;
        for p in &self.patterns {
            let Some(len) = p.match_len(label) else {
                continue;
            };
            if p.exclude {
                // The shortest exclusion is the one an inclusion has to beat.
                excluded = Some(excluded.map_or(len, |e| e.min(len)));
            } else {
                included = included.max(len);
            }
        }
        let excluded_len = excluded.unwrap_or(0);
        // Same rule as Cilium, where a zero-length exclusion counts as "no exclusion".
        (!self.only_included && excluded_len == 0) || included > excluded_len
    }

    /// The identity-relevant labels of a set.
    pub fn filter(&self, labels: &LabelSet) -> LabelSet {
        labels.iter().filter(|l| self.keeps(l)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(key: &str) -> Label {
        Label::k8s(key, "v")
    }

    #[test]
    fn default_keeps_identity_labels() {
        let f = LabelFilter::default();
        for key in [
            "app",
            "tier",
            "io.kubernetes.pod.namespace",
            "io.cilium.k8s.namespace.labels.team",
            "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
            "app.kubernetes.io/name",
            "io.cilium.k8s.policy.serviceaccount",
            "io.cilium.k8s.policy.cluster",
            "example.com/thing",
        ] {
            assert!(f.keeps(&k(key)), "{key} should be kept");
        }
        assert!(f.keeps(&Label::reserved("host")));
    }

    #[test]
    fn default_drops_per_pod_labels() {
        let f = LabelFilter::default();
        for key in [
            "pod-template-hash",
            "pod-template-generation",
            "controller-revision-hash",
            "controller-uid",
            "statefulset.kubernetes.io/pod-name",
            "apps.kubernetes.io/pod-index",
            "batch.kubernetes.io/job-completion-index",
            "kubernetes.io/hostname",
            "io.kubernetes.container.name",
            "failure-domain.beta.kubernetes.io/zone",
            "topology.kubernetes.io/zone",
            "k8s.io/something",
            "annotation.foo",
            "etcd_node",
        ] {
            assert!(!f.keeps(&k(key)), "{key} should be dropped");
        }
    }

    #[test]
    fn user_inclusion_restricts() {
        let f = LabelFilter::default().with_include("k8s:app$").unwrap();
        assert!(f.keeps(&k("app")));
        assert!(!f.keeps(&k("tier")));
        assert!(f.keeps(&k("io.kubernetes.pod.namespace")));
        assert!(f.keeps(&Label::reserved("world")));
        // Source-specific: a container label `app` is not included.
        assert!(!f.keeps(&Label::new(LabelSource::Container, "app", "x")));
    }

    #[test]
    fn exclusion_and_longer_inclusion() {
        let mut f = LabelFilter::keep_all();
        f.add("!foo").unwrap();
        assert!(!f.keeps(&k("foo.bar")));
        assert!(f.keeps(&k("bar")));
        f.add("foo\\.bar").unwrap();
        assert!(f.keeps(&k("foo.bar")), "longer inclusion wins");
        assert!(
            !f.keeps(&k("bar")),
            "an inclusion makes the filter a whitelist"
        );
        let g = LabelFilter::keep_all().with_exclude("k8s:tier").unwrap();
        assert!(!g.keeps(&k("tier")));
        assert!(g.keeps(&Label::new(LabelSource::Container, "tier", "x")));
    }

    #[test]
    fn bad_patterns() {
        assert!(LabelFilter::keep_all().with_include("(").is_err());
        assert!(LabelFilter::keep_all().with_include("k8s:").is_err());
        assert!(LabelFilter::keep_all().with_include("!x").is_err());
        let mut f = LabelFilter::keep_all();
        assert!(f.add("!").is_err());
    }

    #[test]
    fn filter_set() {
        let set: LabelSet = [k("app"), k("pod-template-hash")].into_iter().collect();
        let out = LabelFilter::default().filter(&set);
        assert_eq!(out.len(), 1);
        assert!(out.contains(&k("app")));
    }
}
