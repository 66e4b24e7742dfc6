//! Validation of user-supplied patterns, used by the policy parser before anything is compiled.

/// Why a pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The regex does not parse, or is too large or too deeply nested.
    #[error("invalid regex: {0}")]
    Regex(String),
    /// A DNS name or pattern uses characters outside `[-a-zA-Z0-9_.]` (plus `*` in patterns).
    #[error("invalid character {0:?} in DNS {1}")]
    DnsChar(char, &'static str),
    /// A DNS name or pattern is empty or longer than 255 characters.
    #[error("DNS {0} must be 1 to 255 characters long")]
    DnsLength(&'static str),
}

/// Patterns come from policy authors, so their size is bounded.
const MAX_REGEX_LEN: usize = 4096;
const MAX_NEST: u32 = 64;

/// Checks that `pattern` is a valid regex on its own (before it is wrapped for full matching, so
/// that a pattern such as `)(` cannot become valid by composition).
pub fn check_regex(pattern: &str) -> Result<(), PatternError> {
    parse_regex(pattern).map(|_| ())
}

/// Checks and parses a pattern on its own; the syntax tree is what the matchers compile.
pub(crate) fn parse_regex(pattern: &str) -> Result<regex_syntax::hir::Hir, PatternError> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(PatternError::Regex(format!(
            "longer than {MAX_REGEX_LEN} bytes"
        )));
    }
    regex_syntax::ParserBuilder::new()
        .nest_limit(MAX_NEST)
        .build()
        .parse(pattern)
        .map_err(|e| PatternError::Regex(first_line(&e.to_string())))
}

fn first_line(s: &str) -> String {
    // regex-syntax errors are multi-line drawings; the last line carries the message.
    s.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_string()
}

/// Checks a `matchName` value.
pub fn check_dns_name(name: &str) -> Result<(), PatternError> {
    check_dns(name, false)
}

/// Checks a `matchPattern` value.
pub fn check_dns_pattern(pattern: &str) -> Result<(), PatternError> {
    check_dns(pattern, true)
}

fn check_dns(s: &str, pattern: bool) -> Result<(), PatternError> {
    let what = if pattern { "pattern" } else { "name" };
    if s.is_empty() || s.len() > 255 {
        return Err(PatternError::DnsLength(what));
    }
    for c in s.chars() {
        let ok = c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (pattern && c == '*');
        if !ok {
            return Err(PatternError::DnsChar(c, what));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes() {
        assert!(check_regex("/api/users/[0-9]+").is_ok());
        assert!(check_regex(")(").is_err());
        assert!(check_regex("[").is_err());
    }

    #[test]
    fn dns() {
        assert!(check_dns_pattern("*.amazonaws.com").is_ok());
        assert!(check_dns_name("*.amazonaws.com").is_err());
        assert!(check_dns_name("api.stripe.com.").is_ok());
        assert!(check_dns_pattern("a b").is_err());
        assert!(check_dns_name("").is_err());
    }
}
