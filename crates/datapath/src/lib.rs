//! The datapath seam. The agent drives a [`Datapath`]: it attaches endpoints, applies compiled
//! policy ([`MapStateDiff`]), keeps the ipcache, and reads verdict events, conntrack and
//! counters. Backends: `weir-datapath-aya` (kernel), [`FakeDatapath`] (memory, for upper-layer
//! unit tests only).
//!
//! [`encode`] holds the translation between compiler types and the kernel ABI, shared by every
//! kernel backend; [`expected_verdict`] is the verdict a backend must give (the compiler's
//! `decide`).

pub mod batch;
pub mod encode;
mod fake;
mod oracle;
pub mod packet;
pub mod policy_flags;
pub mod replay;
pub mod testrun;
mod types;

pub use fake::FakeDatapath;
pub use oracle::{expected_verdict, test_run_verdict};
pub use types::*;
pub use weir_policy_compiler::Flow;

use ipnet::IpNet;
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapStateDiff, PolicyKey};

use std::collections::BTreeMap;

/// What the agent needs from a datapath backend.
pub trait Datapath {
    /// Starts enforcing on an endpoint: records it and attaches the programs to its host-side
    /// interface. Idempotent: attaching an already attached endpoint updates its identity.
    fn attach_endpoint(&mut self, endpoint: &EndpointAttachment) -> Result<(), DatapathError>;

    /// Stops enforcing on an endpoint and removes its policy entries.
    fn detach_endpoint(&mut self, endpoint: &EndpointAttachment) -> Result<(), DatapathError>;

    /// Applies a policy change to an endpoint's entries: upserts first, then removals, so every
    /// packet sees either the old or the new decision.
    fn apply_policy_diff(
        &mut self,
        endpoint: EndpointId,
        diff: &MapStateDiff,
    ) -> Result<(), DatapathError>;

    /// Maps a prefix to an identity (longest prefix wins; unknown addresses are world).
    fn upsert_ipcache(&mut self, prefix: IpNet, identity: Identity) -> Result<(), DatapathError>;

    /// Removes an ipcache prefix.
    fn remove_ipcache(&mut self, prefix: IpNet) -> Result<(), DatapathError>;

    /// The policy entries installed for an endpoint.
    fn dump_policy(
        &self,
        endpoint: EndpointId,
    ) -> Result<BTreeMap<PolicyKey, EntryAction>, DatapathError>;

    /// The policy entries installed for an endpoint, with the packet and byte counters of the
    /// packets each one decided (see [`InstalledPolicyEntry`]). Backends that keep no
    /// counters report zero.
    fn dump_policy_entries(
        &self,
        endpoint: EndpointId,
    ) -> Result<BTreeMap<PolicyKey, InstalledPolicyEntry>, DatapathError> {
        Ok(self
            .dump_policy(endpoint)?
            .into_iter()
            .map(|(k, action)| {
                (
                    k,
                    InstalledPolicyEntry {
                        action,
                        packets: 0,
                        bytes: 0,
                    },
                )
            })
            .collect())
    }

    /// All ipcache entries.
    fn list_ipcache(&self) -> Result<Vec<(IpNet, Identity)>, DatapathError>;

    /// All conntrack entries.
    fn list_conntrack(&self) -> Result<Vec<CtRecord>, DatapathError>;

    /// Deletes expired conntrack entries; returns how many were deleted.
    fn gc_conntrack(&mut self) -> Result<usize, DatapathError>;

    /// Takes the verdict events produced since the last call (never blocks).
    fn drain_events(&mut self) -> Result<Vec<DatapathEvent>, DatapathError>;

    /// Packet counters summed over CPUs.
    fn counters(&self) -> Result<Counters, DatapathError>;
}
