//! Plain-data L7 rules, as written in a policy (after parsing, before compiling).

/// One `rules.http` entry. Every field that is set must match (AND); entries in a list are ORed.
/// An entry with nothing set allows every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HttpRule {
    /// Regex that must fully match the request method (case-sensitive).
    pub method: Option<String>,
    /// Regex that must fully match the request path (`:path`, including any query string).
    pub path: Option<String>,
    /// Regex that must fully match the host (`:authority` / `Host`).
    pub host: Option<String>,
    /// Header requirements, from `headers` and `headerMatches`.
    pub headers: Vec<HeaderMatch>,
}

/// A header requirement: presence (no value) or an exact value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderMatch {
    /// Header name; compared case-insensitively.
    pub name: String,
    /// Exact value required; `None` means the header must only be present.
    pub value: Option<String>,
    /// What to do when the header does not match (`headerMatches[].mismatch`).
    pub mismatch: MismatchAction,
}

/// `headerMatches[].mismatch`: what happens when a header does not match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MismatchAction {
    /// The rule does not match (the default).
    #[default]
    Fail,
    /// Log the mismatch and let the rule match.
    Log,
    /// Add the header with the expected value and let the rule match.
    Add,
    /// Delete the header and let the rule match.
    Delete,
    /// Replace the header's value with the expected one and let the rule match.
    Replace,
}

/// One `rules.dns` entry or one `toFQDNs` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DnsRule {
    /// `matchName`: an exact name, case-insensitive, trailing dot implied.
    MatchName(String),
    /// `matchPattern`: `*` matches within one label; `*` alone matches every name.
    MatchPattern(String),
}
