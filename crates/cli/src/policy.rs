//! `weir policy validate` and `weir policy test`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};

/// `weir policy ...`
#[derive(Subcommand)]
pub enum PolicyCommand {
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
    },
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
        PolicyCommand::Test { scenarios, output } => test(&scenarios, output),
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

fn test(_scenarios: &[PathBuf], _output: Output) -> anyhow::Result<ExitCode> {
    anyhow::bail!("weir policy test: the scenario runner is not wired in yet")
}
