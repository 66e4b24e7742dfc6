//! Empty on purpose: the programs are the `weir-datapath-ebpf` binary, built for
//! `bpfel-unknown-none`. This library target only lets the loader crate build-depend on this
//! crate so that cargo rebuilds the loader when the programs change.
#![no_std]
