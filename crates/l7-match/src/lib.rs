//! L7 rule data and matchers: HTTP (`rules.http`) and DNS names (`rules.dns`, `toFQDNs`).
//!
//! The rule types here are plain data, shared by the policy parser, the compiler, the offline
//! tester and the proxies; the matchers compile them once into one automaton per field and
//! match in one pass. Regexes are full-match by construction (Envoy's `safe_regex` semantics,
//! which Cilium uses), and every pattern is checked on its own before it is compiled.
//!
//! Regex syntax is Rust's, which is close to RE2: no backreferences, no lookaround. One known
//! difference: `\d`, `\w`, `\s` are Unicode-aware here and ASCII-only in RE2.

mod check;
mod dns;
mod engine;
mod http;
mod rules;

pub use check::{PatternError, check_dns_name, check_dns_pattern, check_regex};
pub use dns::{DnsMatcher, dns_pattern_regex, normalize_dns_name};
pub use http::{HeaderMismatch, HttpMatch, HttpMatcher, HttpRequestView};
pub use rules::{DnsRule, HeaderMatch, HttpRule, MismatchAction};
