//! Weir's TC programs. Built only for the BPF target (see `program.rs`); for the host this is an
//! empty binary so that workspace-wide commands do not trip over `no_std`/`no_main`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
