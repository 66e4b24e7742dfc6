//! The identities the compiler knows: numeric identity → labels and named ports, with an
//! inverted index so a selector is evaluated only against identities that can match it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use weir_identity::{
    Identity, Label, LabelSet, LabelSource, Operator, Requirement, ReservedIdentity, Selector,
};

/// Named ports of a workload: name → (IP protocol number, port). Names are lower-case, as the
/// policy model stores them.
pub type NamedPorts = BTreeMap<String, (u8, u16)>;

/// What the compiler knows about one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityInfo {
    /// The identity's labels, shared with whoever else keeps them (the allocator, the
    /// selector cache): see [`IdentityTable::upsert_shared`].
    pub labels: Arc<LabelSet>,
    /// Named ports of the workloads with this identity (for egress named-port resolution).
    pub named_ports: NamedPorts,
    /// For CIDR identities: the most specific `cidr:` prefix among the labels.
    pub(crate) prefix: Option<IpNet>,
    /// Whether the labels hold `reserved:world` (world entities and CIDR peers only select
    /// such identities).
    pub(crate) world: bool,
}

/// A set of identities of the label index: a tree for updates, and a sorted array built on
/// first read after a change, which a compile walks and probes several times faster.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdSet {
    set: BTreeSet<Identity>,
    sorted: OnceLock<Vec<Identity>>,
}

impl IdSet {
    fn one(id: Identity) -> Self {
        IdSet {
            set: BTreeSet::from([id]),
            sorted: OnceLock::new(),
        }
    }

    fn insert(&mut self, id: Identity) {
        if self.set.insert(id) {
            self.sorted = OnceLock::new();
        }
    }

    fn remove(&mut self, id: &Identity) {
        if self.set.remove(id) {
            self.sorted = OnceLock::new();
        }
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    fn len(&self) -> usize {
        self.set.len()
    }

    /// The identities, ascending.
    fn slice(&self) -> &[Identity] {
        self.sorted
            .get_or_init(|| self.set.iter().copied().collect())
    }

    fn contains(&self, id: &Identity) -> bool {
        self.slice().binary_search(id).is_ok()
    }
}

/// The identities holding labels of one key (without source), overall and per value.
#[derive(Debug, Clone, Default)]
struct KeyIndex {
    all: IdSet,
    by_value: HashMap<String, IdSet>,
    /// How many labels of this key each source holds: when one source holds them all, a
    /// requirement bound to that source is settled by the index alone.
    sources: BTreeMap<LabelSource, usize>,
}

impl KeyIndex {
    /// Whether every label of this key comes from `source`.
    fn only_source(&self, source: LabelSource) -> bool {
        let mut it = self.sources.keys();
        matches!((it.next(), it.next()), (Some(s), None) if *s == source)
    }
}

/// A CIDR identity's place in the prefix index: (is IPv6, network address, prefix length), so
/// that the prefixes inside a CIDR are one range of the index.
type PrefixKey = (bool, u128, u8);

fn prefix_key(n: &IpNet) -> PrefixKey {
    match n {
        IpNet::V4(v4) => (false, u128::from(u32::from(v4.network())), n.prefix_len()),
        IpNet::V6(v6) => (true, u128::from(v6.network()), n.prefix_len()),
    }
}

/// Identity → labels table with the indexes the peer evaluator needs. The reserved
/// identities 1–10 are always present and cannot be removed.
#[derive(Debug, Clone)]
pub struct IdentityTable {
    ids: BTreeMap<Identity, IdentityInfo>,
    /// Label key (without source) → identities with a label of that key (any source), and
    /// per value. Nested so lookups borrow the caller's key and value.
    by_key: HashMap<String, KeyIndex>,
    /// Identities with a CIDR prefix, by prefix: a CIDR peer visits only the identities inside
    /// it instead of every world identity.
    by_prefix: BTreeSet<(PrefixKey, Identity)>,
    /// Identities with `reserved:world` and no CIDR prefix (2, 9, 10, FQDN identities).
    world_no_prefix: BTreeSet<Identity>,
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

/// Whether `labels` hold `source:key=value`, without building a [`Label`].
pub(crate) fn has_label(labels: &LabelSet, source: LabelSource, key: &str, value: &str) -> bool {
    labels
        .iter()
        .any(|l| l.source == source && l.key == key && l.value == value)
}

impl IdentityTable {
    /// A table holding only the reserved identities.
    pub fn new() -> Self {
        let mut t = IdentityTable {
            ids: BTreeMap::new(),
            by_key: HashMap::new(),
            by_prefix: BTreeSet::new(),
            world_no_prefix: BTreeSet::new(),
        };
        for r in ReservedIdentity::ALL {
            t.insert_raw(Identity::from(r), Arc::new(r.labels()), NamedPorts::new());
        }
        t
    }

