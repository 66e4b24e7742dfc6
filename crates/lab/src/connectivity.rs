//! `weir connectivity test`: a built-in suite run on real traffic in a lab of its own, like
//! `cilium connectivity test`. Client, client2, echo and kube-dns pods are created through
//! the CNI plugin once; each phase then installs its policies and checks its flows: without
//! policies, an ingress policy, an egress policy with DNS, FQDN and HTTP rules (through the
//! agent's proxies), and a deny policy. Pod to pod, pod to world, pod to host, host and world
//! to pods, ICMP, DNS and HTTP are all covered.
//!
//! Each phase is a scenario file (the same format as `weir policy test`); a unit test checks
//! the suite's expected verdicts against the offline oracle, so the suite itself cannot drift
//! from Cilium's semantics.

use std::time::Duration;

use weir_scenario::{Expect, Scenario};

use crate::LabError;
use crate::cluster::ClusterSpec;
use crate::lab::Lab;
use crate::probe::{Observed, run_flows};

/// The pods and DNS names every phase shares.
const PODS: &str = include_str!("connectivity/pods.yaml");
/// The phases, in order.
const PHASES: [(&str, &str); 4] = [
    (
        "1-no-policies.yaml",
        include_str!("connectivity/1-no-policies.yaml"),
    ),
    (
        "2-ingress-policy.yaml",
        include_str!("connectivity/2-ingress-policy.yaml"),
    ),
    (
        "3-egress-l7-dns.yaml",
        include_str!("connectivity/3-egress-l7-dns.yaml"),
    ),
    (
        "4-deny-policy.yaml",
        include_str!("connectivity/4-deny-policy.yaml"),
    ),
];

/// The suite's phases as scenarios.
pub fn suite() -> Result<Vec<Scenario>, LabError> {
    PHASES
        .iter()
        .map(|(file, text)| {
            // Shared pods first, so every phase keeps the same pods and identities.
            let whole = format!("{PODS}{text}");
            weir_scenario::parse_scenario(&format!("connectivity/{file}"), &whole).map_err(
                |errors| {
                    let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    LabError::Command(format!("built-in suite: {}", msgs.join("; ")))
                },
            )
        })
        .collect()
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Check {
    /// The phase (scenario name).
    pub phase: String,
    /// The flow, e.g. `client -> echo TCP/8080 GET /private`.
    pub flow: String,
    /// `allow`, `deny`, or `deny (reason)`.
    pub expected: String,
    /// What the network did.
    pub observed: Observed,
    /// `Some(true)` passed, `Some(false)` failed, `None` skipped.
    pub passed: Option<bool>,
}

/// The suite's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Checks that gave the expected verdict.
    pub passed: usize,
    /// Checks that did not.
    pub failed: usize,
    /// Checks not run.
    pub skipped: usize,
}

/// Runs the suite in `lab` (an empty lab, just up): builds the pods, then runs each phase,
/// calling `report` once per phase start (with its description) and once per check.
pub fn run(
    lab: &mut Lab,
    deadline: Duration,
    mut on_phase: impl FnMut(&Scenario),
    mut on_check: impl FnMut(&Check),
) -> Result<Summary, LabError> {
    let phases = suite()?;
    let mut summary = Summary::default();
    for s in &phases {
        on_phase(s);
        let spec = ClusterSpec::from_scenario(s);
        let report = lab.apply(&spec)?;
        if let Some(e) = report.policy_error {
            return Err(LabError::Agent(format!(
                "the agent rejected the policies of {}: {e}",
                s.name
            )));
        }
        for o in run_flows(lab, s, deadline) {
            let expected = match (o.expected, o.reason) {
                (Expect::Allow, _) => "allow".to_string(),
                (Expect::Deny, Some(r)) => format!("deny ({})", r.as_str()),
                (Expect::Deny, None) => "deny".to_string(),
            };
            let passed = o.passed();
            match passed {
                Some(true) => summary.passed += 1,
                Some(false) => summary.failed += 1,
                None => summary.skipped += 1,
            }
            on_check(&Check {
                phase: s.name.clone(),
                flow: o.flow,
                expected,
                observed: o.observed,
                passed,
            });
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suite_agrees_with_the_offline_oracle() {
        let phases = suite().expect("the built-in suite parses");
        assert_eq!(phases.len(), PHASES.len());
        for s in &phases {
            let run = weir_scenario::run_scenario(s);
            assert!(run.errors.is_empty(), "{}: {:?}", s.name, run.errors);
            for f in &run.flows {
                assert!(
                    f.passed,
                    "{}:{} {}: {}",
                    s.name, f.line, f.flow, f.explanation
                );
            }
            // Every phase keeps the same pods: the lab does not recreate them between phases.
            assert_eq!(s.endpoints, phases[0].endpoints);
        }
    }
}
