//! Fuzz the policy parser: any bytes must parse or fail with errors, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = weir_policy_model::parse_policies("fuzz.yaml", text);
    }
});
