//! Cilium policy objects, parsed strictly and normalised.
//!
//! [`parse_policies`] reads a multi-document YAML stream (as `kubectl apply -f` takes it) of
//! `CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy` and `networking.k8s.io/v1`
//! `NetworkPolicy` objects and returns [`Policy`] values whose [`Rule`]s are *normalised*:
//! namespaces are injected into selectors the way Cilium does, Kubernetes NetworkPolicy is
//! translated to Cilium rules, and every field Weir does not support is an error, never ignored.
//! [`load_paths`] does the same for files and directories.
//!
//! Every error names the file, line, column and field path, e.g.
//! `api.yaml:14:11: spec.ingress[0].toPorts[0].ports[0].port: "80800" is not a port number or name`,
//! and one bad document rejects the whole file.

mod error;
mod load;
mod model;
mod parse;
pub mod yaml;

pub use error::{ParseError, ParseErrors};
pub use load::load_paths;
pub use model::*;
pub use parse::{parse_objects, parse_policies};
