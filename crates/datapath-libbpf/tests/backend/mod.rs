//! The libbpf backend as a conformance-suite [`Backend`].

use std::path::Path;

use weir_datapath::DatapathError;
use weir_datapath_abi as abi;
use weir_datapath_conformance::{Backend, Hook, Outcome};
use weir_datapath_libbpf::LibbpfDatapath;

/// The libbpf backend (C programs).
pub struct Libbpf;

impl Backend for Libbpf {
    const NAME: &'static str = "libbpf";
    type Dp = LibbpfDatapath;

    fn load(pin_dir: &Path) -> Result<LibbpfDatapath, String> {
        LibbpfDatapath::load(pin_dir).map_err(|e| e.to_string())
    }

    fn register_ifindex(
        dp: &mut LibbpfDatapath,
        ifindex: u32,
        info: abi::EndpointInfo,
    ) -> Result<(), DatapathError> {
        dp.register_ifindex(ifindex, info)
    }

    fn unregister_ifindex(dp: &mut LibbpfDatapath, ifindex: u32) -> Result<(), DatapathError> {
        dp.unregister_ifindex(ifindex)
    }

    fn test_run(
        dp: &LibbpfDatapath,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<Outcome, DatapathError> {
        dp.test_run(hook, packet, repeat)
    }
}
