//! The pre-fold items an endpoint policy keeps for its incremental updates: every (key,
//! contribution) pair, per remote identity. Identities selected by exactly the same
//! contributions (a *class*: the pods of one app, say) have the same items up to the identity
//! in their keys, so a compile stores one run per class, with [`Identity::ANY`] in its keys,
//! and stamps the identity in when an update reads it. Identities an update has touched, and
//! those with items of their own (wildcard, synthesised, egress named-port entries), hold a
//! run of their own instead.

use std::collections::BTreeMap;
use std::sync::Arc;

use weir_identity::Identity;

use crate::compile::{IdMap, Item};
use crate::mapstate::PolicyKey;

/// Pre-fold items per remote identity; each run is sorted by key then contribution.
#[derive(Debug, Clone, Default)]
pub(crate) struct PreFold {
    /// Runs shared by a class of identities; their keys carry [`Identity::ANY`].
    classes: Vec<Arc<[Item]>>,
    /// The class of each identity that has no run of its own.
    class_of: IdMap<u32>,
    /// Runs of single identities (never also in `class_of`).
    own: BTreeMap<Identity, Vec<Item>>,
}

/// `item` with `id` as its key's identity.
fn stamp(item: &Item, id: Identity) -> Item {
    Item {
        key: PolicyKey {
            identity: id,
            ..item.key
        },
        ..*item
    }
}

impl PreFold {
    /// Items from class runs (keys with [`Identity::ANY`]) and their members, plus runs of
    /// single identities (already sorted). An identity is in at most one of the two.
    pub(crate) fn new(
        classes: Vec<Arc<[Item]>>,
        class_of: IdMap<u32>,
        own: BTreeMap<Identity, Vec<Item>>,
    ) -> Self {
        PreFold {
            classes,
            class_of,
            own,
        }
    }

    /// The class run of `id`, if it has no run of its own.
    fn class_run(&self, id: Identity) -> Option<&[Item]> {
        let c = self.class_of.get(&id)?;
        self.classes.get(*c as usize).map(|r| &r[..])
    }

    /// The whole run of `id` (empty if it has none).
    pub(crate) fn run(&self, id: Identity) -> Vec<Item> {
        if let Some(r) = self.own.get(&id) {
            return r.clone();
        }
        self.class_run(id)
            .map(|r| r.iter().map(|i| stamp(i, id)).collect())
            .unwrap_or_default()
    }

    /// The items of `key`, sorted by contribution.
    pub(crate) fn items_of(&self, key: &PolicyKey) -> Vec<Item> {
        let id = key.identity;
        let (run, probe): (&[Item], PolicyKey) = match self.own.get(&id) {
            Some(r) => (r, *key),
            None => match self.class_run(id) {
                Some(r) => (
                    r,
                    PolicyKey {
                        identity: Identity::ANY,
                        ..*key
                    },
                ),
                None => return Vec::new(),
            },
        };
        let lo = run.partition_point(|i| i.key < probe);
        let hi = run.partition_point(|i| i.key <= probe);
        run.get(lo..hi)
            .unwrap_or(&[])
            .iter()
            .map(|i| stamp(i, id))
            .collect()
    }

    /// Replaces the run of `id` (sorted by key then contribution; empty: none).
    pub(crate) fn set(&mut self, id: Identity, run: Vec<Item>) {
        self.class_of.remove(&id);
        if run.is_empty() {
            self.own.remove(&id);
        } else {
            self.own.insert(id, run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapstate::EntryAction;
    use weir_policy_model::Direction;

    fn item(id: u32, port: u16, rule: u32) -> Item {
        Item {
            key: PolicyKey::new(Identity(id), Direction::Ingress, 6, port, 24),
            rule,
            action: EntryAction::Allow,
        }
    }

    #[test]
    fn class_runs_read_as_stamped_and_own_runs_override() {
        let class: Arc<[Item]> = vec![item(0, 80, 1), item(0, 80, 3), item(0, 443, 2)].into();
        let class_of: IdMap<u32> = [(Identity(300), 0), (Identity(301), 0)]
            .into_iter()
            .collect();
        let mut p = PreFold::new(vec![class], class_of, BTreeMap::new());
        assert_eq!(
            p.run(Identity(300)),
            vec![item(300, 80, 1), item(300, 80, 3), item(300, 443, 2)]
        );
        assert_eq!(
            p.items_of(&item(301, 80, 0).key),
            vec![item(301, 80, 1), item(301, 80, 3)]
        );
        assert!(p.items_of(&item(302, 80, 0).key).is_empty());
        p.set(Identity(300), vec![item(300, 22, 5)]);
        assert_eq!(p.run(Identity(300)), vec![item(300, 22, 5)]);
        assert!(p.items_of(&item(300, 80, 0).key).is_empty());
        p.set(Identity(301), Vec::new());
        assert!(p.run(Identity(301)).is_empty());
    }
}
