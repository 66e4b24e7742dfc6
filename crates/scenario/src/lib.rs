//! Scenario files for `weir policy test`: a small cluster, its policies, and flows with the
//! verdict each must get, evaluated offline with Cilium's semantics.

mod format;

pub use format::*;
