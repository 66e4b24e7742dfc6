//! Compiles Weir's copies of Hubble's `flow/flow.proto` and `observer/observer.proto` with
//! protox (pure Rust) into prost messages and tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/flow/flow.proto", "proto/observer/observer.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
