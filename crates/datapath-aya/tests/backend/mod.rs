//! The aya backend as a conformance-suite [`Backend`].

use std::path::Path;

use weir_datapath::DatapathError;
use weir_datapath_abi as abi;
use weir_datapath_aya::AyaDatapath;
use weir_datapath_conformance::{Backend, Hook, Outcome};

/// The aya backend (Rust programs).
pub struct Aya;

impl Backend for Aya {
    const NAME: &'static str = "aya";
    type Dp = AyaDatapath;

    fn load(pin_dir: &Path) -> Result<AyaDatapath, String> {
        AyaDatapath::load(pin_dir).map_err(|e| e.to_string())
    }

    fn register_ifindex(
        dp: &mut AyaDatapath,
        ifindex: u32,
        info: abi::EndpointInfo,
    ) -> Result<(), DatapathError> {
        dp.register_ifindex(ifindex, info)
    }

    fn unregister_ifindex(dp: &mut AyaDatapath, ifindex: u32) -> Result<(), DatapathError> {
        dp.unregister_ifindex(ifindex)
    }

    fn test_run(
        dp: &AyaDatapath,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<Outcome, DatapathError> {
        dp.test_run(hook, packet, repeat)
    }
}
