//! One conformance suite for every kernel datapath backend. The test bodies (table tests,
//! property tests, the scenario corpus, real traffic, redirect, restart, and the differential
//! test between two backends) are written once, generic over [`Backend`]; each backend crate
//! has a `tests/conformance.rs` that implements [`Backend`] on a marker type and expands
//! [`suite!`] for it.
//!
//! Kernel tests need root and kernel BTF; without them each test prints why and passes.
//! Every topology lives in network namespaces the test creates and removes (see [`lab`]), and
//! every pin on a bpffs the test mounts itself.

pub mod corpus;
pub mod differential;
pub mod lab;
pub mod prop;
pub mod restart;
pub mod support;
pub mod table;
pub mod traffic;
pub mod two_pods;

use std::path::Path;

use weir_datapath::DatapathError;
use weir_datapath::replay::KernelBackend;
use weir_datapath_abi as abi;

/// Test-run types shared by every backend: which program (`Hook`), the conntrack state and
/// the outcome (see `weir_datapath::testrun`).
pub use weir_datapath::testrun::{CtState, HookDirection as Hook, TestRunOutcome as Outcome};

/// A kernel datapath backend under test.
pub trait Backend {
    /// Name used in messages (`aya`, `libbpf`).
    const NAME: &'static str;
    /// The backend's datapath.
    type Dp: KernelBackend + Send;

    /// Loads the programs with maps pinned under `pin_dir` (reusing pins already there).
    fn load(pin_dir: &Path) -> Result<Self::Dp, String>;

    /// Records an endpoint for `ifindex` without attaching (test runs see ifindex 1).
    fn register_ifindex(
        dp: &mut Self::Dp,
        ifindex: u32,
        info: abi::EndpointInfo,
    ) -> Result<(), DatapathError>;

    /// Forgets the endpoint recorded for `ifindex`.
    fn unregister_ifindex(dp: &mut Self::Dp, ifindex: u32) -> Result<(), DatapathError>;

    /// Runs a full Ethernet frame through a program `repeat` times (BPF_PROG_TEST_RUN).
    fn test_run(
        dp: &Self::Dp,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<Outcome, DatapathError>;
}

/// Expands to the whole suite as `#[test]` functions for backend `$b` (a type implementing
/// [`Backend`]). `restart_child` is the helper process of `restart_keeps_enforcing`; it does
/// nothing when run on its own.
#[macro_export]
macro_rules! suite {
    ($b:ty) => {
        #[test]
        fn policy_table() {
            $crate::table::policy_table::<$b>()
        }
        #[test]
        fn conntrack_replies_and_established() {
            $crate::table::conntrack_replies_and_established::<$b>()
        }
        #[test]
        fn ipv6_extension_headers_and_fragments() {
            $crate::table::ipv6_extension_headers_and_fragments::<$b>()
        }
        #[test]
        fn malformed_packets_drop() {
            $crate::table::malformed_packets_drop::<$b>()
        }
        #[test]
        fn events_and_counters() {
            $crate::table::events_and_counters::<$b>()
        }
        #[test]
        fn policy_dump_round_trips() {
            $crate::table::policy_dump_round_trips::<$b>()
        }
        #[test]
        fn policy_entry_counters() {
            $crate::table::policy_entry_counters::<$b>()
        }
        #[test]
        fn failed_redirect_leaves_no_fragment_record() {
            $crate::table::failed_redirect_leaves_no_fragment_record::<$b>()
        }
        #[test]
        fn kernel_matches_oracle() {
            $crate::prop::kernel_matches_oracle::<$b>()
        }
        #[test]
        fn corpus_verdicts_equal_decide() {
            $crate::corpus::corpus_verdicts_equal_decide::<$b>()
        }
        #[test]
        fn enforces_real_traffic() {
            $crate::traffic::enforces_real_traffic::<$b>()
        }
        #[test]
        fn redirects_to_local_proxy() {
            $crate::traffic::redirects_to_local_proxy::<$b>()
        }
        #[test]
        fn ingress_redirect_hairpins_to_local_proxy() {
            $crate::traffic::ingress_redirect_hairpins_to_local_proxy::<$b>()
        }
        #[test]
        fn restart_child() {
            $crate::restart::restart_child::<$b>()
        }
        #[test]
        fn restart_keeps_enforcing() {
            $crate::restart::restart_keeps_enforcing::<$b>("restart_child")
        }
    };
}