    fn insert_raw(&mut self, id: Identity, labels: Arc<LabelSet>, named_ports: NamedPorts) {
        let prefix = labels
            .iter()
            .filter(|l| l.source == LabelSource::Cidr)
            .filter_map(|l| parse_cidr_label(&l.key))
            .max_by_key(|n| n.prefix_len());
        let world = has_label(&labels, LabelSource::Reserved, "world", "");
        for l in labels.iter() {
            let k = match self.by_key.get_mut(l.key.as_str()) {
                Some(k) => k,
                None => self.by_key.entry(l.key.clone()).or_default(),
            };
            k.all.insert(id);
            *k.sources.entry(l.source).or_default() += 1;
            match k.by_value.get_mut(l.value.as_str()) {
                Some(v) => {
                    v.insert(id);
                }
                None => {
                    k.by_value.insert(l.value.clone(), IdSet::one(id));
                }
            }
        }
        match &prefix {
            Some(p) => {
                self.by_prefix.insert((prefix_key(p), id));
            }
            None if world => {
                self.world_no_prefix.insert(id);
            }
            None => {}
        }
        self.ids.insert(
            id,
            IdentityInfo {
                labels,
                named_ports,
                prefix,
                world,
            },
        );
    }

    fn remove_raw(&mut self, id: Identity) -> Option<IdentityInfo> {
        let info = self.ids.remove(&id)?;
        for l in info.labels.iter() {
            let Some(k) = self.by_key.get_mut(l.key.as_str()) else {
                continue;
            };
            k.all.remove(&id);
            if let Some(n) = k.sources.get_mut(&l.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    k.sources.remove(&l.source);
                }
            }
            if let Some(v) = k.by_value.get_mut(l.value.as_str()) {
                v.remove(&id);
                if v.is_empty() {
                    k.by_value.remove(l.value.as_str());
                }
            }
            if k.all.is_empty() {
                self.by_key.remove(l.key.as_str());
            }
        }
        if let Some(p) = &info.prefix {
            self.by_prefix.remove(&(prefix_key(p), id));
        }
        self.world_no_prefix.remove(&id);
        Some(info)
    }

    /// Adds or replaces an identity. Reserved identities keep their fixed labels; only their
    /// named ports can be set.
    pub fn upsert(&mut self, id: Identity, labels: LabelSet, named_ports: NamedPorts) {
        self.upsert_shared(id, Arc::new(labels), named_ports);
    }

    /// [`IdentityTable::upsert`] keeping a reference to labels the caller already holds (the
    /// allocator's), so each identity's labels are stored once.
    pub fn upsert_shared(&mut self, id: Identity, labels: Arc<LabelSet>, named_ports: NamedPorts) {
        let labels = match ReservedIdentity::from_identity(id) {
            Some(r) => Arc::new(r.labels()),
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
    pub(crate) fn with_label<'a>(
        &'a self,
        label: &'a Label,
    ) -> impl Iterator<Item = Identity> + 'a {
        let index = self.by_key.get(label.key.as_str());
        // The index ignores sources: test them unless one source holds every label of the key.
        let exact = index.is_some_and(|k| k.only_source(label.source));
        index
            .and_then(|k| k.by_value.get(label.value.as_str()))
            .map(IdSet::slice)
            .into_iter()
            .flatten()
            .copied()
            .filter(move |id| exact || self.ids.get(id).is_some_and(|i| i.labels.contains(label)))
    }

