//! `weir policy validate` and `weir policy test` (offline); `import`, `delete` and `get` ask
//! the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};

pub(crate) mod agent;
mod kernel;

/// `weir policy ...`
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// The policies the running agent enforces, by file, with rejected files' errors.
    Get,
    /// Validate policy files whole and have the agent enforce them (persisted in its policy
    /// directory); on any error nothing changes and every error is printed (exit 1).
    Import {
        /// Files or directories (.yaml, .yml, .json, recursively); `-` reads standard input.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Delete one policy from the agent (and from its policy directory).
    Delete {
        /// `NAMESPACE/NAME`, or `NAME` for a cluster-wide policy.
        name: String,
        /// The kind, when a name is used by several (`CiliumNetworkPolicy`, `cnp`,
        /// `CiliumClusterwideNetworkPolicy`, `ccnp`, `NetworkPolicy`, `netpol`).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Parse and check policy files or directories; print every error (exit 1 on any).
    Validate {
        /// Files or directories (read recursively: .yaml, .yml, .json).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run scenario files: one line per flow, then `N passed, M failed`.
    Test {
        /// Scenario files or directories.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Also run every L3/L4 flow as a real packet through a kernel datapath
        /// (`aya`: the Rust eBPF programs, `libbpf`: the C ones, each with BPF_PROG_TEST_RUN;
        /// needs root and a binary built with that backend; text output).
        #[arg(long, value_enum, default_value_t = DatapathChoice::None)]
        datapath: DatapathChoice,
    },
}

/// Where `weir policy test` judges flows.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatapathChoice {
    /// Offline only: the compiler's decision and the L7 matchers.
    None,
    /// Also the Rust eBPF programs (aya), through BPF_PROG_TEST_RUN on a private bpffs.
    Aya,
    /// Also the C eBPF programs (libbpf), through BPF_PROG_TEST_RUN on a private bpffs.
    Libbpf,
}

/// How results are printed.
#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    /// One line per flow.
    Text,
    /// One JSON document.
    Json,
}

/// Runs a `weir policy` subcommand.
pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Validate { paths } => validate(&paths),
        PolicyCommand::Test {
            scenarios,
            output,
            datapath: DatapathChoice::None,
        } => test(&scenarios, output),
        PolicyCommand::Test {
            scenarios,
            output,
            datapath,
        } => {
            if matches!(output, Output::Json) {
                anyhow::bail!("--datapath prints text only; drop --output json");
            }
            kernel::test(&scenario_files(&scenarios)?, datapath)
        }
        PolicyCommand::Get | PolicyCommand::Import { .. } | PolicyCommand::Delete { .. } => {
            anyhow::bail!("this `weir policy` command asks the agent; handled in main")
        }
    }
}

fn validate(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    match weir_policy_model::load_paths(paths) {
        Ok(policies) => {
            for p in &policies {
                println!(
                    "ok  {} {} ({} rule{})",
                    p.name.kind.as_str(),
                    p.name,
                    p.rules.len(),
                    if p.rules.len() == 1 { "" } else { "s" }
                );
            }
            println!("{} policies valid", policies.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            println!(
                "{} error{}",
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn test(paths: &[PathBuf], output: Output) -> anyhow::Result<ExitCode> {
    let files = scenario_files(paths)?;
    let mut runs = Vec::new();
    let mut broken = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                broken.push(format!("{name}: {e}"));
                continue;
            }
        };
        match weir_scenario::parse_scenario(&name, &text) {
            Ok(s) => runs.push(weir_scenario::run_scenario(&s)),
            Err(errors) => broken.extend(errors.iter().map(ToString::to_string)),
        }
    }
    let passed: usize = runs.iter().map(|r| r.passed()).sum();
    let failed: usize = runs.iter().map(|r| r.failed()).sum::<usize>() + broken.len();
    match output {
        Output::Text => print_text(&runs, &broken),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&runs, &broken, passed, failed))?
        ),
    }
    if matches!(output, Output::Text) {
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Files named directly, and the `.yaml`/`.yml` files of directories (not recursive), sorted.
pub(crate) fn scenario_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                })
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn print_text(runs: &[weir_scenario::ScenarioRun], broken: &[String]) {
    for e in broken {
        println!("ERROR {e}");
    }
    for run in runs {
        println!("# {} ({})", run.name, run.file);
        for e in &run.errors {
            println!("ERROR {e}");
        }
        for r in &run.rejected {
            println!("      {r}");
        }
        for f in &run.flows {
            let expected = match (f.expected, f.expected_reason) {
                (weir_scenario::Expect::Allow, _) => "allow".to_string(),
                (weir_scenario::Expect::Deny, Some(r)) => format!("deny ({})", r.as_str()),
                (weir_scenario::Expect::Deny, None) => "deny".to_string(),
            };
            println!(
                "{} {}:{} {}: expected {expected}, got {}: {}",
                if f.passed { "PASS" } else { "FAIL" },
                run.file,
                f.line,
                f.flow,
                f.actual,
                f.explanation
            );
        }
    }
}

fn to_json(
    runs: &[weir_scenario::ScenarioRun],
    broken: &[String],
    passed: usize,
    failed: usize,
) -> serde_json::Value {
    use serde_json::json;
    let scenarios: Vec<_> = runs
        .iter()
        .map(|run| {
            json!({
                "name": run.name,
                "file": run.file,
                "errors": run.errors,
                "rejected": run.rejected,
                "flows": run.flows.iter().map(|f| json!({
                    "line": f.line,
                    "flow": f.flow,
                    "expected": match f.expected { weir_scenario::Expect::Allow => "allow", weir_scenario::Expect::Deny => "deny" },
                    "expected_reason": f.expected_reason.map(|r| r.as_str()),
                    "actual": match f.actual { weir_scenario::Outcome::Allow => "allow", weir_scenario::Outcome::Deny(_) => "deny" },
                    "actual_reason": match f.actual { weir_scenario::Outcome::Allow => None, weir_scenario::Outcome::Deny(r) => Some(r.as_str()) },
                    "explanation": f.explanation,
                    "passed": f.passed,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "scenarios": scenarios, "errors": broken, "passed": passed, "failed": failed })
}
