//! Weir's TC programs. Built only for the BPF target (see `program.rs`); for the host this is an
//! empty binary so that workspace-wide commands do not trip over `no_std`/`no_main`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has atomic add but no compare-and-swap, so `AtomicU64::fetch_add` does not
// exist there; the intrinsic compiles to the BPF atomic add instruction. The eBPF crate is
// built with nightly (aya-build) in any case.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
