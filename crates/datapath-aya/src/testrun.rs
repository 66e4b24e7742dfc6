//! BPF_PROG_TEST_RUN: run a packet through a loaded program and read what it decided (see
//! [`weir_datapath::testrun`]). Test runs see the loopback device (ifindex 1): register an
//! endpoint for ifindex 1 with [`AyaDatapath::register_ifindex`] first.

use aya::programs::{TestRun, TestRunOptions};
use weir_datapath::DatapathError;
use weir_datapath::testrun::{HookDirection, SKB_CTX_LEN, TestRunOutcome};

use crate::AyaDatapath;

impl AyaDatapath {
    /// Runs `packet` (a full Ethernet frame) through a program `repeat` times (at least once).
    pub fn test_run(
        &self,
        hook: HookDirection,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        let prog = self.program(hook.program_name())?;
        let ctx_in = [0u8; SKB_CTX_LEN];
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut data_out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut data_out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            repeat: repeat.max(1),
            ..Default::default()
        };
        let res = prog
            .test_run(opts)
            .map_err(|e| DatapathError::backend("test run", e))?;
        Ok(TestRunOutcome::decode(
            &ctx_out,
            res.return_value,
            res.duration,
        ))
    }
}
