//! What a `BPF_PROG_TEST_RUN` of Weir's programs reports, read the same way for every kernel
//! backend. The programs write their decision into the skb's control block (`cb[0]` = drop
//! reason | verdict << 8 | conntrack state << 16, `cb[1]` = remote identity), which the kernel
//! returns in `ctx_out`; each backend runs the program and hands the bytes to
//! [`TestRunOutcome::decode`].

use std::time::Duration;

use weir_datapath_abi as abi;
use weir_identity::Identity;

use crate::Verdict;

/// Size of `struct __sk_buff` on current kernels, and the offsets we read.
pub const SKB_CTX_LEN: usize = 192;
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

impl HookDirection {
    /// The name of the program this hook runs.
    pub fn program_name(self) -> &'static str {
        match self {
            HookDirection::FromPod => abi::program_name::FROM_POD,
            HookDirection::ToPod => abi::program_name::TO_POD,
            HookDirection::Empty => abi::program_name::EMPTY,
        }
    }
}

impl TestRunOutcome {
    /// Reads a run's outcome from the `ctx_out` the kernel returned ([`SKB_CTX_LEN`] bytes),
    /// the program's return value and the measured run time.
    pub fn decode(ctx_out: &[u8], tc_action: u32, duration: Duration) -> Self {
        let cb0 = read_u32(ctx_out, SKB_CB_OFFSET);
        let remote = read_u32(ctx_out, SKB_CB_OFFSET + 4);
        let reason = (cb0 & 0xff) as u8;
        let v = ((cb0 >> 8) & 0xff) as u8;
        let mark = read_u32(ctx_out, SKB_MARK_OFFSET);
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
        TestRunOutcome {
            tc_action,
            verdict,
            ct_state,
            remote_identity: Identity(remote),
            mark,
            duration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_control_block() {
        let mut ctx = [0u8; SKB_CTX_LEN];
        let cb0: u32 = 133 | (u32::from(abi::verdict::DROPPED) << 8);
        ctx[SKB_CB_OFFSET..SKB_CB_OFFSET + 4].copy_from_slice(&cb0.to_ne_bytes());
        ctx[SKB_CB_OFFSET + 4..SKB_CB_OFFSET + 8].copy_from_slice(&300u32.to_ne_bytes());
        let o = TestRunOutcome::decode(&ctx, 2, Duration::ZERO);
        assert_eq!(o.verdict, Verdict::Drop { reason: 133 });
        assert_eq!(o.remote_identity, Identity(300));
        assert_eq!(o.ct_state, None);
        // Short or empty buffers read as zeros: an unjudged pass.
        assert_eq!(
            TestRunOutcome::decode(&[], 0, Duration::ZERO).verdict,
            Verdict::Allow
        );
    }
}
