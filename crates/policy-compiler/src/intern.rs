//! Numbers for the distinct selectors and peers of the stored policies, given when a policy
//! is stored, so that a compile caches per-selector and per-peer results by number instead of
//! hashing and comparing them (many rules share their subject and their peers).

use std::collections::HashMap;
use std::hash::Hash;

/// Value → number, counted per holder. A number is never given twice (not even after its
/// value was released), so a number kept by an old plan can never stand for another value.
#[derive(Debug, Clone)]
pub(crate) struct Interner<T> {
    ids: HashMap<T, (u64, u32)>,
    next: u64,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            ids: HashMap::new(),
            next: 0,
        }
    }
}

impl<T: Hash + Eq + Clone> Interner<T> {
    /// The number of `v`, counting one more holder.
    pub(crate) fn intern(&mut self, v: &T) -> u64 {
        if let Some((id, n)) = self.ids.get_mut(v) {
            *n += 1;
            return *id;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(v.clone(), (id, 1));
        id
    }

    /// One holder of `v` fewer; forgets it with the last.
    pub(crate) fn release(&mut self, v: &T) {
        if let Some((_, n)) = self.ids.get_mut(v) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.ids.remove(v);
            }
        }
    }

    /// The number of distinct values held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_shared_counted_and_never_reused() {
        let mut i = Interner::default();
        let a = i.intern(&"a");
        assert_eq!(i.intern(&"a"), a);
        let b = i.intern(&"b");
        assert_ne!(a, b);
        i.release(&"a");
        assert_eq!(i.len(), 2);
        i.release(&"a");
        assert_eq!(i.len(), 1);
        let again = i.intern(&"a");
        assert!(again != a && again != b);
    }
}
