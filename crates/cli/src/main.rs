//! `weir`: the command-line front end.

mod lab;
mod policy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Identity-based network policy for Kubernetes, in eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate and test policies offline.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// A node, pods, a world and real traffic in private network namespaces.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Print the version and the datapath backend this binary carries.
    Version,
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`weir policy test ... | head`) instead of panicking on a broken pipe.
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Lab(cmd) => lab::run(cmd),
        Command::Version => {
            println!("weir {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weir: {e:#}");
            ExitCode::from(2)
        }
    }
}
