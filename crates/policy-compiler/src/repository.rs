//! The policy repository: every policy object the compiler knows, keyed by name.

use std::collections::BTreeMap;
use std::fmt;

use weir_identity::LabelSet;
use weir_policy_model::{Policy, PolicyName};

use crate::compile::{Prepared, prepare};

/// The repository's revision: it goes up by one on every change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A stored policy with its contributions prepared (see [`prepare`]): what a compile needs
/// of it that does not depend on the endpoint is built once, here.
#[derive(Debug, Clone)]
struct Stored {
    policy: Policy,
    prepared: Vec<Vec<Prepared>>,
}

/// Policy objects by name, with a revision counter.
#[derive(Debug, Clone, Default)]
pub struct PolicyRepository {
    policies: BTreeMap<PolicyName, Stored>,
    revision: Revision,
}

impl PolicyRepository {
    /// An empty repository at revision 0.
    pub fn new() -> Self {
        PolicyRepository::default()
    }

    /// Adds or replaces the policy with this name; returns the new revision.
    pub fn upsert(&mut self, policy: Policy) -> Revision {
        let prepared = prepare(&policy);
        self.policies
            .insert(policy.name.clone(), Stored { policy, prepared });
        self.bump()
    }

    /// Removes a policy; returns the new revision, or `None` (and no change) if it was absent.
    pub fn remove(&mut self, name: &PolicyName) -> Option<Revision> {
        self.policies.remove(name)?;
        Some(self.bump())
    }

    fn bump(&mut self) -> Revision {
        self.revision.0 += 1;
        self.revision
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The policy with this name.
    pub fn get(&self, name: &PolicyName) -> Option<&Policy> {
        self.policies.get(name).map(|s| &s.policy)
    }

    /// The policy with this name and its prepared contributions.
    pub(crate) fn get_prepared(&self, name: &PolicyName) -> Option<(&Policy, &[Vec<Prepared>])> {
        self.policies
            .get(name)
            .map(|s| (&s.policy, s.prepared.as_slice()))
    }

    /// All policies with their prepared contributions, in name order.
    pub(crate) fn iter_prepared(&self) -> impl Iterator<Item = (&Policy, &[Vec<Prepared>])> {
        self.policies
            .values()
            .map(|s| (&s.policy, s.prepared.as_slice()))
    }

    /// All policies in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values().map(|s| &s.policy)
    }

    /// The number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are no policies.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

/// Whether some rule of `policy` applies to an endpoint with these labels (so a change of the
/// policy needs that endpoint recompiled).
pub fn policy_selects(policy: &Policy, endpoint_labels: &LabelSet) -> bool {
    policy
        .rules
        .iter()
        .any(|r| r.subject.matches(endpoint_labels))
}
