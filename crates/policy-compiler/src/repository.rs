//! The policy repository: every policy object the compiler knows, keyed by name.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use weir_identity::{LabelSet, Selector};
use weir_policy_model::{Peer, Policy, PolicyName};

use crate::compile::{Prepared, RuleSummary, prepare};
use crate::intern::Interner;

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
    /// Per rule: its subject's number (see [`PolicyRepository::subjects`]) and enforcement.
    summaries: Vec<RuleSummary>,
    /// The policy's name, shared with its contributions and the plans listing it.
    name: Arc<PolicyName>,
}

/// A stored policy as a compile reads it: the policy, its prepared contributions per rule and
/// a summary of each rule, and its name as its contributions share it.
pub(crate) type PreparedPolicy<'a> = (
    &'a Policy,
    &'a [Vec<Prepared>],
    &'a [RuleSummary],
    &'a Arc<PolicyName>,
);

impl Stored {
    fn read(&self) -> PreparedPolicy<'_> {
        (&self.policy, &self.prepared, &self.summaries, &self.name)
    }
}

/// Policy objects by name, with a revision counter.
#[derive(Debug, Clone, Default)]
pub struct PolicyRepository {
    policies: BTreeMap<PolicyName, Stored>,
    revision: Revision,
    /// Numbers of the distinct rule subjects.
    subjects: Interner<Selector>,
    /// Numbers of the distinct peers.
    peers: Interner<Peer>,
}

impl PolicyRepository {
    /// An empty repository at revision 0.
    pub fn new() -> Self {
        PolicyRepository::default()
    }

    /// Adds or replaces the policy with this name; returns the new revision.
    pub fn upsert(&mut self, policy: Policy) -> Revision {
        // Numbered before the old version is released, so what both share keeps its number.
        let name = Arc::new(policy.name.clone());
        let prepared = prepare(&policy, &name, &mut self.peers);
        let summaries = policy
            .rules
            .iter()
            .map(|r| RuleSummary::new(r, self.subjects.intern(&r.subject)))
            .collect();
        let old = self.policies.insert(
            policy.name.clone(),
            Stored {
                policy,
                prepared,
                summaries,
                name,
            },
        );
        if let Some(old) = old {
            self.release(&old);
        }
        self.bump()
    }

    /// Removes a policy; returns the new revision, or `None` (and no change) if it was absent.
    pub fn remove(&mut self, name: &PolicyName) -> Option<Revision> {
        let old = self.policies.remove(name)?;
        self.release(&old);
        Some(self.bump())
    }

    /// Releases the numbers a stored policy holds.
    fn release(&mut self, s: &Stored) {
        for r in &s.policy.rules {
            self.subjects.release(&r.subject);
        }
        for p in s.prepared.iter().flatten() {
            let c = match p {
                Prepared::Ready(c) => c,
                Prepared::IngressNamed { base, .. } => base,
            };
            for peer in c.peers.iter().flatten() {
                self.peers.release(peer);
            }
        }
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
    pub(crate) fn get_prepared(&self, name: &PolicyName) -> Option<PreparedPolicy<'_>> {
        self.policies.get(name).map(Stored::read)
    }

    /// All policies with their prepared contributions, in name order.
    pub(crate) fn iter_prepared(&self) -> impl Iterator<Item = PreparedPolicy<'_>> {
        self.policies.values().map(Stored::read)
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