    /// Identities whose CIDR prefix lies inside `cidr` (no other test).
    pub(crate) fn inside(&self, cidr: &IpNet) -> impl Iterator<Item = Identity> + '_ {
        let (v6, lo, plen) = prefix_key(cidr);
        let hi = match cidr {
            IpNet::V4(v4) => u128::from(u32::from(v4.broadcast())),
            IpNet::V6(v6) => u128::from(v6.broadcast()),
        };
        self.by_prefix
            .range(((v6, lo, plen), Identity(0))..=((v6, hi, u8::MAX), Identity(u32::MAX)))
            .filter(move |((_, _, p), _)| *p >= plen)
            .map(|(_, id)| *id)
    }

    /// Identities with `reserved:world` and no CIDR prefix.
    pub(crate) fn world_without_prefix(&self) -> impl Iterator<Item = Identity> + '_ {
        self.world_no_prefix.iter().copied()
    }

    /// The identities a selector matches, sorted. Only identities that carry a label of
    /// every positive requirement's key (and value, for `In`) are tested: the smallest such
    /// set is walked and the others are probed, those in the sets of negative requirements
    /// are dropped, and the exact test runs only for what the index cannot settle.
    pub(crate) fn select(&self, sel: &Selector) -> Vec<Identity> {
        let mut sets: Vec<Candidates<'_>> = Vec::new();
        // Sets a match must not be in (negative requirements).
        let mut excluded: Vec<&IdSet> = Vec::new();
        // The requirements the index sets do not settle: those bound to a source (the index
        // ignores sources) unless every label of the key comes from that source.
        let mut residual: Vec<&Requirement> = Vec::new();
        for r in sel.requirements() {
            let index = self.by_key.get(r.key.key.as_str());
            if r.key.source != LabelSource::Any
                && !index.is_some_and(|k| k.only_source(r.key.source))
            {
                residual.push(r);
                if matches!(r.operator, Operator::NotIn | Operator::DoesNotExist) {
                    continue;
                }
            }
            let set = match (r.operator, index) {
                // Nobody carries the key: a negative requirement holds for everybody.
                (Operator::NotIn | Operator::DoesNotExist, None) => continue,
                (Operator::DoesNotExist, Some(k)) => {
                    excluded.push(&k.all);
                    continue;
                }
                (Operator::NotIn, Some(k)) => {
                    excluded.extend(r.values.iter().filter_map(|v| k.by_value.get(v.as_str())));
                    continue;
                }
                // Nobody carries the key: a positive requirement matches nothing.
                (_, None) => return Vec::new(),
                (Operator::Exists, Some(k)) => Candidates::Set(&k.all),
                (Operator::In, Some(k)) => {
                    let mut found = r
                        .values
                        .iter()
                        .filter_map(|val| k.by_value.get(val.as_str()));
                    match (found.next(), found.next()) {
                        (None, _) => return Vec::new(),
                        (Some(one), None) => Candidates::Set(one),
                        (Some(a), Some(b)) => {
                            let mut v: Vec<Identity> = a
                                .slice()
                                .iter()
                                .chain(b.slice())
                                .chain(found.flat_map(IdSet::slice))
                                .copied()
                                .collect();
                            v.sort_unstable();
                            v.dedup();
                            Candidates::Sorted(v)
                        }
                    }
                }
            };
            sets.push(set);
        }
        // Membership in every set settles the other requirements exactly (the index sets
        // only hold identities of the table).
        let exact = |id: &Identity| {
            residual.is_empty()
                || self
                    .ids
                    .get(id)
                    .is_some_and(|i| residual.iter().all(|r| r.matches(&i.labels)))
        };
        sets.sort_by_key(Candidates::len);
        let Some((driver, others)) = sets.split_first() else {
            return self
                .ids
                .iter()
                .filter(|(_, i)| sel.matches(&i.labels))
                .map(|(id, _)| *id)
                .collect();
        };
        // Sets of a size near the driver's are walked along with it (both are sorted); much
        // larger ones are probed.
        let mut probes: Vec<Probe<'_, '_>> = others
            .iter()
            .map(|o| {
                if o.len() > 16 * driver.len() {
                    Probe::Lookup(o)
                } else {
                    Probe::Walk(o.iter().peekable())
                }
            })
            .collect();
        driver
            .iter()
            .filter(|id| {
                probes.iter_mut().all(|p| p.holds(*id))
                    && !excluded.iter().any(|x| x.contains(id))
                    && exact(id)
            })
            .collect()
    }
}

