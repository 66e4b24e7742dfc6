//! Which contributions a new identity can possibly be selected by: an index from label
//! (key, value) and label key to the contributions whose peers require such a label, so that
//! an identity update tests only those instead of every contribution. Entries are hashes
//! (no copied strings); a collision only adds a candidate, which the exact test then drops.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use weir_identity::{Identity, LabelSet, Operator};
use weir_policy_model::{Entity, Peer};

use crate::compile::IdHasher;
use crate::peers::{CLUSTER_LABEL_KEY, fqdn_label};

fn hash_kv(key: &str, value: &str) -> u64 {
    let mut h = IdHasher::default();
    0u8.hash(&mut h);
    key.hash(&mut h);
    value.hash(&mut h);
    h.finish()
}

fn hash_key(key: &str) -> u64 {
    let mut h = IdHasher::default();
    1u8.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

/// Label hashes a peer needs (one of them) to select a non-reserved identity; `None` when the
/// peer cannot be narrowed that way (it is then tested for every identity).
fn needs(peer: &Peer, cluster_name: &str) -> Option<Vec<u64>> {
    match peer {
        Peer::Endpoints(sel) => {
            let reqs = sel.requirements();
            if let Some(r) = reqs
                .iter()
                .find(|r| r.operator == Operator::In && !r.values.is_empty())
            {
                return Some(r.values.iter().map(|v| hash_kv(&r.key.key, v)).collect());
            }
            reqs.iter()
                .find(|r| r.operator == Operator::Exists)
                .map(|r| vec![hash_key(&r.key.key)])
        }
        Peer::Entity(Entity::World | Entity::WorldIpv4 | Entity::WorldIpv6) | Peer::Cidr { .. } => {
            Some(vec![hash_kv("world", "")])
        }
        Peer::Entity(Entity::Cluster) => Some(vec![hash_kv(CLUSTER_LABEL_KEY, cluster_name)]),
        // Only reserved identities (or none): non-reserved ones never match.
        Peer::Entity(_) => Some(Vec::new()),
        Peer::Fqdn(rule) => {
            let l = fqdn_label(rule);
            Some(vec![hash_kv(&l.key, &l.value)])
        }
    }
}

/// The label hashes of peers by the repository's number of the peer, for one round of
/// [`PeerIndex::add_numbered`] calls (many contributions share their peers).
#[derive(Default)]
pub(crate) struct NeedsCache(
    HashMap<u64, Option<Vec<u64>>, std::hash::BuildHasherDefault<IdHasher>>,
);

/// Contribution slots by the labels their peers need.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerIndex {
    /// The keys are hashes already: mixed once more, cheaply.
    by_hash: HashMap<u64, Vec<u32>, std::hash::BuildHasherDefault<IdHasher>>,
    always: Vec<u32>,
}

impl PeerIndex {
    /// Indexes the slot of a contribution with these peers (`None`: wildcard, not indexed:
    /// it yields wildcard keys, not per-identity ones).
    pub(crate) fn add(&mut self, slot: u32, peers: Option<&[Peer]>, cluster_name: &str) {
        self.add_numbered(slot, peers, &[], cluster_name, &mut NeedsCache::default());
    }

    /// [`PeerIndex::add`], with the repository's numbers of the peers (`ids`, parallel to
    /// `peers`) to look their label hashes up in `cache` rather than hash the labels again.
    pub(crate) fn add_numbered(
        &mut self,
        slot: u32,
        peers: Option<&[Peer]>,
        ids: &[u64],
        cluster_name: &str,
        cache: &mut NeedsCache,
    ) {
        let Some(peers) = peers else { return };
        let mut hashes = Vec::new();
        for (i, p) in peers.iter().enumerate() {
            let needed = match ids.get(i) {
                Some(id) => cache
                    .0
                    .entry(*id)
                    .or_insert_with(|| needs(p, cluster_name))
                    .as_deref(),
                None => {
                    let n = needs(p, cluster_name);
                    hashes.extend(n.iter().flatten());
                    if n.is_some() {
                        continue;
                    }
                    None
                }
            };
            match needed {
                Some(h) => hashes.extend_from_slice(h),
                None => {
                    self.always.push(slot);
                    return;
                }
            }
        }
        hashes.sort_unstable();
        hashes.dedup();
        for h in hashes {
            self.by_hash.entry(h).or_default().push(slot);
        }
    }

    /// Forgets the slot of a contribution with these peers (as given to [`PeerIndex::add`]).
    pub(crate) fn remove(&mut self, slot: u32, peers: Option<&[Peer]>, cluster_name: &str) {
        let Some(peers) = peers else { return };
        for p in peers {
            match needs(p, cluster_name) {
                Some(hs) => {
                    for h in hs {
                        if let Some(v) = self.by_hash.get_mut(&h) {
                            v.retain(|s| *s != slot);
                            if v.is_empty() {
                                self.by_hash.remove(&h);
                            }
                        }
                    }
                }
                None => self.always.retain(|s| *s != slot),
            }
        }
    }

    /// The slots that may select `id` with `labels`, sorted; `None` means every slot (reserved
    /// identities, which entities select by number).
    pub(crate) fn candidates(&self, id: Identity, labels: &LabelSet) -> Option<Vec<u32>> {
        if id.is_reserved() {
            return None;
        }
        let mut out = self.always.clone();
        for l in labels.iter() {
            for h in [hash_kv(&l.key, &l.value), hash_key(&l.key)] {
                if let Some(v) = self.by_hash.get(&h) {
                    out.extend_from_slice(v);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Some(out)
    }
}
