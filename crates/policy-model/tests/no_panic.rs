//! Arbitrary and mutated input never panics; it parses or yields located errors.

use proptest::prelude::*;
use weir_policy_model::parse_policies;
use weir_policy_model::yaml::parse_documents;

const SEEDS: &[&str] = &[
    include_str!("fixtures/seed/deny-all.yaml"),
    include_str!("fixtures/seed/l7-http-policy.yaml"),
    include_str!("fixtures/seed/dns-policy.yaml"),
    include_str!("fixtures/seed/microservice-policies.yaml"),
    include_str!("fixtures/seed/cluster-wide-deny-external.yaml"),
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec:\n  podSelector: {}\n  ingress:\n    - from: [{namespaceSelector: {}}, {ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]\n      ports: [{port: 80, endPort: 90}]\n",
];

/// Edits applied to a valid policy, by line, to reach odd corners of the parser.
#[derive(Debug, Clone)]
enum Edit {
    DeleteLine(usize),
    DuplicateLine(usize),
    Insert(usize, String),
    Indent(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let fragments = prop::sample::select(vec![
        "  - {}",
        "    toPorts: [{ports: [{port: '0'}], rules: {http: [{}]}}]",
        "&a [*a]",
        "- *a",
        "  endPort: 70000",
        "    - fromEntities: [bogus]",
        ": :",
        "\t",
        "'unterminated",
        "    matchExpressions: [{key: a, operator: In}]",
        "---",
        "  specs: [{}]",
        "- port: ～",
    ]);
    prop_oneof![
        (0usize..80).prop_map(Edit::DeleteLine),
        (0usize..80).prop_map(Edit::DuplicateLine),
        (0usize..80, fragments.prop_map(String::from)).prop_map(|(i, s)| Edit::Insert(i, s)),
        (0usize..80, "[ -~]{0,12}").prop_map(|(i, s)| Edit::Insert(i, s)),
        (0usize..80, 0usize..8).prop_map(|(i, n)| Edit::Indent(i, n)),
        (0usize..3000).prop_map(Edit::Truncate),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for e in edits {
        let n = lines.len().max(1);
        match e {
            Edit::DeleteLine(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Edit::DuplicateLine(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Edit::Insert(i, s) => lines.insert(i % (lines.len() + 1), s.clone()),
            Edit::Indent(i, k) if !lines.is_empty() => {
                let l = format!("{}{}", " ".repeat(*k), lines[i % n]);
                lines[i % n] = l;
            }
            Edit::Truncate(at) => {
                let joined = lines.join("\n");
                let cut: String = joined.chars().take(*at).collect();
                lines = cut.lines().map(String::from).collect();
            }
            _ => {}
        }
    }
    lines.join("\n")
}

proptest! {
    #[test]
    fn arbitrary_strings_never_panic(s in "\\PC{0,200}") {
        let _ = parse_documents(&s);
        let _ = parse_policies("x.yaml", &s);
    }

    #[test]
    fn yamlish_strings_never_panic(s in "[-:{}\\[\\]&*!|>'\" \\n#a-z0-9?,.]{0,120}") {
        let _ = parse_policies("x.yaml", &s);
    }

    #[test]
    fn mutated_policies_never_panic(
        seed in prop::sample::select(SEEDS.to_vec()),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let text = apply(seed, &edits);
        if let Err(errors) = parse_policies("m.yaml", &text) {
            prop_assert!(!errors.0.is_empty());
            for e in &errors.0 {
                prop_assert!(e.location.line >= 1);
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}
