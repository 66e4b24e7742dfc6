//! `weir policy test --datapath aya|libbpf`: every new connection of the scenarios as a real packet
//! through the loaded eBPF programs (BPF_PROG_TEST_RUN, on a private bpffs that is unmounted at
//! the end), compared with the expectation. The L7 part of a redirected flow (HTTP, DNS) is the
//! proxies' job and is checked offline; replies are conntrack's and are checked offline too.

use std::path::PathBuf;
use std::process::ExitCode;

use ipnet::IpNet;
use weir_datapath::Verdict;
use weir_datapath::replay::{KernelBackend, ReplayPacket, Replayer, kernel_expectation};
use weir_identity::Identity;
use weir_policy_compiler::MapState;
use weir_policy_model::Direction;
use weir_scenario::{DenyReason, Expect, KernelProbe, Outcome, ScenarioRun};

use super::DatapathChoice;

/// A new-connection packet (`ReplayPacket`'s fields).
#[derive(Clone, Copy)]
struct Packet {
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    protocol: u8,
    port: u16,
}

/// What `run_one` needs from a replayer, whichever backend it drives.
trait Replay {
    fn sync_ipcache(&mut self, entries: &[(IpNet, Identity)]) -> anyhow::Result<()>;
    fn sync_policy(&mut self, name: &str, map: &MapState) -> anyhow::Result<()>;
    /// The verdict the kernel gave and the one it had to give.
    fn run(
        &mut self,
        name: &str,
        identity: Identity,
        direction: Direction,
        packet: Packet,
        decided: Verdict,
    ) -> anyhow::Result<(Verdict, Verdict)>;
}

impl<D: KernelBackend> Replay for Replayer<D> {
    fn sync_ipcache(&mut self, entries: &[(IpNet, Identity)]) -> anyhow::Result<()> {
        Ok(Replayer::sync_ipcache(self, entries)?)
    }
    fn sync_policy(&mut self, name: &str, map: &MapState) -> anyhow::Result<()> {
        Replayer::sync_policy(self, name, map)?;
        Ok(())
    }
    fn run(
        &mut self,
        name: &str,
        identity: Identity,
        direction: Direction,
        p: Packet,
        decided: Verdict,
    ) -> anyhow::Result<(Verdict, Verdict)> {
        let packet = ReplayPacket {
            src: p.src,
            dst: p.dst,
            protocol: p.protocol,
            port: p.port,
        };
        let got = Replayer::run(self, name, identity, direction, &packet)?;
        let want = kernel_expectation(decided, direction, &packet);
        Ok((got.verdict, want))
    }
}

/// A fresh replayer of the chosen backend, or why this binary has none.
fn replayer(choice: DatapathChoice) -> anyhow::Result<Box<dyn Replay>> {
    match choice {
        #[cfg(feature = "aya")]
        DatapathChoice::Aya => Ok(Box::new(weir_datapath_aya::replay::Replayer::new()?)),
        #[cfg(feature = "libbpf")]
        DatapathChoice::Libbpf => Ok(Box::new(weir_datapath_libbpf::replay::Replayer::new()?)),
        other => anyhow::bail!(
            "this weir binary was built without the {} datapath (cargo feature `{}`)",
            backend_name(other),
            backend_name(other)
        ),
    }
}

fn backend_name(choice: DatapathChoice) -> &'static str {
    match choice {
        DatapathChoice::None => "none",
        DatapathChoice::Aya => "aya",
        DatapathChoice::Libbpf => "libbpf",
    }
}

