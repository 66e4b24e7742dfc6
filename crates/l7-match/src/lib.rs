//! L7 rule data and matchers: HTTP (`rules.http`) and DNS names (`rules.dns`, `toFQDNs`).
//!
//! The rule types here are plain data, shared by the policy parser, the compiler, the offline
//! tester and the proxies; the matchers compile them once and match without allocation.
//! Regexes are full-match by construction (Envoy's `safe_regex` semantics, which Cilium uses).

mod rules;

pub use rules::{DnsRule, HeaderMatch, HttpRule, MismatchAction};

mod check;

pub use check::{PatternError, check_dns_name, check_dns_pattern, check_regex};
