//! Turning label sets into numeric identities, with reference counting.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::labels::{Label, LabelSet, LabelSource};
use crate::numeric::{Identity, ReservedIdentity};

/// The number range an identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Cluster-wide identities, 256–65535 (endpoints).
    Cluster,
    /// Node-local identities, `LOCAL_FLAG + 1 ..= MAX_LOCAL` (CIDR and FQDN label sets).
    Local,
}

impl Scope {
    /// The scope a label set's identity is allocated from: local when any label is a `cidr:` or
    /// `fqdn:` label, cluster otherwise.
    pub fn of(labels: &LabelSet) -> Scope {
        if labels
            .iter()
            .any(|l| matches!(l.source, LabelSource::Cidr | LabelSource::Fqdn))
        {
            Scope::Local
        } else {
            Scope::Cluster
        }
    }

    /// The first and last number of the scope.
    pub fn range(self) -> (u32, u32) {
        match self {
            Scope::Cluster => (Identity::MIN_CLUSTER, Identity::MAX_CLUSTER),
            Scope::Local => (Identity::LOCAL_FLAG + 1, Identity::MAX_LOCAL),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Cluster => "cluster",
            Scope::Local => "local",
        })
    }
}

/// The result of [`IdentityAllocator::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Allocation {
    /// The identity of the label set.
    pub identity: Identity,
    /// Whether the identity was created by this call (its labels were not in use before).
    pub is_new: bool,
}

/// Why an allocation or release failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every number of the scope is in use.
    #[error("no free {0} identity left")]
    Exhausted(Scope),
    /// An identity needs at least one label.
    #[error("cannot allocate an identity for an empty label set")]
    EmptyLabels,
    /// The identity is not allocated.
    #[error("identity {0} is not allocated")]
    Unknown(Identity),
    /// A remote allocator backend failed.
    #[error("identity backend: {0}")]
    Backend(String),
}

/// Hands out numeric identities for label sets.
///
/// Each [`allocate`](IdentityAllocator::allocate) takes a reference that a
/// [`release`](IdentityAllocator::release) gives back; a label set keeps its number while it is
/// referenced. Reserved label sets (exactly `reserved:world`, anything with `reserved:host`, ...)
/// resolve to the reserved numbers 1–10 and are never freed.
pub trait IdentityAllocator {
    /// The identity of `labels`, allocating a number if the set is not in use yet.
    fn allocate(&mut self, labels: &LabelSet) -> Result<Allocation, AllocError>;

    /// Drops one reference; returns whether the identity was freed (its last reference went).
    /// Releasing a reserved identity does nothing and returns `Ok(false)`.
    fn release(&mut self, identity: Identity) -> Result<bool, AllocError>;

    /// The labels of an identity (reserved ones included).
    fn lookup(&self, identity: Identity) -> Option<&LabelSet>;

    /// The identity currently assigned to exactly this label set.
    fn lookup_labels(&self, labels: &LabelSet) -> Option<Identity>;

    /// Every known identity with its labels: the reserved ones first, then the allocated ones
    /// (in no particular order).
    fn identities(&self) -> Box<dyn Iterator<Item = (Identity, &LabelSet)> + '_>;
}

/// The reserved identity a label set resolves to, if any (Cilium's rules: a set with
/// `reserved:host` is the host, one with `reserved:remote-node` a remote node; otherwise the set
/// must be exactly the labels of a reserved identity, or its single `reserved:` label).
pub fn reserved_identity_for(labels: &LabelSet) -> Option<ReservedIdentity> {
    if labels.contains(&Label::reserved("host")) {
        return Some(ReservedIdentity::Host);
    }
    if labels.contains(&Label::reserved("remote-node")) {
        return Some(ReservedIdentity::RemoteNode);
    }
    ReservedIdentity::ALL.into_iter().find(|r| {
        let own = r.labels();
        *labels == own || (labels.len() == 1 && labels.contains(&Label::reserved(r.name())))
    })
}

/// Numbers in use within one scope, as a bitmap, plus the cursor where the next search starts.
#[derive(Debug, Clone)]
struct NumberRange {
    min: u32,
    max: u32,
    cursor: u32,
    in_use: u64,
    /// Bit `n - min` is set when number `n` is taken; grown on demand.
    bits: Vec<u64>,
}

