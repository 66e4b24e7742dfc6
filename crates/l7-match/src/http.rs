//! Matching HTTP requests against `rules.http`.
//!
//! A rule allows a request when its method, path and host regexes fully match (each one that is
//! set), and each header requirement holds. A header requirement whose `mismatch` action is not
//! [`MismatchAction::Fail`] never stops a rule from matching: the mismatch is reported so the
//! proxy can log it or add, delete or replace the header. Rules are ORed.

use std::collections::HashMap;

use regex_automata::PatternID;

use crate::check::PatternError;
use crate::engine::{FieldMatch, FullMatchSet};
use crate::rules::{HeaderMatch, HttpRule, MismatchAction};

/// The parts of a request that rules look at. `path` is the `:path` as sent, query included.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestView<'a> {
    /// The method (`:method`), compared case-sensitively.
    pub method: &'a str,
    /// The path (`:path`), including any query string.
    pub path: &'a str,
    /// The host (`:authority` or `Host`), if the request has one.
    pub host: Option<&'a str>,
    /// Every header as (name, value), in the order received; a name may repeat.
    pub headers: &'a [(&'a str, &'a str)],
}

/// A header requirement that did not hold, on a rule that still matched because the
/// requirement's `mismatch` action is not `Fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderMismatch<'m> {
    /// Index of the rule the requirement belongs to.
    pub rule: usize,
    /// The requirement; its `mismatch` field says what the proxy should do.
    pub header: &'m HeaderMatch,
    /// Whether the request carries the header at all (with another value).
    pub present: bool,
}

impl HeaderMismatch<'_> {
    /// What to do about the mismatch.
    pub fn action(&self) -> MismatchAction {
        self.header.mismatch
    }
}

/// The outcome of [`HttpMatcher::evaluate`] for an allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpMatch<'m> {
    /// The first rule (by index) that allows the request.
    pub rule: usize,
    /// Header mismatches to act on, from *every* rule that allows the request (as Cilium's
    /// proxy runs the header actions of all matching rules), in rule order.
    pub mismatches: Vec<HeaderMismatch<'m>>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    method: Option<PatternID>,
    path: Option<PatternID>,
    host: Option<PatternID>,
    headers: Vec<HeaderMatch>,
}

/// Compiled `rules.http` of one port: every method, path and host regex of all rules is in one
/// automaton per field, so a request costs three passes whatever the number of rules.
#[derive(Debug, Clone)]
pub struct HttpMatcher {
    rules: Vec<CompiledRule>,
    method: FullMatchSet,
    path: FullMatchSet,
    host: FullMatchSet,
    has_actions: bool,
}

/// Collects one field's patterns across rules. Rules repeat patterns (most say `GET`), and
/// each distinct pattern is compiled once: the automaton, and so the cost of every request,
/// grows with the distinct patterns, not with the rules.
#[derive(Default)]
struct FieldPatterns {
    patterns: Vec<String>,
    ids: HashMap<String, PatternID>,
}

impl FieldPatterns {
    fn add(&mut self, pattern: Option<&String>) -> Result<Option<PatternID>, PatternError> {
        let Some(p) = pattern else {
            return Ok(None);
        };
        if let Some(id) = self.ids.get(p) {
            return Ok(Some(*id));
        }
        let id = PatternID::new(self.patterns.len())
            .map_err(|_| PatternError::Regex("too many patterns".to_string()))?;
        self.patterns.push(p.clone());
        self.ids.insert(p.clone(), id);
        Ok(Some(id))
    }
}

impl HttpMatcher {
    /// Compiles rules. An empty list allows every request, as one empty rule does (Cilium
    /// treats a port with no HTTP rules as unrestricted at L7); [`matches`](Self::matches) then
    /// answers `Some(0)`.
    pub fn compile(rules: &[HttpRule]) -> Result<HttpMatcher, PatternError> {
        let default_rule = [HttpRule::default()];
        let rules = if rules.is_empty() {
            &default_rule[..]
        } else {
            rules
        };
        let (mut method, mut path, mut host) = (
            FieldPatterns::default(),
            FieldPatterns::default(),
            FieldPatterns::default(),
        );
        let mut compiled = Vec::with_capacity(rules.len());
        for r in rules {
            compiled.push(CompiledRule {
                method: method.add(r.method.as_ref())?,
                path: path.add(r.path.as_ref())?,
                host: host.add(r.host.as_ref())?,
                headers: r.headers.clone(),
            });
        }
        let has_actions = compiled
            .iter()
            .flat_map(|r| &r.headers)
            .any(|h| h.mismatch != MismatchAction::Fail);
        Ok(HttpMatcher {
            rules: compiled,
            method: FullMatchSet::new(&method.patterns)?,
            path: FullMatchSet::new(&path.patterns)?,
            host: FullMatchSet::new(&host.patterns)?,
            has_actions,
        })
    }

