//! A small YAML layer for strict parsers: a node tree with positions and a typed reader.
//!
//! [`parse_documents`] turns a multi-document stream into [`Node`]s (YAML 1.2 core schema,
//! duplicate keys rejected, hard [`Limits`] against hostile input). [`MapReader`] and [`Field`]
//! read that tree field by field, tracking paths such as `spec.ingress[0].toPorts[0]`, and
//! report every key nobody asked for as an "unknown field". Other parsers (scenario files,
//! configuration) reuse it.

mod reader;
mod tree;

pub use reader::{Field, MapReader, join_field};
pub use tree::{
    Limits, Node, NodeKind, Position, Scalar, ScalarType, YamlError, parse_documents,
    parse_documents_with_limits,
};
