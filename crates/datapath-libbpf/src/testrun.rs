//! BPF_PROG_TEST_RUN: run a packet through a loaded program and read what it decided (see
//! [`weir_datapath::testrun`]). Test runs see the loopback device (ifindex 1): register an
//! endpoint for ifindex 1 with [`LibbpfDatapath::register_ifindex`] first.

use libbpf_rs::ProgramInput;
use weir_datapath::DatapathError;
use weir_datapath::testrun::{HookDirection, SKB_CTX_LEN, TestRunOutcome};

use crate::LibbpfDatapath;

impl LibbpfDatapath {
    /// Runs `packet` (a full Ethernet frame) through a program `repeat` times (at least once).
    pub fn test_run(
        &self,
        hook: HookDirection,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        let prog = self.program(hook.program_name())?;
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut data_out = vec![0u8; packet.len() + 256];
        let input = ProgramInput {
            data_in: Some(packet),
            data_out: Some(&mut data_out),
            context_in: Some(&mut ctx_in),
            context_out: Some(&mut ctx_out),
            repeat: repeat.max(1),
            ..Default::default()
        };
        let res = prog
            .test_run(input)
            .map_err(|e| DatapathError::backend("test run", e))?;
        let (return_value, duration) = (res.return_value, res.duration);
        Ok(TestRunOutcome::decode(&ctx_out, return_value, duration))
    }
}
