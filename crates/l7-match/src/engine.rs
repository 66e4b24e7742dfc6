//! Building multi-pattern, full-match regex automata with bounded size.

use regex_automata::meta::Regex;
use regex_automata::{Input, MatchKind, PatternID, PatternSet};
use regex_syntax::hir::{Hir, HirKind, Look};

use crate::check::{PatternError, parse_regex};

/// Compiled automata for policy patterns are bounded; a policy that needs more is rejected.
const NFA_SIZE_LIMIT: usize = 8 << 20;
const DFA_SIZE_LIMIT: usize = 8 << 20;

/// A set of patterns, each anchored at both ends, answering "which of them match all of this
/// input" in one pass.
#[derive(Debug, Clone)]
pub(crate) struct FullMatchSet {
    regex: Option<Regex>,
    /// When every pattern is a plain literal (`GET`, `/api/products`), all distinct: the
    /// literals, so a request is answered by comparing strings instead of running the
    /// automaton (a full match of a literal is equality).
    literals: Option<Vec<Box<[u8]>>>,
}

/// Which patterns of a [`FullMatchSet`] match one input.
#[derive(Debug)]
pub(crate) enum FieldMatch {
    /// The one literal pattern equal to the input, if any.
    Literal(Option<PatternID>),
    /// The automaton's answer.
    Set(PatternSet),
}

impl FieldMatch {
    /// Whether pattern `p` matches.
    pub(crate) fn contains(&self, p: PatternID) -> bool {
        match self {
            FieldMatch::Literal(found) => *found == Some(p),
            FieldMatch::Set(set) => set.contains(p),
        }
    }
}

impl FullMatchSet {
    /// Compiles patterns for full matching. Each pattern is checked and parsed on its own,
    /// then anchored at both ends in its syntax tree (the same as `\A(?:pattern)\z`, but a
    /// trailing `(?x)` comment in the pattern cannot swallow the closing anchor).
    pub(crate) fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        if patterns.is_empty() {
            return Ok(FullMatchSet {
                regex: None,
                literals: None,
            });
        }
        let mut literals = Some(Vec::with_capacity(patterns.len()));
        let hirs = patterns
            .iter()
            .map(|p| {
                let hir = parse_regex(p.as_ref())?;
                let literal = match hir.kind() {
                    HirKind::Literal(l) => Some(l.0.clone()),
                    HirKind::Empty => Some(Box::default()),
                    _ => None,
                };
                match (literal, literals.as_mut()) {
                    (Some(l), Some(all)) if !all.contains(&l) => all.push(l),
                    _ => literals = None,
                }
                Ok(Hir::concat(vec![
                    Hir::look(Look::Start),
                    hir,
                    Hir::look(Look::End),
                ]))
            })
            .collect::<Result<Vec<Hir>, PatternError>>()?;
        let regex = Regex::builder()
            .configure(
                Regex::config()
                    // Every pattern that matches must be reported, not only the first.
                    .match_kind(MatchKind::All)
                    .nfa_size_limit(Some(NFA_SIZE_LIMIT))
                    .dfa_size_limit(Some(DFA_SIZE_LIMIT)),
            )
            .build_many_from_hir(&hirs)
            .map_err(|e| PatternError::Regex(e.to_string()))?;
        Ok(FullMatchSet {
            regex: Some(regex),
            literals,
        })
    }

    /// Which patterns match the whole input (by string comparison when all are literals).
    pub(crate) fn field_match(&self, input: &str) -> FieldMatch {
        match &self.literals {
            Some(literals) => FieldMatch::Literal(
                literals
                    .iter()
                    .position(|l| **l == *input.as_bytes())
                    .map(PatternID::new_unchecked),
            ),
            None => FieldMatch::Set(self.matching(input)),
        }
    }

    /// How many patterns the set holds.
    #[cfg(test)]
    pub(crate) fn pattern_count(&self) -> usize {
        self.regex.as_ref().map_or(0, |r| r.pattern_len())
    }

    /// The patterns that match the whole input.
    pub(crate) fn matching(&self, input: &str) -> PatternSet {
        match &self.regex {
            Some(re) => {
                let mut set = PatternSet::new(re.pattern_len());
                re.which_overlapping_matches(&Input::new(input), &mut set);
                set
            }
            None => PatternSet::new(0),
        }
    }

    /// The lowest-numbered pattern that matches the whole input.
    pub(crate) fn first_match(&self, input: &str) -> Option<usize> {
        self.matching(input).iter().next().map(|p| p.as_usize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(patterns: &[&str]) -> FullMatchSet {
        FullMatchSet::new(patterns).unwrap_or_else(|e| panic!("{patterns:?}: {e}"))
    }

    /// Sets of distinct plain literals are answered by comparison, and the answer is the
    /// automaton's.
    #[test]
    fn literal_sets_answer_like_the_automaton() {
        let literal = set(&["GET", "/api/products", r"/api\.v1", ""]);
        assert!(literal.literals.is_some());
        for other in [
            &["GET", "/api/[0-9]+"][..],
            &["GET", "GET"],
            &["(?i)get"],
            &["GET|PUT"],
        ] {
            assert!(set(other).literals.is_none(), "{other:?}");
        }
        for input in [
            "GET",
            "get",
            "GETX",
            "",
            "/api/products",
            "/api/products/",
            "/api.v1",
            "/apixv1",
        ] {
            let fast = literal.field_match(input);
            let slow = literal.matching(input);
            for p in 0..4 {
                let p = PatternID::new_unchecked(p);
                assert_eq!(fast.contains(p), slow.contains(p), "{input:?} {p:?}");
            }
        }
    }
}
