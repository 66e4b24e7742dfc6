//! Arbitrary label strings and selector keys: parsing labels and keys, building requirements
//! and matching selectors must never panic; a parsed label prints and parses back to itself.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use weir_identity::{Label, LabelKey, LabelSet, Operator, Requirement, Selector};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let labels_part = parts.next().unwrap_or("");
    let keys_part = parts.next().unwrap_or("");
    let values_part = parts.next().unwrap_or("");

    let mut labels = LabelSet::new();
    for s in labels_part.split('\n') {
        if let Ok(l) = s.parse::<Label>() {
            let again: Result<Label, _> = l.to_string().parse();
            assert_eq!(again.as_ref(), Ok(&l), "label does not round-trip: {s:?}");
            labels.insert(l);
        }
    }

    let values: BTreeSet<String> = values_part
        .split('\n')
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect();
    let mut requirements = Vec::new();
    for (i, k) in keys_part.split('\n').enumerate() {
        let key = LabelKey::parse_selector_key(k);
        let _ = key.to_string();
        let op = match i % 4 {
            0 => Operator::In,
            1 => Operator::NotIn,
            2 => Operator::Exists,
            _ => Operator::DoesNotExist,
        };
        let vals = if matches!(op, Operator::In | Operator::NotIn) {
            values.clone()
        } else {
            BTreeSet::new()
        };
        if let Ok(r) = Requirement::new(key.clone(), op, vals) {
            let _ = r.matches(&labels);
            requirements.push(r);
        }
        let _ = Requirement::new(key, op, values.clone());
    }
    let selector = Selector::new(requirements);
    let all = selector.matches(&labels);
    assert_eq!(
        all,
        selector.requirements().iter().all(|r| r.matches(&labels))
    );
    let _ = selector.to_string();
});
