//! `weir lab ...`: a node, pods, a world and real traffic in private network namespaces.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use weir_lab::cluster::ClusterSpec;
use weir_lab::{Lab, LabConfig, Observed};
use weir_scenario::{Expect, Scenario};

/// Default lab directory.
const DEFAULT_DIR: &str = "/run/weir-lab";
/// Default namespace name prefix.
const DEFAULT_PREFIX: &str = "weirlab-";

/// `weir lab ...`
#[derive(Subcommand)]
pub enum LabCommand {
    /// Build the lab: node namespace with weir-agent, pods through weir-cni, a world, kube-dns.
    Up {
        /// Scenario file or directory, or `seed` (examples/seed).
        #[arg(long, default_value = "seed")]
        scenario: String,
    },
    /// List the lab's pods with namespace, labels, IP, identity and endpoint state.
    Ls,
    /// Run a command in a pod's network namespace (`node` and `world` work too).
    Exec {
        /// The pod.
        pod: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run the scenario's flows as real connections and compare with the expected verdicts.
    Traffic {
        /// Scenario file or directory, or `seed`; default: what `lab up` was given.
        #[arg(long)]
        scenario: Option<String>,
        /// How long a probe waits before calling a flow dropped, in milliseconds.
        #[arg(long, default_value_t = 1500)]
        timeout_ms: u64,
    },
    /// Remove everything the lab made (also after a crash).
    Down,
}

fn config() -> anyhow::Result<LabConfig> {
    let exe = std::env::current_exe().context("locating the weir binary")?;
    let bin_dir = exe.parent().unwrap_or(Path::new("."));
    let dir =
        std::env::var_os("WEIR_LAB_DIR").map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from);
    Ok(LabConfig::new(DEFAULT_PREFIX, &dir, bin_dir))
}

/// Finds `examples/seed` from the working directory or from the binary's checkout.
fn seed_dir() -> anyhow::Result<PathBuf> {
    let mut candidates = vec![PathBuf::from("examples/seed")];
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join("examples/seed"));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.is_dir())
        .context("examples/seed not found: run from the Weir checkout or pass --scenario FILE")
}

/// Reads a scenario file, a directory of them, or `seed`.
fn load(arg: &str) -> anyhow::Result<Vec<Scenario>> {
    let path = if arg == "seed" {
        seed_dir()?
    } else {
        PathBuf::from(arg)
    };
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))? {
            let p = e?.path();
            if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path);
    }
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.display().to_string();
        match weir_scenario::parse_scenario(&name, &text) {
            Ok(s) => out.push(s),
            Err(errors) => {
                for e in errors {
                    eprintln!("{e}");
                }
                bail!("{name} is not a valid scenario");
            }
        }
    }
    Ok(out)
}

/// The cluster `lab up` builds from a set of scenarios: their pods and policies together,
/// leaving out files that carry policies Cilium rejects (a variant of them is in the set).
fn up_cluster(scenarios: &[Scenario]) -> ClusterSpec {
    let usable: Vec<Scenario> = scenarios
        .iter()
        .filter(|s| s.rejected_policies.is_empty() || scenarios.len() == 1)
        .cloned()
        .collect();
    ClusterSpec::merged(&usable)
}

fn scenario_record(cfg: &LabConfig) -> PathBuf {
    cfg.dir.join("scenario.txt")
}