/// How [`IdentityTable::select`] tests membership in one candidate set, for ascending
/// identities.
enum Probe<'s, 'a> {
    /// A lookup per identity.
    Lookup(&'s Candidates<'a>),
    /// A cursor that moves forward with the identities asked for.
    Walk(std::iter::Peekable<Box<dyn Iterator<Item = Identity> + 's>>),
}

impl Probe<'_, '_> {
    /// Whether the set holds `id`; calls must come in ascending order of `id`.
    fn holds(&mut self, id: Identity) -> bool {
        match self {
            Probe::Lookup(c) => c.contains(&id),
            Probe::Walk(it) => {
                while it.next_if(|x| *x < id).is_some() {}
                it.peek() == Some(&id)
            }
        }
    }
}

/// The identities that can satisfy one positive requirement, sorted.
enum Candidates<'a> {
    /// One index set.
    Set(&'a IdSet),
    /// The union of several (`In` with several values).
    Sorted(Vec<Identity>),
}

impl Candidates<'_> {
    fn len(&self) -> usize {
        match self {
            Candidates::Set(s) => s.len(),
            Candidates::Sorted(v) => v.len(),
        }
    }

    fn contains(&self, id: &Identity) -> bool {
        match self {
            Candidates::Set(s) => s.contains(id),
            Candidates::Sorted(v) => v.binary_search(id).is_ok(),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = Identity> + '_> {
        match self {
            Candidates::Set(s) => Box::new(s.slice().iter().copied()),
            Candidates::Sorted(v) => Box::new(v.iter().copied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `select` narrows through the index (which ignores label sources) and then tests only
    /// what the index leaves open; it must agree with the plain selector test everywhere.
    #[test]
    fn select_agrees_with_selector_matches() {
        let mut t = IdentityTable::new();
        let sources = [
            LabelSource::K8s,
            LabelSource::Container,
            LabelSource::Unspec,
        ];
        for i in 0..60u32 {
            let labels: LabelSet = [
                Label::new(sources[(i % 3) as usize], "app", format!("a{}", i % 4)),
                Label::new(
                    sources[((i / 3) % 3) as usize],
                    "tier",
                    format!("t{}", i % 2),
                ),
            ]
            .into_iter()
            .chain((i % 5 == 0).then(|| Label::k8s("extra", "")))
            .collect();
            t.upsert(Identity(1000 + i), labels, NamedPorts::new());
        }
        let key = |s: &str| weir_identity::LabelKey::parse_selector_key(s);
        let vals = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let mut selectors = Vec::new();
        for k in [
            "app",
            "k8s:app",
            "container:app",
            "tier",
            "k8s:tier",
            "extra",
            "k8s:extra",
            "container:extra",
            "nope",
        ] {
            for (op, v) in [
                (Operator::In, vals(&["a1"])),
                (Operator::In, vals(&["a1", "a2", "t0"])),
                (Operator::NotIn, vals(&["a1", "t1"])),
                (Operator::Exists, vals(&[])),
                (Operator::DoesNotExist, vals(&[])),
            ] {
                if let Ok(r) = Requirement::new(key(k), op, v) {
                    selectors.push(vec![r]);
                }
            }
        }
        let singles: Vec<Requirement> = selectors.iter().flatten().cloned().collect();
        for a in singles.iter().step_by(3) {
            for b in singles.iter().step_by(2) {
                selectors.push(vec![a.clone(), b.clone()]);
            }
        }
        let check = |t: &IdentityTable| {
            for reqs in &selectors {
                let sel = Selector::new(reqs.clone());
                let brute: Vec<Identity> = t
                    .iter()
                    .filter(|(_, i)| sel.matches(&i.labels))
                    .map(|(id, _)| id)
                    .collect();
                assert_eq!(t.select(&sel), brute, "{sel}");
            }
        };
        check(&t);
        // Removing the identities of one source leaves some keys with a single source, which
        // the index then settles alone.
        for i in (0..60u32).filter(|i| i % 3 != 0) {
            t.remove(Identity(1000 + i));
        }
        check(&t);
    }
}
