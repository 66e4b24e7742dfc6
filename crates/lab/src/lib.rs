//! The Weir lab: a node network namespace running `weir-agent`, pods created through
//! `weir-cni` exactly as a container runtime would, a "world" namespace holding outside
//! addresses, kube-dns (dnsmasq) and real servers; and real traffic between them, checked
//! against a scenario's expected verdicts.
//!
//! Everything lives in network namespaces whose names start with the lab's prefix and in the
//! lab directory; the root namespace's networking is never changed.

pub mod cluster;
pub mod connectivity;
pub mod lab;
pub mod probe;
pub mod sys;

pub use cluster::{ClusterSpec, PodSpec};
pub use lab::{ApplyReport, Lab, LabConfig, down};
/// The signal type [`Lab::stop_agent`] takes.
pub use nix::sys::signal::Signal;
pub use probe::{FlowOutcome, Observed, run_flows};

use std::path::PathBuf;

/// Lab failures.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab needs root (namespaces, veths, bpffs).
    #[error("the lab needs root (network namespaces, veth pairs, a bpffs mount)")]
    NotRoot,
    /// A lab with this prefix is already up.
    #[error("a lab with prefix {0:?} is already up (weir lab down removes it)")]
    Exists(String),
    /// No lab is up.
    #[error("no lab is running (weir lab up starts one)")]
    NotRunning,
    /// A program the lab needs is missing.
    #[error("{0} is missing (build it: cargo build --release --bins)")]
    Missing(String),
    /// A command failed.
    #[error("{0}")]
    Command(String),
    /// File I/O failed.
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The agent failed or did not answer.
    #[error("agent: {0}")]
    Agent(String),
    /// The CNI plugin failed.
    #[error("weir-cni: {0}")]
    Cni(String),
}
