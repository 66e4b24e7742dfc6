//! BPF_PROG_TEST_RUN: run a packet through a loaded program and read what it decided.
//!
//! The program reports in the skb's control block (`cb[0]` = drop reason | verdict << 8 |
//! conntrack state << 16, `cb[1]` = remote identity), which the kernel returns in `ctx_out`.
//! Test runs see the loopback device (ifindex 1): register an endpoint for ifindex 1 with
//! [`LibbpfDatapath::register_ifindex`] first.

use std::time::Duration;

use libbpf_rs::ProgramInput;
use weir_datapath::{DatapathError, Verdict};
use weir_datapath_abi as abi;
use weir_identity::Identity;

use crate::LibbpfDatapath;

/// Size of `struct __sk_buff` on current kernels, and the offsets we read.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFFSET: usize = 8;
const SKB_CB_OFFSET: usize = 48;

/// Which program to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookDirection {
    /// `weir_from_pod`: the packet leaves the pod (egress policy).
    FromPod,
    /// `weir_to_pod`: the packet enters the pod (ingress policy).
    ToPod,
    /// `weir_empty`: returns at once (benchmark baseline).
    Empty,
}

/// Conntrack state the program saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtState {
    /// New: policy decided.
    New,
    /// Same direction as an existing entry.
    Established,
    /// Reply to an existing entry.
    Reply,
    /// A later fragment of an allowed datagram.
    Fragment,
    /// Passed without conntrack or policy (neighbour discovery).
    Untracked,
}

/// What one test run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The TC action returned (0 = OK, 2 = SHOT).
    pub tc_action: u32,
    /// The verdict.
    pub verdict: Verdict,
    /// Conntrack state, for forwarded packets.
    pub ct_state: Option<CtState>,
    /// The remote identity the ipcache gave (0 if the packet did not get that far).
    pub remote_identity: Identity,
    /// skb mark after the run.
    pub mark: u32,
    /// Kernel-measured average run time.
    pub duration: Duration,
}

fn read_u32(buf: &[u8], off: usize) -> u32 {
    buf.get(off..off + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_ne_bytes)
        .unwrap_or(0)
}

impl LibbpfDatapath {
    /// Runs `packet` (a full Ethernet frame) through a program `repeat` times (at least once).
    pub fn test_run(
        &self,
        hook: HookDirection,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        let name = match hook {
            HookDirection::FromPod => abi::program_name::FROM_POD,
            HookDirection::ToPod => abi::program_name::TO_POD,
            HookDirection::Empty => abi::program_name::EMPTY,
        };
        let prog = self.program(name)?;
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
        let cb0 = read_u32(&ctx_out, SKB_CB_OFFSET);
        let remote = read_u32(&ctx_out, SKB_CB_OFFSET + 4);
        let reason = (cb0 & 0xff) as u8;
        let v = ((cb0 >> 8) & 0xff) as u8;
        let mark = read_u32(&ctx_out, SKB_MARK_OFFSET);
        let verdict = match v {
            abi::verdict::DROPPED => Verdict::Drop { reason },
            abi::verdict::REDIRECTED => Verdict::Redirect {
                proxy_port: (mark >> 16) as u16,
            },
            // An unregistered ifindex leaves cb untouched: the packet passed unjudged.
            _ => Verdict::Allow,
        };
        let ct_state = if v == abi::verdict::DROPPED || v == 0 {
            None
        } else {
            match (cb0 >> 16) & 0xff {
                0 => Some(CtState::New),
                1 => Some(CtState::Established),
                2 => Some(CtState::Reply),
                3 => Some(CtState::Fragment),
                _ => Some(CtState::Untracked),
            }
        };
        Ok(TestRunOutcome {
            tc_action: return_value,
            verdict,
            ct_state,
            remote_identity: Identity(remote),
            mark,
            duration,
        })
    }
}
