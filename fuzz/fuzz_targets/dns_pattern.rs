//! A pattern and a name: compiling and matching DNS rules must never panic, and matching must
//! not depend on case or on the trailing dot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_l7_match::{DnsMatcher, DnsRule};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, name) = text.split_once('\0').unwrap_or((text, ""));
    let rules = [
        DnsRule::MatchPattern(pattern.to_string()),
        DnsRule::MatchName(pattern.to_string()),
    ];
    for r in &rules {
        let Ok(m) = DnsMatcher::compile(std::slice::from_ref(r)) else {
            continue;
        };
        let got = m.matches(name);
        if !name.ends_with('.') {
            assert_eq!(got, m.matches(&format!("{name}.")));
        }
        assert_eq!(got, m.matches(&name.to_ascii_uppercase()));
    }
});
