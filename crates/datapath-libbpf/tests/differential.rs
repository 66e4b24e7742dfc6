//! The two backends side by side: random policies and packet histories through the C programs
//! (libbpf) and the Rust programs (aya) must give identical outcomes, events and counters.

#[path = "../../datapath-aya/tests/backend/mod.rs"]
mod aya_backend;
mod backend;

#[test]
fn libbpf_and_aya_agree() {
    weir_datapath_conformance::differential::backends_agree::<aya_backend::Aya, backend::Libbpf>(
        256,
    );
}
