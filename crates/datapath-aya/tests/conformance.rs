//! The shared conformance suite (`weir-datapath-conformance`) run against the aya backend.

mod backend;

weir_datapath_conformance::suite!(backend::Aya);
