//! Weir's kernel datapath in C on libbpf-rs. The TC programs (`bpf/weir.bpf.c`, compiled by
//! clang-19 through libbpf-cargo) make the same decisions as the Rust programs of
//! `weir-datapath-aya`, packet for packet: `weir_from_pod` on tc ingress of the host-side veth
//! (egress policy, remote = destination), `weir_to_pod` on tc egress (ingress policy, remote =
//! source). Both backends share the ABI (`weir-datapath-abi`, mirrored in `bpf/weir_abi.h` and
//! checked field by field), the key encoding (`weir_datapath::encode`) and one conformance
//! suite (`weir-datapath-conformance`).
//!
//! [`LibbpfDatapath`] loads the object with libbpf 1.7 (vendored by libbpf-sys), pins maps and
//! programs under a caller-given bpffs directory, and attaches per endpoint with clsact +
//! netlink filters (handle 1, priority 1) that outlive the process; a new process calling
//! [`LibbpfDatapath::load`] with the same directory reuses the pinned maps and replaces the
//! filters' programs with its own.

mod bytes;
mod loader;
pub mod replay;
mod testrun;

#[cfg(test)]
mod abi_check;

pub use loader::{LibbpfDatapath, LoadError};
pub use weir_datapath::testrun::{CtState, HookDirection, TestRunOutcome};

/// The compiled object, 8-aligned for libelf.
#[repr(C, align(8))]
pub(crate) struct Aligned<T: ?Sized>(pub T);

/// The compiled eBPF object, built by `build.rs`.
pub(crate) static EBPF_OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/weir.bpf.o")));

/// The same programs without the per-entry policy counters (benchmark baseline only).
pub(crate) static EBPF_OBJECT_NO_ENTRY_COUNTERS: &Aligned<[u8]> = &Aligned(*include_bytes!(
    concat!(env!("OUT_DIR"), "/weir-no-entry-counters.bpf.o")
));
