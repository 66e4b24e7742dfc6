//! The DNS proxy's message parser (`weir_dns_proxy::parse_message`) on arbitrary bytes: it
//! must return, never panic; a parsed message's answers must resolve without panicking; and
//! the quick readers the proxy tries first (`wire::parse_quick`) must agree with it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = weir_dns_proxy::parse_message(data);
    if let Some(quick) = weir_dns_proxy::wire::parse_quick(data) {
        assert_eq!(full.as_ref().ok(), Some(&quick), "quick reader disagrees");
    }
    if let Ok(m) = full {
        let qname = m.questions.first().map(|q| q.name.as_str()).unwrap_or(".");
        let _ = weir_dns_proxy::wire::resolve_chain(qname, &m.answers);
    }
});