    /// How many rules there are (1 for an empty list).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The index of the first rule that allows the request, or `None` if it is denied.
    pub fn matches(&self, req: &HttpRequestView<'_>) -> Option<usize> {
        let fields = self.field_matches(req);
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| fields.allow(r, req))
            .map(|(i, _)| i)
    }

    /// Like [`matches`](Self::matches), and also the header mismatches the proxy must act on.
    pub fn evaluate(&self, req: &HttpRequestView<'_>) -> Option<HttpMatch<'_>> {
        let fields = self.field_matches(req);
        let mut first = None;
        let mut mismatches = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            if !fields.allow(r, req) {
                continue;
            }
            first.get_or_insert(i);
            if !self.has_actions {
                break;
            }
            for h in r.headers.iter() {
                if h.mismatch == MismatchAction::Fail {
                    continue;
                }
                let state = header_state(req.headers, h);
                if state != HeaderState::Matches {
                    mismatches.push(HeaderMismatch {
                        rule: i,
                        header: h,
                        present: state == HeaderState::OtherValue,
                    });
                }
            }
        }
        first.map(|rule| HttpMatch { rule, mismatches })
    }

    fn field_matches(&self, req: &HttpRequestView<'_>) -> FieldMatches {
        FieldMatches {
            method: self.method.field_match(req.method),
            path: self.path.field_match(req.path),
            host: req.host.map(|h| self.host.field_match(h)),
        }
    }
}

struct FieldMatches {
    method: FieldMatch,
    path: FieldMatch,
    host: Option<FieldMatch>,
}

