//! `weir connectivity test`: the built-in suite in a lab of its own (its own namespaces,
//! agent and directory), removed afterwards whatever happens.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use weir_lab::connectivity::{self, Check};
use weir_lab::{Lab, LabConfig};

/// The suite's namespace prefix: apart from `weir lab`'s, so both can be up at once.
const PREFIX: &str = "weirct-";
/// The suite's lab directory.
const DEFAULT_DIR: &str = "/run/weir-connectivity";

/// `weir connectivity ...`
#[derive(Subcommand)]
pub enum ConnectivityCommand {
    /// Create client, server and DNS pods in a private lab, apply a few policies and check
    /// real traffic for the expected verdicts (pod to pod, to world, to host, DNS, HTTP);
    /// exit 1 if any check fails. Everything is removed afterwards.
    Test {
        /// How long a probe waits before calling a flow dropped, in milliseconds.
        #[arg(long, default_value_t = 1500)]
        timeout_ms: u64,
        /// Leave the lab in place after the run (remove it with `weir connectivity clean`).
        #[arg(long)]
        keep: bool,
    },
    /// Remove what a crashed or `--keep` run left behind.
    Clean,
}

fn config() -> anyhow::Result<LabConfig> {
    let exe = std::env::current_exe().context("locating the weir binary")?;
    let bin_dir = exe.parent().unwrap_or(Path::new("."));
    let dir = std::env::var_os("WEIR_CONNECTIVITY_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from);
    let prefix = std::env::var("WEIR_CONNECTIVITY_PREFIX").unwrap_or_else(|_| PREFIX.into());
    Ok(LabConfig::new(&prefix, &dir, bin_dir))
}

/// Runs a `weir connectivity` subcommand.
pub fn run(cmd: ConnectivityCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let cfg = config()?;
    match cmd {
        ConnectivityCommand::Clean => {
            weir_lab::down(&cfg)?;
            println!("connectivity lab removed");
            Ok(ExitCode::SUCCESS)
        }
        ConnectivityCommand::Test { timeout_ms, keep } => {
            test(cfg, Duration::from_millis(timeout_ms), keep, json_out)
        }
    }
}

fn test(
    cfg: LabConfig,
    deadline: Duration,
    keep: bool,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    // A run that crashed earlier left its namespaces: clear them first.
    weir_lab::down(&cfg).context("removing a previous run's leftovers")?;
    if !json_out {
        println!(
            "connectivity test: lab in {} (namespaces {}*)",
            cfg.dir.display(),
            cfg.prefix
        );
    }
    // Dropping the lab tears it down, also when a phase fails midway.
    let mut lab = Lab::up(cfg)?;
    let mut checks: Vec<Check> = Vec::new();
    let result = connectivity::run(
        &mut lab,
        deadline,
        |phase| {
            if !json_out {
                println!();
                println!(
                    "== {}: {}",
                    phase.name,
                    phase.description.as_deref().unwrap_or("")
                );
            }
        },
        |c| {
            if !json_out {
                let result = match c.passed {
                    Some(true) => "PASS".to_string(),
                    Some(false) => "FAIL".to_string(),
                    None => format!("SKIP ({})", c.observed),
                };
                println!(
                    "  {:<6} {:<58} expected {:<22} observed {}",
                    result, c.flow, c.expected, c.observed
                );
            }
            checks.push(c.clone());
        },
    );
    if keep {
        lab.keep();
        if !json_out {
            println!("lab kept: weir connectivity clean removes it");
        }
    } else {
        lab.down()?;
    }
    let summary = result?;
    if json_out {
        let v: Vec<_> = checks
            .iter()
            .map(|c| {
                json!({
                    "phase": c.phase, "flow": c.flow, "expected": c.expected,
                    "observed": c.observed.to_string(), "passed": c.passed,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "checks": v, "passed": summary.passed, "failed": summary.failed,
                "skipped": summary.skipped,
            }))?
        );
    } else {
        println!();
        println!(
            "{} passed, {} failed, {} skipped",
            summary.passed, summary.failed, summary.skipped
        );
    }
    Ok(if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