impl NumberRange {
    fn new(scope: Scope) -> Self {
        let (min, max) = scope.range();
        NumberRange {
            min,
            max,
            cursor: min,
            in_use: 0,
            bits: Vec::new(),
        }
    }

    fn capacity(&self) -> u64 {
        u64::from(self.max - self.min) + 1
    }

    fn is_set(&self, off: u32) -> bool {
        let word = (off / 64) as usize;
        self.bits
            .get(word)
            .is_some_and(|w| w & (1u64 << (off % 64)) != 0)
    }

    fn set(&mut self, off: u32, on: bool) {
        let word = (off / 64) as usize;
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if let Some(w) = self.bits.get_mut(word) {
            if on {
                *w |= 1u64 << (off % 64);
            } else {
                *w &= !(1u64 << (off % 64));
            }
        }
    }

    /// The first free offset at or after `from`, up to the end of the range.
    fn next_free_from(&self, from: u32) -> Option<u32> {
        let last = self.max - self.min;
        let mut off = from;
        while off <= last {
            let word = (off / 64) as usize;
            let Some(&w) = self.bits.get(word) else {
                // Past the grown part of the bitmap: all free.
                return Some(off);
            };
            // Treat bits below `off` in this word as taken.
            let masked = w | ((1u64 << (off % 64)) - 1);
            if masked != u64::MAX {
                let free = (word as u32) * 64 + (!masked).trailing_zeros();
                return (free <= last).then_some(free);
            }
            off = (word as u32 + 1) * 64;
        }
        None
    }

    /// Takes a number, searching forward from the cursor and wrapping once.
    fn take(&mut self) -> Option<u32> {
        if self.in_use >= self.capacity() {
            return None;
        }
        let start = self.cursor - self.min;
        let off = self
            .next_free_from(start)
            .or_else(|| self.next_free_from(0))?;
        self.set(off, true);
        self.in_use += 1;
        let n = self.min + off;
        // Move past the number just handed out, so a freed number is not reused at once.
        self.cursor = if n >= self.max { self.min } else { n + 1 };
        Some(n)
    }

