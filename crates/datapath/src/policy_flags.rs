//! Per-endpoint [`abi::endpoint_flag`] bits: which kinds of policy entries each endpoint has,
//! kept in the endpoint map so that the programs skip lookups that cannot match (an endpoint
//! with no ANY-identity entries never needs the ANY lookups, one without partial port ranges
//! never needs the trie). Shared by the kernel backends so that both keep the same bits.
//!
//! The bits are a summary of the policy maps, so they must never claim less than the maps
//! hold: [`PolicyFlags`] counts the entries of each kind, and a backend applies a diff as
//! (1) raise the bits the upserts need, (2) write the upserts, (3) remove the removals,
//! (4) lower the bits nothing needs any more. Between the steps the bits are a superset of
//! what the maps hold, which costs at most a lookup and never changes a verdict.
//!
//! It also remembers the value last written to each slot, so that an upsert writing the very
//! same value is skipped: a rewrite would restart the entry's packet and byte counters
//! (the compiler re-sends entries whose rule provenance changed but whose action did not).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use weir_datapath_abi as abi;

use crate::encode::PolicySlot;

/// The flag bit a policy map slot needs in its endpoint's [`abi::EndpointInfo::flags`].
pub fn slot_flag(slot: &PolicySlot) -> u32 {
    use abi::endpoint_flag as f;
    let (data, partial) = match slot {
        PolicySlot::Exact(k) => (k, false),
        PolicySlot::Trie(_, k) => (k, true),
    };
    let any = data.identity == 0;
    let l3 = !partial && data.direction & abi::POLICY_L3_ONLY != 0;
    let bit = match (any, partial, l3) {
        (false, true, _) => f::ID_PARTIAL,
        (false, false, true) => f::ID_L3_ONLY,
        (false, false, false) => f::ID_EXACT,
        (true, true, _) => f::ANY_PARTIAL,
        (true, false, true) => f::ANY_L3_ONLY,
        (true, false, false) => f::ANY_EXACT,
    };
    let dir = u32::from(data.direction & !abi::POLICY_L3_ONLY & 1);
    bit << (f::DIRECTION_SHIFT * dir)
}

fn endpoint_of(slot: &PolicySlot) -> u32 {
    match slot {
        PolicySlot::Exact(k) | PolicySlot::Trie(_, k) => k.endpoint_id,
    }
}

/// A slot packed into one integer: kind, trie prefix, endpoint, identity, direction, protocol
/// and port all fit in 128 bits, which hash far faster than the enum field by field.
fn packed(slot: &PolicySlot) -> u128 {
    let (kind, prefix, k) = match slot {
        PolicySlot::Exact(k) => (0u128, 0u128, k),
        PolicySlot::Trie(p, k) => (1, u128::from(*p & 0xff), k),
    };
    (kind << 120)
        | (prefix << 112)
        | (u128::from(k.endpoint_id) << 64)
        | (u128::from(k.identity) << 32)
        | (u128::from(k.direction) << 24)
        | (u128::from(k.protocol) << 16)
        | u128::from(k.dport_be)
}

/// Multiply-rotate hashing of the packed slots (they are not attacker-chosen: they come from
/// the compiler's own map state), several times cheaper than the default SipHash for the
/// 16k-entry diffs this sits in the path of.
#[derive(Default)]
struct SlotHasher(u64);

impl Hasher for SlotHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Number of distinct flag bits (6 kinds × 2 directions), indexed by bit position.
const BITS: usize = 16;

/// The part of a [`abi::PolicyValue`] userspace writes (action, priority, proxy port, cookie;
/// the prefix length follows from the slot), packed into one integer.
fn written(v: &abi::PolicyValue) -> u64 {
    u64::from(v.action)
        | (u64::from(v.priority) << 8)
        | (u64::from(v.proxy_port_be) << 16)
        | (u64::from(v.cookie) << 32)
}

