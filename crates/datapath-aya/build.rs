//! Builds the eBPF programs in `ebpf/` for the BPF target with aya-build (nightly + bpf-linker)
//! and leaves the object in `OUT_DIR/weir-datapath-ebpf`. There is no fallback object: without
//! the toolchain the build fails and says how to install it.

use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("ebpf");
    let Some(root) = root.to_str() else {
        panic!("the eBPF crate path is not UTF-8");
    };
    let package = aya_build::Package {
        name: "weir-datapath-ebpf",
        root_dir: root,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!(
            "building the eBPF programs failed: {e:#}\n\
             They need the nightly toolchain with rust-src and bpf-linker 0.13 (LLVM 22); \
             run `scripts/setup` to install them."
        );
    }
}
