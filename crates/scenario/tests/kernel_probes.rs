//! Every scenario of the corpus turns into kernel probes whose per-side verdicts agree with the
//! offline runner: a side `decide` drops is the flow's denial; flows the kernel forwards on
//! every side are allowed offline unless a proxy refused them.

use std::path::{Path, PathBuf};

use weir_policy_compiler::{DROP_POLICY_DENY, Verdict};
use weir_scenario::{DenyReason, Outcome, kernel_probes, parse_scenario, run_scenario};

fn corpus() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for dir in ["tests/scenarios", "examples/seed"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn probes_agree_with_the_offline_runner() {
    let files = corpus();
    assert!(files.len() > 80, "corpus has {} files", files.len());
    let mut probes_total = 0;
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.display().to_string();
        let s = parse_scenario(&name, &text).unwrap();
        let run = run_scenario(&s);
        let probes = kernel_probes(&s).unwrap_or_else(|e| panic!("{e}"));
        for p in &probes {
            probes_total += 1;
            let result = run.flows.iter().find(|f| f.line == p.line).unwrap();
            assert_eq!(result.flow, p.flow);
            assert_eq!(p.src.is_ipv6(), p.dst.is_ipv6());
            let denied = p.sides.iter().find_map(|side| match side.expected {
                Verdict::Deny { reason } => Some(reason),
                _ => None,
            });
            match (denied, result.actual) {
                (Some(r), Outcome::Deny(why)) => {
                    let want = if r == DROP_POLICY_DENY {
                        DenyReason::PolicyDeny
                    } else {
                        DenyReason::PolicyDenied
                    };
                    assert_eq!(why, want, "{name}:{} {}", p.line, p.flow);
                }
                (Some(_), Outcome::Allow) => {
                    panic!("{name}:{} {}: kernel drops, runner allows", p.line, p.flow)
                }
                (None, Outcome::Deny(why)) => {
                    // Only a proxy can refuse what the kernel forwards.
                    assert!(
                        p.sides
                            .iter()
                            .any(|s| matches!(s.expected, Verdict::Redirect { .. })),
                        "{name}:{} {}: runner denies ({why:?}) but no side redirects",
                        p.line,
                        p.flow
                    );
                }
                (None, Outcome::Allow) => {}
            }
        }
    }
    assert!(probes_total > 300, "only {probes_total} probes");
}
