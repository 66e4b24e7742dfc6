//! The shared conformance suite (`weir-datapath-conformance`) run against the libbpf backend.

mod backend;

weir_datapath_conformance::suite!(backend::Libbpf);