/// The policy entries present in the kernel maps, by endpoint and kind, with the value last
/// written to each (None: not known, the next upsert writes).
#[derive(Debug, Default, Clone)]
pub struct PolicyFlags {
    present: HashMap<u128, Option<u64>, BuildHasherDefault<SlotHasher>>,
    counts: HashMap<u32, [u32; BITS]>,
}

impl PolicyFlags {
    /// No entries.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an entry written to the maps with a value not known here (again: no change
    /// to the flags).
    pub fn insert(&mut self, slot: PolicySlot) {
        self.record(slot, None);
    }

    /// Records the values of `upserts` and drops from it those the kernel already holds as
    /// they are (rewriting them would restart their counters). Returns the endpoint's flags
    /// before and after: write the new flags before the upserts, so no packet skips a lookup
    /// it needs. After a failed write, call [`unstage`](Self::unstage) with what was left.
    pub fn stage_upserts(
        &mut self,
        endpoint_id: u32,
        upserts: &mut Vec<(PolicySlot, abi::PolicyValue)>,
    ) -> (u32, u32) {
        let before = self.flags(endpoint_id);
        upserts.retain(|(slot, v)| !self.insert_value(*slot, v));
        (before, self.flags(endpoint_id))
    }

    /// Forgets the values of staged upserts the kernel may not hold (a write failed), so the
    /// next identical upsert is written.
    pub fn unstage(&mut self, upserts: &[(PolicySlot, abi::PolicyValue)]) {
        for (slot, _) in upserts {
            self.forget_value(slot);
        }
    }

    /// Records an entry about to be written with `value`. Returns true when the slot already
    /// holds exactly this value: the write can be skipped, keeping the entry's counters.
    pub fn insert_value(&mut self, slot: PolicySlot, value: &abi::PolicyValue) -> bool {
        self.record(slot, Some(written(value)))
    }

    /// Forgets the value of a slot (after a failed write: the kernel may not hold it).
    pub fn forget_value(&mut self, slot: &PolicySlot) {
        if let Some(v) = self.present.get_mut(&packed(slot)) {
            *v = None;
        }
    }

    fn record(&mut self, slot: PolicySlot, value: Option<u64>) -> bool {
        match self.present.insert(packed(&slot), value) {
            Some(old) => old.is_some() && old == value,
            None => {
                let bit = slot_flag(&slot).trailing_zeros() as usize;
                let ep = endpoint_of(&slot);
                if let Some(c) = self.counts.entry(ep).or_default().get_mut(bit) {
                    *c = c.saturating_add(1);
                }
                false
            }
        }
    }

    /// Records an entry removed from the maps (absent: no change).
    pub fn remove(&mut self, slot: &PolicySlot) {
        if self.present.remove(&packed(slot)).is_none() {
            return;
        }
        let bit = slot_flag(slot).trailing_zeros() as usize;
        let ep = endpoint_of(slot);
        if let Some(counts) = self.counts.get_mut(&ep) {
            if let Some(c) = counts.get_mut(bit) {
                *c = c.saturating_sub(1);
            }
            if counts.iter().all(|&c| c == 0) {
                self.counts.remove(&ep);
            }
        }
    }

    /// Forgets every entry of `endpoint_id`.
    pub fn purge(&mut self, endpoint_id: u32) {
        self.present.retain(|s, _| (s >> 64) as u32 != endpoint_id);
        self.counts.remove(&endpoint_id);
    }

