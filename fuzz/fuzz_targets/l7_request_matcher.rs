//! The L7 proxy's request decision on arbitrary requests: `PolicySnapshot::decide` with a
//! compiled policy (methods, paths, hosts, required headers, `headerMatches` actions), for
//! the allowed peer, another peer and another port, must never panic; and the matcher's
//! `matches` and `evaluate` must agree on the deciding rule.
//!
//! Input: lines split on `\n`: method, path, host (empty = none), then `name: value` headers.
#![no_main]

#[path = "l7_common.rs"]
mod l7_common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weir_identity::Identity;
use weir_l7_match::{HeaderMatch, HttpMatcher, HttpRequestView, HttpRule, MismatchAction};
use weir_l7_proxy::PolicySnapshot;
use weir_policy_model::Direction;

fn snapshot() -> &'static Option<PolicySnapshot> {
    static S: OnceLock<Option<PolicySnapshot>> = OnceLock::new();
    S.get_or_init(|| l7_common::snapshot(8080))
}

fn matcher() -> &'static Option<HttpMatcher> {
    static M: OnceLock<Option<HttpMatcher>> = OnceLock::new();
    M.get_or_init(|| {
        let header = |name: &str, value: Option<&str>, mismatch| HeaderMatch {
            name: name.into(),
            value: value.map(str::to_string),
            mismatch,
        };
        let rules = [
            HttpRule {
                method: Some("GET".into()),
                path: Some("/api/users/[0-9]+".into()),
                ..HttpRule::default()
            },
            HttpRule {
                host: Some("(www\\.)?example\\.com".into()),
                headers: vec![header("x-token", Some("a"), MismatchAction::Fail)],
                ..HttpRule::default()
            },
            HttpRule {
                path: Some("/m.*".into()),
                headers: vec![
                    header("X-Add", Some("v"), MismatchAction::Add),
                    header("X-Replace", Some("v"), MismatchAction::Replace),
                    header("X-Delete", None, MismatchAction::Delete),
                    header("X-Log", Some("v"), MismatchAction::Log),
                ],
                ..HttpRule::default()
            },
        ];
        HttpMatcher::compile(&rules).ok()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or("");
    let path = lines.next().unwrap_or("");
    let host = lines.next().filter(|h| !h.is_empty());
    let headers: Vec<(&str, &str)> = lines
        .map(|l| l.split_once(':').map_or((l, ""), |(n, v)| (n, v.trim())))
        .collect();
    let req = HttpRequestView {
        method,
        path,
        host,
        headers: &headers,
    };
    let (Some(snapshot), Some(matcher)) = (snapshot(), matcher()) else {
        panic!("the fuzz policy must compile");
    };
    let ep = l7_common::ENDPOINT;
    let d = snapshot.decide(ep, Direction::Ingress, l7_common::FRONTEND, 8080, &req);
    assert!(d.is_allowed() || d.header_actions.is_empty());
    let other = snapshot.decide(ep, Direction::Ingress, Identity(4242), 8080, &req);
    assert!(
        !other.is_allowed(),
        "a peer the policy does not name is denied"
    );
    let port = snapshot.decide(ep, Direction::Ingress, l7_common::FRONTEND, 9090, &req);
    assert!(!port.is_allowed(), "a port without rules fails closed");
    let egress = snapshot.decide(ep, Direction::Egress, l7_common::FRONTEND, 8080, &req);
    assert!(!egress.is_allowed(), "no egress rules: fails closed");

    let first = matcher.matches(&req);
    let full = matcher.evaluate(&req);
    assert_eq!(first, full.as_ref().map(|m| m.rule));
});