    fn free(&mut self, n: u32) {
        if n < self.min || n > self.max {
            return;
        }
        let off = n - self.min;
        if self.is_set(off) {
            self.set(off, false);
            self.in_use -= 1;
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    labels: Arc<LabelSet>,
    refs: u64,
}

/// An in-process allocator: reference counted, numbers taken from the cluster or local range
/// with a cursor that moves forward and wraps (freed numbers are reused late).
#[derive(Debug, Clone)]
pub struct InMemoryAllocator {
    by_id: HashMap<Identity, Entry>,
    by_labels: HashMap<Arc<LabelSet>, Identity>,
    reserved: Vec<(Identity, LabelSet)>,
    cluster: NumberRange,
    local: NumberRange,
}

impl Default for InMemoryAllocator {
    fn default() -> Self {
        InMemoryAllocator::new()
    }
}

impl InMemoryAllocator {
    /// An allocator with nothing allocated.
    pub fn new() -> Self {
        InMemoryAllocator {
            by_id: HashMap::new(),
            by_labels: HashMap::new(),
            reserved: ReservedIdentity::ALL
                .into_iter()
                .map(|r| (Identity::from(r), r.labels()))
                .collect(),
            cluster: NumberRange::new(Scope::Cluster),
            local: NumberRange::new(Scope::Local),
        }
    }

    /// An allocator whose scopes use smaller ranges (both inclusive and inside the normal ones);
    /// for tests of exhaustion and reuse.
    pub fn with_ranges(cluster: (u32, u32), local: (u32, u32)) -> Self {
        let mut a = InMemoryAllocator::new();
        let clamp = |scope: Scope, (lo, hi): (u32, u32)| {
            let (min, max) = scope.range();
            let lo = lo.clamp(min, max);
            (lo, hi.clamp(lo, max))
        };
        let (lo, hi) = clamp(Scope::Cluster, cluster);
        a.cluster = NumberRange {
            min: lo,
            max: hi,
            cursor: lo,
            in_use: 0,
            bits: Vec::new(),
        };
        let (lo, hi) = clamp(Scope::Local, local);
        a.local = NumberRange {
            min: lo,
            max: hi,
            cursor: lo,
            in_use: 0,
            bits: Vec::new(),
        };
        a
    }

    /// How many non-reserved identities are allocated.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no non-reserved identity is allocated.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The labels of an allocated (non-reserved) identity as the allocator holds them, to
    /// share with the other tables that keep labels per identity (the compiler's, the
    /// selector cache) instead of copying them.
    pub fn shared_labels(&self, identity: Identity) -> Option<Arc<LabelSet>> {
        self.by_id.get(&identity).map(|e| Arc::clone(&e.labels))
    }

    /// Restores an identity a previous run allocated (from the agent's state directory), so
    /// the numbers already in the kernel's maps keep their meaning across restarts. The entry
    /// starts with no references: the first [`IdentityAllocator::allocate`] of the same labels
    /// takes it. Fails if the number is outside its scope or taken by other labels.
    pub fn restore(&mut self, identity: Identity, labels: LabelSet) -> Result<(), AllocError> {
        if reserved_identity_for(&labels).is_some() || labels.is_empty() {
            return Ok(());
        }
        if let Some(existing) = self.by_labels.get(&labels) {
            return if *existing == identity {
                Ok(())
            } else {
                Err(AllocError::Unknown(identity))
            };
        }
        if self.by_id.contains_key(&identity) {
            return Err(AllocError::Unknown(identity));
        }
        let range = self.range_mut(Scope::of(&labels));
        let n = identity.get();
        if n < range.min || n > range.max {
            return Err(AllocError::Unknown(identity));
        }
        let off = n - range.min;
        if !range.is_set(off) {
            range.set(off, true);
            range.in_use += 1;
        }
        let labels = Arc::new(labels);
        self.by_labels.insert(labels.clone(), identity);
        self.by_id.insert(identity, Entry { labels, refs: 0 });
        Ok(())
    }

    /// The reference count of an allocated identity (0 if not allocated or reserved).
    pub fn refs(&self, identity: Identity) -> u64 {
        self.by_id.get(&identity).map_or(0, |e| e.refs)
    }

    fn range_mut(&mut self, scope: Scope) -> &mut NumberRange {
        match scope {
            Scope::Cluster => &mut self.cluster,
            Scope::Local => &mut self.local,
        }
    }
}

impl IdentityAllocator for InMemoryAllocator {
    fn allocate(&mut self, labels: &LabelSet) -> Result<Allocation, AllocError> {
        if let Some(r) = reserved_identity_for(labels) {
            return Ok(Allocation {
                identity: r.into(),
                is_new: false,
            });
        }
        if let Some(id) = self.by_labels.get(labels).copied()
            && let Some(e) = self.by_id.get_mut(&id)
        {
            e.refs += 1;
            return Ok(Allocation {
                identity: id,
                is_new: false,
            });
        }
        if labels.is_empty() {
            return Err(AllocError::EmptyLabels);
        }
        let scope = Scope::of(labels);
        let n = self
            .range_mut(scope)
            .take()
            .ok_or(AllocError::Exhausted(scope))?;
        let id = Identity(n);
        let shared = Arc::new(labels.clone());
        self.by_labels.insert(Arc::clone(&shared), id);
        self.by_id.insert(
            id,
            Entry {
                labels: shared,
                refs: 1,
            },
        );
        Ok(Allocation {
            identity: id,
            is_new: true,
        })
    }

    fn release(&mut self, identity: Identity) -> Result<bool, AllocError> {
        if identity.is_reserved() {
            return Ok(false);
        }
        let Some(entry) = self.by_id.get_mut(&identity) else {
            return Err(AllocError::Unknown(identity));
        };
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs > 0 {
            return Ok(false);
        }
        if let Some(entry) = self.by_id.remove(&identity) {
            self.by_labels.remove(&*entry.labels);
        }
        let scope = if identity.is_local() {
            Scope::Local
        } else {
            Scope::Cluster
        };
        self.range_mut(scope).free(identity.get());
        Ok(true)
    }

    fn lookup(&self, identity: Identity) -> Option<&LabelSet> {
        if let Some(e) = self.by_id.get(&identity) {
            return Some(&e.labels);
        }
        self.reserved
            .iter()
            .find(|(id, _)| *id == identity)
            .map(|(_, l)| l)
    }

    fn lookup_labels(&self, labels: &LabelSet) -> Option<Identity> {
        if let Some(r) = reserved_identity_for(labels) {
            return Some(r.into());
        }
        self.by_labels.get(labels).copied()
    }

    fn identities(&self) -> Box<dyn Iterator<Item = (Identity, &LabelSet)> + '_> {
        Box::new(
            self.reserved
                .iter()
                .map(|(id, l)| (*id, l))
                .chain(self.by_id.iter().map(|(id, e)| (*id, &*e.labels))),
        )
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn restore_keeps_numbers_across_restarts() {
        let mut a = InMemoryAllocator::new();
        let web: LabelSet = [Label::k8s("app", "web")].into_iter().collect();
        a.restore(Identity(4242), web.clone()).unwrap();
        let got = a.allocate(&web).unwrap();
        assert_eq!(got.identity, Identity(4242));
        // The restored number is taken: new label sets get other numbers.
        let db: LabelSet = [Label::k8s("app", "db")].into_iter().collect();
        assert_ne!(a.allocate(&db).unwrap().identity, Identity(4242));
        // Restoring the same number for other labels is refused.
        assert!(a.restore(Identity(4242), db).is_err());
        assert!(a.release(Identity(4242)).unwrap());
    }

    use super::*;
    use crate::sources::cidr_labels;

    fn app(name: &str) -> LabelSet {
        [Label::k8s("app", name)].into_iter().collect()
    }

    #[test]
    fn same_labels_same_identity() {
        let mut a = InMemoryAllocator::new();
        let x = a.allocate(&app("x")).unwrap();
        assert!(x.is_new);
        assert!(x.identity.is_cluster());
        let again = a.allocate(&app("x")).unwrap();
        assert_eq!(again.identity, x.identity);
        assert!(!again.is_new);
        assert_eq!(a.refs(x.identity), 2);
        assert_eq!(a.lookup(x.identity), Some(&app("x")));
        assert_eq!(a.lookup_labels(&app("x")), Some(x.identity));
        assert_eq!(a.release(x.identity), Ok(false));
        assert_eq!(a.release(x.identity), Ok(true));
        assert_eq!(a.lookup(x.identity), None);
        assert_eq!(a.release(x.identity), Err(AllocError::Unknown(x.identity)));
    }

    #[test]
    fn reserved_sets() {
        let mut a = InMemoryAllocator::new();
        for r in ReservedIdentity::ALL {
            let got = a.allocate(&r.labels()).unwrap();
            assert_eq!(got.identity, Identity::from(r));
            assert!(!got.is_new);
            assert_eq!(a.release(got.identity), Ok(false));
            assert_eq!(a.lookup(got.identity), Some(&r.labels()));
        }
        let host_with_node_labels: LabelSet = [Label::reserved("host"), Label::k8s("zone", "a")]
            .into_iter()
            .collect();
        assert_eq!(
            a.allocate(&host_with_node_labels).unwrap().identity,
            Identity(1)
        );
        let lone_v4: LabelSet = [Label::reserved("world-ipv4")].into_iter().collect();
        assert_eq!(a.lookup_labels(&lone_v4), Some(Identity(9)));
        assert_eq!(a.identities().count(), 10);
        assert!(a.is_empty());
        assert_eq!(a.allocate(&LabelSet::new()), Err(AllocError::EmptyLabels));
    }

    #[test]
    fn cidr_is_local() {
        let mut a = InMemoryAllocator::new();
        let id = a
            .allocate(&cidr_labels("10.0.0.0/8".parse().unwrap()))
            .unwrap()
            .identity;
        assert!(id.is_local());
        assert_eq!(id.get(), Identity::LOCAL_FLAG + 1);
    }

    #[test]
    fn exhaustion_and_late_reuse() {
        let mut a = InMemoryAllocator::with_ranges((256, 258), (0, 0));
        let ids: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| a.allocate(&app(n)).unwrap().identity)
            .collect();
        assert_eq!(ids, vec![Identity(256), Identity(257), Identity(258)]);
        assert_eq!(
            a.allocate(&app("d")),
            Err(AllocError::Exhausted(Scope::Cluster))
        );
        assert_eq!(a.release(Identity(257)), Ok(true));
        assert_eq!(a.allocate(&app("d")).unwrap().identity, Identity(257));

        // With room ahead of the cursor, a freed number is not reused at once.
        let mut b = InMemoryAllocator::with_ranges((256, 300), (0, 0));
        let first = b.allocate(&app("a")).unwrap().identity;
        b.release(first).unwrap();
        assert_ne!(b.allocate(&app("a")).unwrap().identity, first);
        let mut l = InMemoryAllocator::with_ranges((256, 256), (0, 0));
        let one = l
            .allocate(&cidr_labels("10.0.0.0/8".parse().unwrap()))
            .unwrap();
        assert_eq!(one.identity.get(), Identity::LOCAL_FLAG + 1);
        assert_eq!(
            l.allocate(&cidr_labels("10.0.0.0/9".parse().unwrap())),
            Err(AllocError::Exhausted(Scope::Local))
        );
    }

    #[test]
    fn bitmap_search_crosses_words() {
        let mut r = NumberRange::new(Scope::Cluster);
        for _ in 0..200 {
            assert!(r.take().is_some());
        }
        r.free(256 + 5);
        r.free(256 + 130);
        // Cursor is at 456: the next number is fresh, not a freed one.
        assert_eq!(r.take(), Some(456));
        r.cursor = r.min;
        assert_eq!(r.take(), Some(256 + 5));
        assert_eq!(r.take(), Some(256 + 130));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Alloc(u8),
            Release(u8),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0u8..12).prop_map(Op::Alloc),
                (0u8..12).prop_map(Op::Release)
            ]
        }

        proptest! {
            #[test]
            fn refcounts_match_a_model(ops in proptest::collection::vec(op(), 0..200)) {
                // Small range so that wrap-around and exhaustion happen.
                let mut a = InMemoryAllocator::with_ranges((256, 263), (0, 0));
                let mut model: HashMap<u8, (Identity, u64)> = HashMap::new();
                for op in ops {
                    match op {
                        Op::Alloc(n) => {
                            let labels = app(&n.to_string());
                            match a.allocate(&labels) {
                                Ok(got) => {
                                    let e = model.entry(n).or_insert((got.identity, 0));
                                    prop_assert_eq!(e.0, got.identity);
                                    prop_assert_eq!(got.is_new, e.1 == 0);
                                    e.1 += 1;
                                }
                                Err(err) => {
                                    prop_assert_eq!(err, AllocError::Exhausted(Scope::Cluster));
                                    prop_assert_eq!(model.len(), 8);
                                    prop_assert!(!model.contains_key(&n));
                                }
                            }
                        }
                        Op::Release(n) => {
                            if let Some(e) = model.get_mut(&n) {
                                e.1 -= 1;
                                let freed = e.1 == 0;
                                let id = e.0;
                                prop_assert_eq!(a.release(id), Ok(freed));
                                if freed {
                                    model.remove(&n);
                                }
                            }
                        }
                    }
                    // Distinct live label sets have distinct numbers, and lookups agree.
                    let mut seen = std::collections::HashSet::new();
                    for (n, (id, refs)) in &model {
                        prop_assert!(seen.insert(*id));
                        prop_assert_eq!(a.refs(*id), *refs);
                        prop_assert_eq!(a.lookup(*id), Some(&app(&n.to_string())));
                    }
                    prop_assert_eq!(a.len(), model.len());
                }
            }
        }
    }
}

#[cfg(test)]
mod perf {
    use super::*;

    /// Run with `cargo test --release -p weir-identity -- --ignored`.
    #[test]
    #[ignore = "timing; run in release"]
    fn allocation_rate_with_60k_allocated() {
        let labels = |i: u32| -> LabelSet {
            [
                Label::k8s("app", format!("app-{i}")),
                Label::k8s("io.kubernetes.pod.namespace", "default"),
                Label::k8s("io.cilium.k8s.policy.serviceaccount", "default"),
                Label::k8s("io.cilium.k8s.policy.cluster", "default"),
            ]
            .into_iter()
            .collect()
        };
        let mut a = InMemoryAllocator::new();
        for i in 0..60_000 {
            a.allocate(&labels(i)).unwrap();
        }
        let sets: Vec<LabelSet> = (0..100_000).map(|i| labels(i % 65_000)).collect();
        let start = std::time::Instant::now();
        for s in &sets {
            a.allocate(s).unwrap();
        }
        let rate = sets.len() as f64 / start.elapsed().as_secs_f64();
        eprintln!("{rate:.0} allocations/s");
        assert!(rate > 100_000.0);
    }
}
