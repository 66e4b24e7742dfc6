//! The DNS proxy's message parser (`weir_dns_proxy::parse_message`) on arbitrary bytes: it
//! must return, never panic; and a parsed message's answers must resolve without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = weir_dns_proxy::parse_message(data) {
        let qname = m.questions.first().map(|q| q.name.as_str()).unwrap_or(".");
        let _ = weir_dns_proxy::wire::resolve_chain(qname, &m.answers);
    }
});
