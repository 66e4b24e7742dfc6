//! Matching DNS names against `matchName` / `matchPattern` (DNS rules and `toFQDNs`).
//!
//! Names and patterns are lower-cased and made fully qualified (trailing dot) first. In a
//! pattern, `*` alone (or `**`, `*.`) matches every valid name; otherwise each `*` matches
//! `[-a-zA-Z0-9_]*` inside one label, and a leading `**.` matches one or more whole labels.

use std::borrow::Cow;

use crate::check::{PatternError, check_dns_name, check_dns_pattern};
use crate::engine::FullMatchSet;
use crate::rules::DnsRule;

/// What `*` stands for: zero or more DNS characters within one label (names are lower-case).
const LABEL_CHARS: &str = "[-0-9_a-z]";

/// Lower-cases a name (ASCII only: other characters never match a pattern) and adds the
/// trailing dot if missing. Allocates only when something changes.
pub fn normalize_dns_name(name: &str) -> Cow<'_, str> {
    let needs_lower = name.bytes().any(|b| b.is_ascii_uppercase());
    let needs_dot = !name.ends_with('.');
    if !needs_lower && !needs_dot {
        return Cow::Borrowed(name);
    }
    let mut s = String::with_capacity(name.len() + 1);
    s.push_str(name);
    s.make_ascii_lowercase();
    if needs_dot {
        s.push('.');
    }
    Cow::Owned(s)
}

