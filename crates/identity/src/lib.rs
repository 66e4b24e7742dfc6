//! Security identities for Weir, with Cilium's semantics.
//!
//! A workload's *identity* is the set of its identity-relevant [`Label`]s, hash-consed to a
//! small number ([`Identity`]). Policies select peers with [`Selector`]s over those labels; the
//! [`SelectorCache`] keeps, for every selector in use, the set of identities it selects.
//!
//! This crate is pure: no I/O, no async, no kernel.

mod labels;
mod numeric;
mod selector;

pub use labels::{Label, LabelError, LabelKey, LabelSet, LabelSource};
pub use numeric::{Identity, ReservedIdentity};
pub use selector::{Operator, Requirement, Selector, SelectorError};