/// Runs the scenarios through the kernel; prints one line per flow and the totals.
pub fn test(files: &[PathBuf], choice: DatapathChoice) -> anyhow::Result<ExitCode> {
    let mut passed = 0usize;
    let mut failed = 0usize;
    for f in files {
        let name = f.display().to_string();
        let scenario = match std::fs::read_to_string(f)
            .map_err(|e| vec![format!("{name}: {e}")])
            .and_then(|t| {
                weir_scenario::parse_scenario(&name, &t)
                    .map_err(|es| es.iter().map(ToString::to_string).collect())
            }) {
            Ok(s) => s,
            Err(errors) => {
                for e in errors {
                    println!("ERROR {e}");
                    failed += 1;
                }
                continue;
            }
        };
        // A fresh load per scenario: no policy or conntrack state carries over.
        let mut replayer = replayer(choice)?;
        let run = weir_scenario::run_scenario(&scenario);
        println!(
            "# {} ({}) through the {} datapath",
            run.name,
            run.file,
            backend_name(choice)
        );
        for e in &run.errors {
            println!("ERROR {e}");
        }
        failed += run.errors.len();
        let probes = match weir_scenario::kernel_probes(&scenario) {
            Ok(p) => p,
            Err(e) => {
                println!("ERROR {e}");
                failed += 1;
                continue;
            }
        };
        let (p, f) = run_one(replayer.as_mut(), &run, &probes)?;
        passed += p;
        failed += f;
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_one(
    r: &mut dyn Replay,
    run: &ScenarioRun,
    probes: &[KernelProbe],
) -> anyhow::Result<(usize, usize)> {
    let (mut passed, mut failed) = (0, 0);
    for flow in &run.flows {
        let expected = match (flow.expected, flow.expected_reason) {
            (Expect::Allow, _) => "allow".to_string(),
            (Expect::Deny, Some(why)) => format!("deny ({})", why.as_str()),
            (Expect::Deny, None) => "deny".to_string(),
        };
        let Some(probe) = probes.iter().find(|p| p.line == flow.line) else {
            // A reply: conntrack's business, checked offline.
            let ok = flow.passed;
            println!(
                "{} {}:{} {}: expected {expected}, got {} (reply, checked offline)",
                if ok { "PASS" } else { "FAIL" },
                run.file,
                flow.line,
                flow.flow,
                flow.actual
            );
            if ok {
                passed += 1
            } else {
                failed += 1
            }
            continue;
        };
        r.sync_ipcache(&probe.ipcache)?;
        let packet = Packet {
            src: probe.src,
            dst: probe.dst,
            protocol: probe.protocol,
            port: probe.port,
        };
        let mut notes = Vec::new();
        let mut kernel_agrees = true;
        let mut kernel_drop: Option<u8> = None;
        let mut redirected = false;
        for side in &probe.sides {
            r.sync_policy(&side.endpoint, &side.map_state)?;
            let decided: Verdict = side.expected.into();
            let (got, want) = r.run(
                &side.endpoint,
                side.identity,
                side.direction,
                packet,
                decided,
            )?;
            let agrees = got == want;
            kernel_agrees &= agrees;
            let dir = match side.direction {
                weir_policy_model::Direction::Egress => "egress",
                weir_policy_model::Direction::Ingress => "ingress",
            };
            let shown = match (decided, got) {
                (Verdict::Redirect { proxy_port }, Verdict::Drop { .. }) if agrees => {
                    format!("redirect to proxy port {proxy_port} (SYN to the proxy socket)")
                }
                (_, Verdict::Allow) => "forward".to_string(),
                (_, Verdict::Redirect { proxy_port }) => {
                    format!("redirect to proxy port {proxy_port}")
                }
                (_, Verdict::Drop { reason }) => format!("drop {reason}"),
            };
            notes.push(format!(
                "{dir} {}: {shown}{}",
                side.endpoint,
                if agrees {
                    String::new()
                } else {
                    format!(" (decide says {want:?})")
                }
            ));
            match decided {
                Verdict::Drop { reason } if agrees => {
                    kernel_drop.get_or_insert(reason);
                }
                Verdict::Redirect { .. } => redirected = true,
                _ => {}
            }
        }
        if probe.sides.is_empty() {
            notes.push("no local endpoint judges it".into());
        }
        // The flow's outcome at L3/L4 is the kernel's; past a redirect, the proxy's (offline).
        let actual = match kernel_drop {
            Some(reason) if reason == weir_policy_compiler::DROP_POLICY_DENY => {
                Outcome::Deny(DenyReason::PolicyDeny)
            }
            Some(_) => Outcome::Deny(DenyReason::PolicyDenied),
            None if redirected => {
                notes.push(format!("L7 checked offline: {}", flow.actual));
                flow.actual
            }
            None => Outcome::Allow,
        };
        let matches = match (flow.expected, actual) {
            (Expect::Allow, Outcome::Allow) => true,
            (Expect::Deny, Outcome::Deny(why)) => flow.expected_reason.is_none_or(|w| w == why),
            _ => false,
        };
        let ok = matches && kernel_agrees;
        println!(
            "{} {}:{} {}: expected {expected}, got {actual}: kernel {}",
            if ok { "PASS" } else { "FAIL" },
            run.file,
            flow.line,
            flow.flow,
            notes.join("; ")
        );
        if ok { passed += 1 } else { failed += 1 }
    }
    Ok((passed, failed))
}
