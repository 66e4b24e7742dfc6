//! The identities the compiler knows: numeric identity → labels and named ports, with an
//! inverted index so a selector is evaluated only against identities that can match it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;
use weir_identity::{Identity, Label, LabelSet, LabelSource, Operator, ReservedIdentity, Selector};

/// Named ports of a workload: name → (IP protocol number, port). Names are lower-case, as the
/// policy model stores them.
pub type NamedPorts = BTreeMap<String, (u8, u16)>;

/// What the compiler knows about one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityInfo {
    /// The identity's labels.
    pub labels: LabelSet,
    /// Named ports of the workloads with this identity (for egress named-port resolution).
    pub named_ports: NamedPorts,
    /// For CIDR identities: the most specific `cidr:` prefix among the labels.
    pub(crate) prefix: Option<IpNet>,
}

/// Identity → labels table with the indexes the peer evaluator needs. The reserved
/// identities 1–10 are always present and cannot be removed.
#[derive(Debug, Clone)]
pub struct IdentityTable {
    ids: BTreeMap<Identity, IdentityInfo>,
    /// Label key (without source) → identities with a label of that key.
    by_key: HashMap<String, BTreeSet<Identity>>,
    /// (label key, value) → identities with such a label (any source).
    by_key_value: HashMap<(String, String), BTreeSet<Identity>>,
}

impl Default for IdentityTable {
    fn default() -> Self {
        IdentityTable::new()
    }
}

/// Parses the key of a `cidr:` label; Cilium writes IPv6 colons as dashes.
fn parse_cidr_label(key: &str) -> Option<IpNet> {
    key.parse::<IpNet>()
        .ok()
        .or_else(|| key.replace('-', ":").parse::<IpNet>().ok())
        .map(|n| n.trunc())
}

impl IdentityTable {
    /// A table holding only the reserved identities.
    pub fn new() -> Self {
        let mut t = IdentityTable {
            ids: BTreeMap::new(),
            by_key: HashMap::new(),
            by_key_value: HashMap::new(),
        };
        for r in ReservedIdentity::ALL {
            t.insert_raw(Identity::from(r), r.labels(), NamedPorts::new());
        }
        t
    }

    fn insert_raw(&mut self, id: Identity, labels: LabelSet, named_ports: NamedPorts) {
        let prefix = labels
            .iter()
            .filter(|l| l.source == LabelSource::Cidr)
            .filter_map(|l| parse_cidr_label(&l.key))
            .max_by_key(|n| n.prefix_len());
        for l in labels.iter() {
            self.by_key.entry(l.key.clone()).or_default().insert(id);
            self.by_key_value
                .entry((l.key.clone(), l.value.clone()))
                .or_default()
                .insert(id);
        }
        self.ids.insert(
            id,
            IdentityInfo {
                labels,
                named_ports,
                prefix,
            },
        );
    }

    fn remove_raw(&mut self, id: Identity) -> Option<IdentityInfo> {
        let info = self.ids.remove(&id)?;
        for l in info.labels.iter() {
            if let Some(s) = self.by_key.get_mut(&l.key) {
                s.remove(&id);
                if s.is_empty() {
                    self.by_key.remove(&l.key);
                }
            }
            let kv = (l.key.clone(), l.value.clone());
            if let Some(s) = self.by_key_value.get_mut(&kv) {
                s.remove(&id);
                if s.is_empty() {
                    self.by_key_value.remove(&kv);
                }
            }
        }
        Some(info)
    }

    /// Adds or replaces an identity. Reserved identities keep their fixed labels; only their
    /// named ports can be set.
    pub fn upsert(&mut self, id: Identity, labels: LabelSet, named_ports: NamedPorts) {
        let labels = match ReservedIdentity::from_identity(id) {
            Some(r) => r.labels(),
            None => labels,
        };
        self.remove_raw(id);
        self.insert_raw(id, labels, named_ports);
    }

    /// Removes an identity; reserved identities and [`Identity::ANY`] are never removed.
    pub fn remove(&mut self, id: Identity) -> bool {
        if id.is_reserved() {
            return false;
        }
        self.remove_raw(id).is_some()
    }

    /// What is known about `id`.
    pub fn get(&self, id: Identity) -> Option<&IdentityInfo> {
        self.ids.get(&id)
    }

    /// All identities in numeric order.
    pub fn iter(&self) -> impl Iterator<Item = (Identity, &IdentityInfo)> {
        self.ids.iter().map(|(i, info)| (*i, info))
    }

    /// The number of identities, reserved ones included.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false: the reserved identities are always there.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Identities holding exactly this label.
    pub(crate) fn with_label(&self, label: &Label) -> impl Iterator<Item = Identity> + '_ {
        let set = self
            .by_key_value
            .get(&(label.key.clone(), label.value.clone()));
        let label = label.clone();
        set.into_iter()
            .flatten()
            .copied()
            .filter(move |id| self.ids.get(id).is_some_and(|i| i.labels.contains(&label)))
    }

    /// The identities a selector matches, sorted. Only identities that carry the key of the
    /// most selective positive requirement are tested.
    pub(crate) fn select(&self, sel: &Selector) -> Vec<Identity> {
        let mut best: Option<Vec<Identity>> = None;
        for r in sel.requirements() {
            let cand: Vec<Identity> = match r.operator {
                Operator::In => {
                    let mut v: Vec<Identity> = r
                        .values
                        .iter()
                        .filter_map(|val| self.by_key_value.get(&(r.key.key.clone(), val.clone())))
                        .flatten()
                        .copied()
                        .collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                }
                Operator::Exists => self
                    .by_key
                    .get(&r.key.key)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default(),
                Operator::NotIn | Operator::DoesNotExist => continue,
            };
            if best.as_ref().is_none_or(|b| cand.len() < b.len()) {
                best = Some(cand);
            }
        }
        match best {
            Some(c) => c
                .into_iter()
                .filter(|id| self.ids.get(id).is_some_and(|i| sel.matches(&i.labels)))
                .collect(),
            None => self
                .ids
                .iter()
                .filter(|(_, i)| sel.matches(&i.labels))
                .map(|(id, _)| *id)
                .collect(),
        }
    }
}