    /// The flags `endpoint_id` needs for the entries recorded.
    pub fn flags(&self, endpoint_id: u32) -> u32 {
        let Some(counts) = self.counts.get(&endpoint_id) else {
            return 0;
        };
        counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .fold(0, |acc, (bit, _)| acc | (1u32 << bit))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use abi::endpoint_flag as f;

    fn key(identity: u32, direction: u8) -> abi::PolicyKey {
        abi::PolicyKey {
            endpoint_id: 7,
            identity,
            direction,
            protocol: 6,
            dport_be: 80u16.to_be(),
        }
    }

    #[test]
    fn slots_map_to_their_kind_and_direction() {
        let eg = abi::direction::EGRESS;
        let ing = abi::direction::INGRESS;
        assert_eq!(slot_flag(&PolicySlot::Exact(key(300, ing))), f::ID_EXACT);
        assert_eq!(slot_flag(&PolicySlot::Exact(key(0, ing))), f::ANY_EXACT);
        assert_eq!(
            slot_flag(&PolicySlot::Exact(key(300, eg | abi::POLICY_L3_ONLY))),
            f::ID_L3_ONLY << 8
        );
        assert_eq!(
            slot_flag(&PolicySlot::Exact(key(0, ing | abi::POLICY_L3_ONLY))),
            f::ANY_L3_ONLY
        );
        assert_eq!(
            slot_flag(&PolicySlot::Trie(80, key(0, eg))),
            f::ANY_PARTIAL << 8
        );
        assert_eq!(slot_flag(&PolicySlot::Trie(80, key(9, ing))), f::ID_PARTIAL);
    }

    #[test]
    fn packing_keeps_slots_apart() {
        let k = key(300, 0);
        let slots = [
            PolicySlot::Exact(k),
            PolicySlot::Trie(96, k),
            PolicySlot::Trie(80, k),
            PolicySlot::Exact(abi::PolicyKey {
                endpoint_id: 8,
                ..k
            }),
            PolicySlot::Exact(abi::PolicyKey { identity: 0, ..k }),
            PolicySlot::Exact(abi::PolicyKey { direction: 1, ..k }),
            PolicySlot::Exact(abi::PolicyKey { protocol: 17, ..k }),
            PolicySlot::Exact(abi::PolicyKey { dport_be: 1, ..k }),
        ];
        let set: HashSet<u128> = slots.iter().map(packed).collect();
        assert_eq!(set.len(), slots.len());
    }

    #[test]
    fn counts_follow_inserts_and_removals() {
        let mut p = PolicyFlags::new();
        let a = PolicySlot::Exact(key(300, 0));
        let b = PolicySlot::Exact(abi::PolicyKey {
            dport_be: 81u16.to_be(),
            ..key(300, 0)
        });
        let any = PolicySlot::Trie(80, key(0, 1));
        p.insert(a);
        p.insert(a);
        p.insert(b);
        p.insert(any);
        assert_eq!(p.flags(7), f::ID_EXACT | (f::ANY_PARTIAL << 8));
        assert_eq!(p.flags(8), 0);
        p.remove(&a);
        assert_eq!(p.flags(7), f::ID_EXACT | (f::ANY_PARTIAL << 8));
        p.remove(&a);
        p.remove(&b);
        assert_eq!(p.flags(7), f::ANY_PARTIAL << 8);
        p.purge(7);
        assert_eq!(p.flags(7), 0);
        p.remove(&any);
        assert_eq!(p.flags(7), 0);
    }

    #[test]
    fn same_value_upserts_are_recognised() {
        let mut p = PolicyFlags::new();
        let a = PolicySlot::Exact(key(300, 0));
        let allow = abi::PolicyValue::default();
        let deny = abi::PolicyValue {
            action: abi::action::DENY,
            ..allow
        };
        // Unknown value (as after a restart without values): written.
        p.insert(a);
        assert!(!p.insert_value(a, &allow));
        assert!(p.insert_value(a, &allow));
        assert!(!p.insert_value(a, &deny));
        assert!(p.insert_value(a, &deny));
        p.forget_value(&a);
        assert!(!p.insert_value(a, &deny));
        assert_eq!(p.flags(7), f::ID_EXACT);
        p.remove(&a);
        assert_eq!(p.flags(7), 0);
        assert!(!p.insert_value(a, &deny));
    }
}
