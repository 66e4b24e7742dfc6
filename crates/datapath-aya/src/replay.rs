//! Replays new connections through the aya programs (`weir policy test --datapath aya`):
//! [`weir_datapath::replay`] on [`AyaDatapath`].

use std::path::Path;

use weir_datapath::DatapathError;
use weir_datapath::replay::KernelBackend;
use weir_datapath_abi as abi;

pub use weir_datapath::replay::{ReplayError, ReplayPacket, SideOutcome, kernel_expectation};

use crate::{AyaDatapath, HookDirection, TestRunOutcome};

/// Loaded aya programs on a private bpffs, with named endpoints whose maps can be replaced.
pub type Replayer = weir_datapath::replay::Replayer<AyaDatapath>;

impl KernelBackend for AyaDatapath {
    fn load_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        AyaDatapath::load(pin_dir).map_err(|e| DatapathError::backend("loading the programs", e))
    }

    fn register_ifindex(
        &mut self,
        ifindex: u32,
        info: abi::EndpointInfo,
    ) -> Result<(), DatapathError> {
        AyaDatapath::register_ifindex(self, ifindex, info)
    }

    fn test_run(
        &self,
        hook: HookDirection,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        AyaDatapath::test_run(self, hook, packet, repeat)
    }
}
