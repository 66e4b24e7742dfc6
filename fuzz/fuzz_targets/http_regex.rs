//! Arbitrary bytes split into a pattern and a subject: checking, compiling and matching must
//! never panic, and a pattern that compiles must pass `check_regex` on its own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_l7_match::{
    HeaderMatch, HttpMatcher, HttpRequestView, HttpRule, MismatchAction, check_regex,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first NUL (or the whole input) ends the pattern; the rest is the subject.
    let (pattern, subject) = text.split_once('\0').unwrap_or((text, ""));
    let checked = check_regex(pattern).is_ok();
    let rules = [
        HttpRule {
            method: Some(pattern.to_string()),
            ..HttpRule::default()
        },
        HttpRule {
            path: Some(pattern.to_string()),
            host: Some(pattern.to_string()),
            headers: vec![HeaderMatch {
                name: subject.chars().take(8).collect(),
                value: Some(subject.to_string()),
                mismatch: MismatchAction::Replace,
            }],
            ..HttpRule::default()
        },
    ];
    let Ok(matcher) = HttpMatcher::compile(&rules) else {
        return;
    };
    assert!(checked, "compiled a pattern that does not check alone");
    let headers = [(subject, subject), ("x", pattern)];
    let req = HttpRequestView {
        method: subject,
        path: subject,
        host: Some(subject),
        headers: &headers,
    };
    let first = matcher.matches(&req);
    let full = matcher.evaluate(&req);
    assert_eq!(first, full.map(|m| m.rule));
});
