//! Building multi-pattern, full-match regex automata with bounded size.

use regex_automata::meta::Regex;
use regex_automata::{Input, MatchKind, PatternSet};
use regex_syntax::hir::{Hir, Look};

use crate::check::{PatternError, parse_regex};

/// Compiled automata for policy patterns are bounded; a policy that needs more is rejected.
const NFA_SIZE_LIMIT: usize = 8 << 20;
const DFA_SIZE_LIMIT: usize = 8 << 20;

/// A set of patterns, each anchored at both ends, answering "which of them match all of this
/// input" in one pass.
#[derive(Debug, Clone)]
pub(crate) struct FullMatchSet {
    regex: Option<Regex>,
}

impl FullMatchSet {
    /// Compiles patterns for full matching. Each pattern is checked and parsed on its own,
    /// then anchored at both ends in its syntax tree (the same as `\A(?:pattern)\z`, but a
    /// trailing `(?x)` comment in the pattern cannot swallow the closing anchor).
    pub(crate) fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        if patterns.is_empty() {
            return Ok(FullMatchSet { regex: None });
        }
        let hirs = patterns
            .iter()
            .map(|p| {
                let hir = parse_regex(p.as_ref())?;
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
        Ok(FullMatchSet { regex: Some(regex) })
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
