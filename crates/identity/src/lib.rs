//! Security identities for Weir, with Cilium's semantics.
//!
//! A workload's *identity* is the set of its identity-relevant [`Label`]s (see [`LabelFilter`]),
//! hash-consed to a small number ([`Identity`]) by an [`IdentityAllocator`]. Policies select
//! peers with [`IdentitySelector`]s; the [`SelectorCache`] keeps, for every selector in use, the
//! set of identities it selects.
//!
//! This crate is pure: no I/O, no async, no kernel.

mod allocator;
mod filter;
mod labels;
mod numeric;
mod selector;
mod selector_cache;
mod sources;

pub use allocator::{
    AllocError, Allocation, IdentityAllocator, InMemoryAllocator, Scope, reserved_identity_for,
};
pub use filter::{LabelFilter, LabelFilterError};
pub use labels::{Label, LabelError, LabelKey, LabelSet, LabelSource};
pub use numeric::{Identity, ReservedIdentity};
pub use selector::{Operator, Requirement, Selector, SelectorError};
pub use selector_cache::{
    IdentitySelector, SelectorCache, SelectorChange, SelectorId, identity_prefixes,
};
pub use sources::{
    CLUSTER_KEY, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_KEY, SERVICE_ACCOUNT_KEY, cidr_label_key,
    cidr_labels, fqdn_labels, parse_cidr_label_key, pod_identity_labels,
};