/// Runs a `weir lab` subcommand.
pub fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    let cfg = config()?;
    match cmd {
        LabCommand::Up { scenario } => up(cfg, &scenario),
        LabCommand::Ls => ls(cfg),
        LabCommand::Exec { pod, command } => exec(cfg, &pod, &command),
        LabCommand::Traffic {
            scenario,
            timeout_ms,
        } => traffic(cfg, scenario, Duration::from_millis(timeout_ms)),
        LabCommand::Down => {
            weir_lab::down(&cfg)?;
            println!("lab removed");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn up(cfg: LabConfig, arg: &str) -> anyhow::Result<ExitCode> {
    let scenarios = load(arg)?;
    let spec = up_cluster(&scenarios);
    println!(
        "starting the lab in {} (namespaces {}*)",
        cfg.dir.display(),
        cfg.prefix
    );
    let mut lab = Lab::up(cfg)?;
    std::fs::write(scenario_record(lab.config()), arg)?;
    let report = lab.apply(&spec)?;
    for s in &report.skipped {
        println!("  left out: {s}");
    }
    if let Some(e) = &report.policy_error {
        println!("  policy errors reported by the agent:\n{e}");
    }
    let mut times: Vec<Duration> = report.added.iter().map(|(_, d)| *d).collect();
    times.sort();
    if let (Some(min), Some(max)) = (times.first(), times.last()) {
        println!(
            "{} pods READY (CNI ADD to ready: {:.0}-{:.0} ms, concurrent ADDs)",
            times.len(),
            min.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0
        );
    }
    lab.keep();
    println!(
        "lab is up: weir lab ls | weir lab traffic | weir lab exec POD -- CMD | weir lab down"
    );
    Ok(ExitCode::SUCCESS)
}

fn ls(cfg: LabConfig) -> anyhow::Result<ExitCode> {
    let lab = Lab::open(cfg)?;
    let endpoints = lab.endpoints().unwrap_or_default();
    println!(
        "{:<14} {:<28} {:<12} {:>8} {:>8} {:<18} LABELS",
        "NAMESPACE", "POD", "IP", "IDENTITY", "ENDPOINT", "STATE"
    );
    for p in &lab.state().pods {
        let ep = endpoints.iter().find(|e| e.container_id == p.container_id);
        let state = ep
            .and_then(|e| weir_agent_api::v1::EndpointState::try_from(e.state).ok())
            .map_or("unknown".to_string(), |s| {
                s.as_str_name()
                    .trim_start_matches("ENDPOINT_STATE_")
                    .to_string()
            });
        let labels: Vec<String> = p
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<14} {:<28} {:<12} {:>8} {:>8} {:<18} {}",
            p.spec.namespace,
            p.spec.name,
            p.spec.ip.to_string(),
            ep.map_or("-".into(), |e| e.identity.to_string()),
            ep.map_or("-".into(), |e| e.endpoint_id.to_string()),
            state,
            labels.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn exec(cfg: LabConfig, pod: &str, command: &[String]) -> anyhow::Result<ExitCode> {
    let lab = Lab::open(cfg)?;
    let ns = match pod {
        "node" | "host" => lab.config().node_ns(),
        "world" => lab.config().world_ns(),
        _ => lab
            .pod(pod)
            .with_context(|| format!("no pod {pod:?} in the lab (weir lab ls)"))?
            .netns
            .clone(),
    };
    let Some((program, args)) = command.split_first() else {
        bail!("no command given");
    };
    let status = weir_lab::sys::nsenter(&ns, program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}

fn traffic(cfg: LabConfig, arg: Option<String>, deadline: Duration) -> anyhow::Result<ExitCode> {
    let mut lab = Lab::open(cfg)?;
    let up_arg =
        std::fs::read_to_string(scenario_record(lab.config())).unwrap_or_else(|_| "seed".into());
    let arg = arg.unwrap_or_else(|| up_arg.clone());
    let scenarios = load(&arg)?;
    // Keep the namespace labels of the whole set, so the agent is not restarted per file.
    let mut namespaces = up_cluster(&scenarios).namespaces;
    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    println!("{:<62} {:<7} {:<9} RESULT", "FLOW", "EXPECT", "OBSERVED");
    for s in &scenarios {
        let mut spec = ClusterSpec::from_scenario(s);
        for (k, v) in &spec.namespaces {
            namespaces.insert(k.clone(), v.clone());
        }
        spec.namespaces = namespaces.clone();
        let report = lab
            .apply(&spec)
            .with_context(|| format!("setting up {}", s.name))?;
        println!("== {} ({} pods)", s.name, spec.pods.len());
        if let Some(e) = report.policy_error {
            println!("   agent policy error: {e}");
        }
        for o in weir_lab::run_flows(&lab, s, deadline) {
            let expected = match o.expected {
                Expect::Allow => "allow",
                Expect::Deny => "deny",
            };
            let (observed, result) = match (&o.observed, o.passed()) {
                (Observed::Skipped(why), _) => {
                    skipped += 1;
                    ("-".to_string(), format!("SKIP ({why})"))
                }
                (obs, Some(true)) => {
                    passed += 1;
                    (obs.to_string(), "PASS".into())
                }
                (obs, _) => {
                    failed += 1;
                    (obs.to_string(), "FAIL".into())
                }
            };
            println!("{:<62} {:<7} {:<9} {result}", o.flow, expected, observed);
        }
    }
    // Back to the cluster `lab up` built, for poking around.
    if let Ok(up) = load(&up_arg) {
        lab.apply(&up_cluster(&up))?;
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