impl FieldMatches {
    /// Whether a rule allows the request: its regexes match and its `Fail` headers hold.
    fn allow(&self, r: &CompiledRule, req: &HttpRequestView<'_>) -> bool {
        let field_ok = |pid: Option<PatternID>, set: Option<&FieldMatch>| match pid {
            None => true,
            Some(p) => set.is_some_and(|s| s.contains(p)),
        };
        field_ok(r.method, Some(&self.method))
            && field_ok(r.path, Some(&self.path))
            && field_ok(r.host, self.host.as_ref())
            && r.headers.iter().all(|h| {
                h.mismatch != MismatchAction::Fail
                    || header_state(req.headers, h) == HeaderState::Matches
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderState {
    Matches,
    OtherValue,
    Absent,
}

/// Tests one header requirement. Names compare case-insensitively; a value requirement compares
/// against all values of the header joined with `,` (as Envoy's header matcher does).
fn header_state(headers: &[(&str, &str)], h: &HeaderMatch) -> HeaderState {
    let mut values = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(&h.name))
        .map(|(_, v)| *v)
        .peekable();
    if values.peek().is_none() {
        return HeaderState::Absent;
    }
    match &h.value {
        None => HeaderState::Matches,
        Some(expected) if joined_equals(values, expected) => HeaderState::Matches,
        Some(_) => HeaderState::OtherValue,
    }
}

/// Whether the values joined with `,` equal `expected`, without building the joined string.
fn joined_equals<'a>(values: impl Iterator<Item = &'a str>, expected: &str) -> bool {
    let mut rest = expected;
    for (i, v) in values.enumerate() {
        if i > 0 {
            match rest.strip_prefix(',') {
                Some(r) => rest = r,
                None => return false,
            }
        }
        match rest.strip_prefix(v) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(method: Option<&str>, path: Option<&str>) -> HttpRule {
        HttpRule {
            method: method.map(str::to_string),
            path: path.map(str::to_string),
            ..HttpRule::default()
        }
    }

    fn req<'a>(method: &'a str, path: &'a str) -> HttpRequestView<'a> {
        HttpRequestView {
            method,
            path,
            host: None,
            headers: &[],
        }
    }

    #[test]
    fn full_match_paths() {
        let m = HttpMatcher::compile(&[
            rule(Some("GET"), Some("/api/products")),
            rule(Some("GET"), Some("/api/users/[0-9]+")),
        ])
        .unwrap();
        assert_eq!(m.matches(&req("GET", "/api/products")), Some(0));
        assert_eq!(m.matches(&req("GET", "/api/products/1")), None);
        assert_eq!(m.matches(&req("GET", "/api/users/42")), Some(1));
        assert_eq!(m.matches(&req("GET", "/api/users/42/orders")), None);
        assert_eq!(
            m.matches(&req("GET", "/api/users/42?x=1")),
            None,
            "query is part of path"
        );
        assert_eq!(
            m.matches(&req("get", "/api/products")),
            None,
            "method is case-sensitive"
        );
        assert_eq!(m.matches(&req("POST", "/api/products")), None);
        assert_eq!(m.matches(&req("GET", "x/api/products")), None);
    }

    #[test]
    fn alternation_is_full_match() {
        // Leftmost-first `find` on `a|ab` stops at `a`; full matching must still accept `ab`.
        let m = HttpMatcher::compile(&[rule(None, Some("a|ab"))]).unwrap();
        assert_eq!(m.matches(&req("GET", "ab")), Some(0));
        assert_eq!(m.matches(&req("GET", "a")), Some(0));
        assert_eq!(m.matches(&req("GET", "abc")), None);
        // Anchors and multi-line flags in the pattern do not loosen the full match.
        let m = HttpMatcher::compile(&[rule(None, Some("(?m)^/a$"))]).unwrap();
        assert_eq!(m.matches(&req("GET", "/a")), Some(0));
        assert_eq!(m.matches(&req("GET", "/a\n/b")), None);
        // A verbose-mode comment cannot swallow the end anchor.
        let m = HttpMatcher::compile(&[rule(None, Some("(?x) /a # comment"))]).unwrap();
        assert_eq!(m.matches(&req("GET", "/a")), Some(0));
        assert_eq!(m.matches(&req("GET", "/ab")), None);
    }

    /// Rules that repeat a pattern share it; each rule still answers for its own fields.
    #[test]
    fn repeated_patterns_are_compiled_once() {
        let rules = [
            rule(Some("GET"), Some("/a")),
            rule(Some("GET"), Some("/b")),
            rule(Some("POST"), Some("/a")),
            rule(Some("GET"), Some("/c")),
        ];
        let m = HttpMatcher::compile(&rules).unwrap();
        assert_eq!(m.method.pattern_count(), 2);
        assert_eq!(m.path.pattern_count(), 3);
        assert_eq!(m.matches(&req("GET", "/b")), Some(1));
        assert_eq!(m.matches(&req("POST", "/a")), Some(2));
        assert_eq!(m.matches(&req("GET", "/c")), Some(3));
        assert_eq!(m.matches(&req("POST", "/b")), None);
    }

    #[test]
    fn empty_rules_allow_all() {
        let m = HttpMatcher::compile(&[]).unwrap();
        assert_eq!(m.matches(&req("DELETE", "/anything")), Some(0));
        let m = HttpMatcher::compile(&[HttpRule::default()]).unwrap();
        assert_eq!(m.matches(&req("PUT", "")), Some(0));
    }

    #[test]
    fn invalid_patterns() {
        assert!(HttpMatcher::compile(&[rule(None, Some(")("))]).is_err());
        assert!(HttpMatcher::compile(&[rule(Some("["), None)]).is_err());
        // Composition cannot repair a pattern: `a)|(b` is not valid on its own.
        assert!(HttpMatcher::compile(&[rule(None, Some("a)|(b"))]).is_err());
        let huge = "a{1000}{1000}{100}";
        assert!(HttpMatcher::compile(&[rule(None, Some(huge))]).is_err());
    }

    #[test]
    fn host_rules() {
        let r = HttpRule {
            host: Some(r"api\.example\.com(:443)?".into()),
            ..HttpRule::default()
        };
        let m = HttpMatcher::compile(&[r]).unwrap();
        let mut q = req("GET", "/");
        assert_eq!(m.matches(&q), None, "no host, no match");
        q.host = Some("api.example.com");
        assert_eq!(m.matches(&q), Some(0));
        q.host = Some("api.example.com:443");
        assert_eq!(m.matches(&q), Some(0));
        q.host = Some("evil.api.example.com");
        assert_eq!(m.matches(&q), None);
    }

    fn header(name: &str, value: Option<&str>, mismatch: MismatchAction) -> HeaderMatch {
        HeaderMatch {
            name: name.into(),
            value: value.map(str::to_string),
            mismatch,
        }
    }

    #[test]
    fn headers() {
        let r = HttpRule {
            headers: vec![
                header("X-Token", Some("secret"), MismatchAction::Fail),
                header("X-Present", None, MismatchAction::Fail),
            ],
            ..HttpRule::default()
        };
        let m = HttpMatcher::compile(&[r]).unwrap();
        let check = |h: &[(&str, &str)]| {
            m.matches(&HttpRequestView {
                method: "GET",
                path: "/",
                host: None,
                headers: h,
            })
        };
        assert_eq!(check(&[("x-token", "secret"), ("x-present", "")]), Some(0));
        assert_eq!(check(&[("X-TOKEN", "secret"), ("X-Present", "1")]), Some(0));
        assert_eq!(check(&[("x-token", "Secret"), ("x-present", "")]), None);
        assert_eq!(check(&[("x-token", "secret")]), None);
        // Repeated headers are joined with `,`, as Envoy does.
        assert_eq!(
            check(&[
                ("x-token", "secret"),
                ("x-token", "other"),
                ("x-present", "")
            ]),
            None
        );
        assert!(joined_equals(["a", "b"].into_iter(), "a,b"));
        assert!(!joined_equals(["a", "b"].into_iter(), "a,"));
        assert!(!joined_equals(["a"].into_iter(), "a,b"));
        assert!(joined_equals(["", ""].into_iter(), ","));
    }

    #[test]
    fn mismatch_actions_still_allow() {
        let rules = [
            HttpRule {
                path: Some("/a".into()),
                headers: vec![
                    header("X-Log", Some("1"), MismatchAction::Log),
                    header("X-Add", Some("v"), MismatchAction::Add),
                ],
                ..HttpRule::default()
            },
            HttpRule {
                path: Some("/.*".into()),
                headers: vec![header("X-Replace", Some("r"), MismatchAction::Replace)],
                ..HttpRule::default()
            },
        ];
        let m = HttpMatcher::compile(&rules).unwrap();
        let headers = [("x-log", "1"), ("x-replace", "wrong")];
        let r = HttpRequestView {
            method: "GET",
            path: "/a",
            host: None,
            headers: &headers,
        };
        assert_eq!(m.matches(&r), Some(0));
        let got = m.evaluate(&r).unwrap();
        assert_eq!(got.rule, 0);
        let summary: Vec<_> = got
            .mismatches
            .iter()
            .map(|x| (x.rule, x.header.name.as_str(), x.action(), x.present))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, "X-Add", MismatchAction::Add, false),
                (1, "X-Replace", MismatchAction::Replace, true),
            ]
        );
        let denied = HttpRequestView { path: "nope", ..r };
        assert_eq!(m.evaluate(&denied), None);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use regex_automata::nfa::thompson::pikevm::PikeVM;
        use regex_automata::{Anchored, Input, MatchKind};

        /// Full match by another route: the longest match anchored at the start, found by the
        /// PikeVM with all-matches semantics, must end at the end of the input.
        fn reference_full_match(pattern: &str, subject: &str) -> Option<bool> {
            let vm = PikeVM::builder()
                .configure(PikeVM::config().match_kind(MatchKind::All))
                .build(pattern)
                .ok()?;
            let mut cache = vm.create_cache();
            let input = Input::new(subject).anchored(Anchored::Yes);
            Some(
                vm.find(&mut cache, input)
                    .is_some_and(|m| m.end() == subject.len()),
            )
        }

        fn small_regex() -> impl Strategy<Value = String> {
            proptest::string::string_regex(r"([ab.]|\[ab\]|\(a\|ab\)|b\*|a\?|\|){0,6}").unwrap()
        }

        proptest! {
            #[test]
            fn full_match_equals_reference(p in small_regex(), s in "[ab]{0,6}") {
                let Some(expected) = reference_full_match(&p, &s) else {
                    return Ok(());
                };
                let m = HttpMatcher::compile(&[rule(None, Some(&p))]).unwrap();
                prop_assert_eq!(m.matches(&req("GET", &s)).is_some(), expected);
            }

            #[test]
            fn never_panics(p in ".{0,24}", s in ".{0,24}", h in ".{0,8}") {
                let r = HttpRule {
                    method: Some(p.clone()),
                    path: Some(p.clone()),
                    host: Some(p.clone()),
                    headers: vec![header(&h, Some(&s), MismatchAction::Log)],
                };
                if let Ok(m) = HttpMatcher::compile(&[r, HttpRule::default()]) {
                    let headers = [(h.as_str(), s.as_str())];
                    let v = HttpRequestView { method: &s, path: &s, host: Some(&s), headers: &headers };
                    prop_assert!(m.matches(&v).is_some());
                    let _ = m.evaluate(&v);
                }
            }
        }
    }
}