/// The regex (without anchors; the matcher anchors both ends) that a `matchPattern` value
/// stands for, to be matched against a [normalised](normalize_dns_name) name.
pub fn dns_pattern_regex(pattern: &str) -> Result<String, PatternError> {
    check_dns_pattern(pattern)?;
    let p = normalize_dns_name(pattern);
    let body = p.strip_suffix('.').unwrap_or(&p);
    if body == "*" || body == "**" {
        // Every name made of non-empty labels, and the root.
        return Ok(format!(r"(?:{LABEL_CHARS}+\.)+|\."));
    }
    let mut out = String::with_capacity(p.len() * 4);
    let mut rest: &str = &p;
    if let Some(r) = rest.strip_prefix("**.") {
        out.push_str(&format!(r"(?:{LABEL_CHARS}+\.)+"));
        rest = r;
    }
    for c in rest.chars() {
        match c {
            '*' => {
                out.push_str(LABEL_CHARS);
                out.push('*');
            }
            '.' => out.push_str(r"\."),
            // check_dns_pattern allowed only `[-a-z0-9_]` besides: literal in a regex.
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Compiled DNS rules: all names and patterns in one automaton, matched in one pass.
#[derive(Debug, Clone)]
pub struct DnsMatcher {
    set: FullMatchSet,
    len: usize,
}

impl DnsMatcher {
    /// Compiles rules. An empty list matches no name.
    pub fn compile(rules: &[DnsRule]) -> Result<DnsMatcher, PatternError> {
        let mut patterns = Vec::with_capacity(rules.len());
        for r in rules {
            patterns.push(match r {
                DnsRule::MatchName(name) => {
                    check_dns_name(name)?;
                    regex_syntax::escape(&normalize_dns_name(name))
                }
                DnsRule::MatchPattern(p) => dns_pattern_regex(p)?,
            });
        }
        Ok(DnsMatcher {
            set: FullMatchSet::new(&patterns)?,
            len: rules.len(),
        })
    }

    /// How many rules were compiled.
    pub fn rule_count(&self) -> usize {
        self.len
    }

    /// The index of the first rule that matches the name (normalised first), or `None`.
    pub fn matches(&self, name: &str) -> Option<usize> {
        self.set.first_match(&normalize_dns_name(name))
    }

    /// The indices of every rule that matches the name, ascending: the `toFQDNs` selectors
    /// that select it, which become its identity's `fqdn:` labels.
    pub fn matching_rules(&self, name: &str) -> Vec<usize> {
        self.set
            .matching(&normalize_dns_name(name))
            .iter()
            .map(|p| p.as_usize())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &str) -> DnsMatcher {
        DnsMatcher::compile(&[DnsRule::MatchPattern(p.into())]).unwrap()
    }

    fn yes(p: &str, names: &[&str]) {
        let m = pat(p);
        for n in names {
            assert_eq!(m.matches(n), Some(0), "{p} should match {n}");
        }
    }

    fn no(p: &str, names: &[&str]) {
        let m = pat(p);
        for n in names {
            assert_eq!(m.matches(n), None, "{p} should not match {n}");
        }
    }

    #[test]
    fn wildcard_within_one_label() {
        yes(
            "*.cilium.io",
            &["sub.cilium.io", "sub.cilium.io.", "SUB.Cilium.IO"],
        );
        no(
            "*.cilium.io",
            &["cilium.io", "a.b.cilium.io", "sub.cilium.io.evil"],
        );
        yes("part*ial.com", &["partial.com", "part-extra-ial.com"]);
        no("part*ial.com", &["part.ial.com", "xpartial.com"]);
        yes("*.*.cilium.io", &["_foobar._tcp.cilium.io"]);
        no("*.*.cilium.io", &["a.cilium.io"]);
        yes("*.amazonaws.com", &["s3.amazonaws.com"]);
        no("*.amazonaws.com", &["a.b.amazonaws.com"]);
        yes("*.svc.cluster.local.", &["kube-dns.svc.cluster.local"]);
    }

    #[test]
    fn match_all() {
        for p in ["*", "**", "*."] {
            yes(p, &["a.", "example.com", "a.b.c.d.e", "_x.y", "."]);
            no(p, &["a..b", "sp ace.com", "ünï.com", ".a"]);
        }
    }

    #[test]
    fn double_star_prefix() {
        yes(
            "**.cilium.io",
            &["a.cilium.io", "a.b.cilium.io", "x.y.z.cilium.io"],
        );
        no("**.cilium.io", &["cilium.io", "acilium.io"]);
        // `**` elsewhere is the same as `*`.
        yes("a**b.com", &["ab.com", "axxb.com"]);
        no("a**b.com", &["ax.xb.com"]);
    }

    #[test]
    fn names_are_exact() {
        let m = DnsMatcher::compile(&[
            DnsRule::MatchName("api.stripe.com".into()),
            DnsRule::MatchName("Example.COM.".into()),
        ])
        .unwrap();
        assert_eq!(m.matches("api.stripe.com"), Some(0));
        assert_eq!(m.matches("API.STRIPE.COM."), Some(0));
        assert_eq!(m.matches("apixstripe.com"), None, "dots are literal");
        assert_eq!(m.matches("sub.api.stripe.com"), None);
        assert_eq!(m.matches("example.com"), Some(1));
        assert_eq!(m.rule_count(), 2);
    }

    #[test]
    fn first_rule_wins_and_empty_matches_nothing() {
        let m = DnsMatcher::compile(&[
            DnsRule::MatchPattern("*.example.com".into()),
            DnsRule::MatchName("www.example.com".into()),
            DnsRule::MatchPattern("*".into()),
        ])
        .unwrap();
        assert_eq!(m.matches("www.example.com"), Some(0));
        assert_eq!(m.matches("other.org"), Some(2));
        assert_eq!(m.matching_rules("WWW.example.com"), vec![0, 1, 2]);
        assert_eq!(m.matching_rules("a.b.example.com"), vec![2]);
        assert_eq!(DnsMatcher::compile(&[]).unwrap().matches("a.com"), None);
    }

    #[test]
    fn invalid_rules() {
        assert!(DnsMatcher::compile(&[DnsRule::MatchName("*.x.com".into())]).is_err());
        assert!(DnsMatcher::compile(&[DnsRule::MatchPattern("a b".into())]).is_err());
        assert!(DnsMatcher::compile(&[DnsRule::MatchPattern("".into())]).is_err());
        let long = "*".repeat(255);
        assert!(DnsMatcher::compile(&[DnsRule::MatchPattern(long)]).is_ok());
    }

    #[test]
    fn normalisation() {
        assert!(matches!(normalize_dns_name("a.com."), Cow::Borrowed(_)));
        assert_eq!(normalize_dns_name("A.Com"), "a.com.");
        assert_eq!(normalize_dns_name(""), ".");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A direct reading of the pattern language, label by label, for comparison.
        fn reference(pattern: &str, name: &str) -> bool {
            let p = normalize_dns_name(pattern).into_owned();
            let n = normalize_dns_name(name).into_owned();
            let valid_label = |l: &str| {
                l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            let body = p.strip_suffix('.').unwrap_or(&p);
            let nbody = n.strip_suffix('.').unwrap_or(&n);
            if body == "*" || body == "**" {
                return nbody.is_empty()
                    || nbody.split('.').all(|l| !l.is_empty() && valid_label(l));
            }
            let plabels: Vec<&str> = body.split('.').collect();
            let nlabels: Vec<&str> = nbody.split('.').collect();
            let (plabels, nlabels): (&[&str], &[&str]) = if plabels.first() == Some(&"**") {
                let rest = &plabels[1..];
                if nlabels.len() <= rest.len() {
                    return false;
                }
                let (head, tail) = nlabels.split_at(nlabels.len() - rest.len());
                if !head.iter().all(|l| !l.is_empty() && valid_label(l)) {
                    return false;
                }
                (rest, tail)
            } else {
                (&plabels, &nlabels)
            };
            plabels.len() == nlabels.len()
                && plabels
                    .iter()
                    .zip(nlabels)
                    .all(|(p, l)| glob(p.as_bytes(), l.as_bytes()))
        }

        /// `*` matches any run of label characters.
        fn glob(p: &[u8], s: &[u8]) -> bool {
            match p.split_first() {
                None => s.is_empty(),
                Some((b'*', rest)) => (0..=s.len())
                    .take_while(|&i| {
                        s[..i]
                            .iter()
                            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
                    })
                    .any(|i| glob(rest, &s[i..])),
                Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
            }
        }

        proptest! {
            #[test]
            fn agrees_with_reference(p in "(\\*\\*\\.)?[ab*_-]{1,3}(\\.[ab*]{1,2}){0,2}\\.?",
                                     n in "[aAb_-]{0,3}(\\.[ab]{0,2}){0,3}\\.?") {
                let m = pat(&p);
                prop_assert_eq!(m.matches(&n).is_some(), reference(&p, &n), "{} vs {}", p, n);
            }

            #[test]
            fn never_panics(p in ".{0,40}", n in ".{0,40}") {
                if let Ok(m) = DnsMatcher::compile(&[
                    DnsRule::MatchPattern(p.clone()),
                    DnsRule::MatchName(p.clone()),
                ]) {
                    let _ = m.matches(&n);
                }
            }
        }
    }
}
