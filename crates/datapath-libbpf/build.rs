//! Compiles `bpf/weir.bpf.c` with clang-19 through libbpf-cargo's skeleton builder (libbpf's
//! own headers come from libbpf-sys's vendored copy) into `OUT_DIR/weir.bpf.o`. The generated
//! skeleton is not used: its maps and programs borrow from caller-owned storage, while
//! `LibbpfDatapath` owns its `Object` for the life of the process. It also compiles
//! `bpf/abi_layout.c` for the host: it exports the C side's struct sizes, alignments and field
//! offsets, which the `abi_layout` test compares with the Rust ABI crate.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

fn main() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        panic!("OUT_DIR is not set");
    };
    // Debian ships only versioned clang binaries; libbpf-cargo would look for `clang`.
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang-19".into());
    // The UAPI headers' <asm/types.h> lives in the multiarch directory, which clang does not
    // search for the bpf target.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    let src = manifest.join("bpf/weir.bpf.c");
    // The object, and a variant without the per-entry policy counters: the verdict bench's
    // same-run baseline of what counting costs.
    for (obj, define) in [
        ("weir.bpf.o", None),
        (
            "weir-no-entry-counters.bpf.o",
            Some("-DWEIR_NO_ENTRY_COUNTERS"),
        ),
    ] {
        let mut args = vec![
            multiarch.as_str(),
            "-Wall",
            "-Werror",
            "-Wno-compare-distinct-pointer-types",
        ];
        args.extend(define);
        if let Err(e) = SkeletonBuilder::new()
            .source(&src)
            .obj(out.join(obj))
            .clang(&clang)
            .clang_args(args)
            .build()
        {
            panic!(
                "compiling {} with {clang} failed: {e:#}\n\
                 It needs clang-19 and the kernel UAPI headers (Debian: clang-19, linux-libc-dev, \
                 libelf-dev, zlib1g-dev, pkg-config); set CLANG to use another clang.",
                src.display()
            );
        }
    }
    cc::Build::new()
        .file(manifest.join("bpf/abi_layout.c"))
        .warnings_into_errors(true)
        .compile("weir_abi_layout");
    for f in ["bpf/weir.bpf.c", "bpf/weir_abi.h", "bpf/abi_layout.c"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
}
