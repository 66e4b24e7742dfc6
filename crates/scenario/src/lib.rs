//! Scenario files for `weir policy test`: a small cluster, its policies, and flows with the
//! verdict each must get, evaluated offline with Cilium's semantics.
//!
//! ```no_run
//! let text = std::fs::read_to_string("examples/seed/03-api-l7-policy.yaml").unwrap();
//! let scenario = weir_scenario::parse_scenario("03-api-l7-policy.yaml", &text).unwrap();
//! let run = weir_scenario::run_scenario(&scenario);
//! println!("{} passed, {} failed", run.passed(), run.failed());
//! ```

mod format;
mod kernel;
mod run;

pub use format::*;
pub use kernel::{
    HOST_V4, HOST_V6, KernelProbe, KernelProbeError, ProbeSide, REMOTE_NODE_V4, REMOTE_NODE_V6,
    kernel_probes,
};
pub use run::{FlowResult, Outcome, ScenarioRun, run_scenario};
