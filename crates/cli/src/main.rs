//! `weir`: the command-line front end.

mod connectivity;
mod inspect;
mod lab;
mod observe;
mod policy;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Identity-based network policy for Kubernetes, in eBPF"
)]
struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, default_value = weir_agent_api::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// Print JSON instead of tables (commands that ask the agent).
    #[arg(long = "json", global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate and test policies offline; show, import and delete the agent's policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The agent's health, datapath backend, endpoints, policy revision and errors.
    Status,
    /// Endpoints the agent manages.
    #[command(subcommand)]
    Endpoint(inspect::ListOnly),
    /// Security identities.
    #[command(subcommand)]
    Identity(inspect::ListOnly),
    /// What the kernel holds: policy maps, ipcache, conntrack.
    #[command(subcommand)]
    Bpf(inspect::BpfCommand),
    /// What the DNS proxy learned (`weir fqdn cache list`).
    #[command(subcommand)]
    Fqdn(inspect::FqdnCommand),
    /// A node, pods, a world and real traffic in private network namespaces.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Flows from the agent's Observer (Hubble) API: verdicts, drop reasons and the policy
    /// rules behind them.
    Observe(Box<observe::ObserveArgs>),
    /// The built-in connectivity suite, on real traffic in a private lab.
    #[command(subcommand)]
    Connectivity(connectivity::ConnectivityCommand),
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
        Command::Policy(policy::PolicyCommand::Get) => {
            inspect::run(inspect::Query::Policies, &cli.socket, cli.json)
        }
        Command::Policy(policy::PolicyCommand::Import { paths }) => {
            policy::agent::import(&paths, &cli.socket, cli.json)
        }
        Command::Policy(policy::PolicyCommand::Delete { name, kind }) => {
            policy::agent::delete(&name, kind.as_deref(), &cli.socket, cli.json)
        }
        Command::Policy(cmd) => policy::run(cmd),
        Command::Status => inspect::run(inspect::Query::Status, &cli.socket, cli.json),
        Command::Endpoint(inspect::ListOnly::List) => {
            inspect::run(inspect::Query::Endpoints, &cli.socket, cli.json)
        }
        Command::Identity(inspect::ListOnly::List) => {
            inspect::run(inspect::Query::Identities, &cli.socket, cli.json)
        }
        Command::Bpf(b) => inspect::run(inspect::Query::Bpf(b), &cli.socket, cli.json),
        Command::Fqdn(f) => inspect::run(inspect::Query::Fqdn(f), &cli.socket, cli.json),
        Command::Lab(cmd) => lab::run(cmd),
        Command::Observe(args) => observe::run(&args),
        Command::Connectivity(cmd) => connectivity::run(cmd, cli.json),
        Command::Version => {
            let backends: Vec<&str> = [
                ("aya", cfg!(feature = "aya")),
                ("libbpf", cfg!(feature = "libbpf")),
            ]
            .into_iter()
            .filter_map(|(n, on)| on.then_some(n))
            .collect();
            println!(
                "weir {} (datapath backends: {})",
                env!("CARGO_PKG_VERSION"),
                if backends.is_empty() {
                    "none".to_string()
                } else {
                    backends.join(", ")
                }
            );
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
