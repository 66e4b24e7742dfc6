//! MapState: the per-endpoint policy map, as data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use weir_identity::Identity;
use weir_policy_model::{Direction, RuleRef};

/// IP protocol numbers used in policy keys.
pub mod proto {
    /// ICMP
    pub const ICMP: u8 = 1;
    /// TCP
    pub const TCP: u8 = 6;
    /// UDP
    pub const UDP: u8 = 17;
    /// ICMPv6
    pub const ICMPV6: u8 = 58;
    /// SCTP
    pub const SCTP: u8 = 132;
}

/// Cilium's drop reason for "no policy allowed this" (`DROP_POLICY`).
pub const DROP_POLICY_DENIED: u8 = 133;
/// Cilium's drop reason for "a deny policy matched" (`DROP_POLICY_DENY`).
pub const DROP_POLICY_DENY: u8 = 181;

/// The prefix lengths a key can have: 0 (everything), 8 (one protocol, every port) and 9–24
/// (one protocol, a power-of-two aligned port block). Protocol is never partially wildcarded.
pub const PREFIX_LENGTHS: [u8; 18] = [
    0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
];

/// The mask over the 16 port bits for a key prefix length (`prefix_len` ≤ 8 keeps no port bits).
pub(crate) fn port_mask(prefix_len: u8) -> u16 {
    let bits = prefix_len.saturating_sub(8).min(16);
    if bits == 0 {
        0
    } else {
        u16::MAX << (16 - bits)
    }
}

/// A policy map key, as the kernel keys the per-endpoint policy LPM map.
///
/// The prefix covers the remote identity and direction fully, then `prefix_len` bits (0–24) of
/// protocol (8 bits) followed by destination port (16 bits). So: `prefix_len` 0 = every protocol
/// and port; 8 = every port of `protocol`; 24 = exactly `port`; in between, a power-of-two
/// aligned port block. For ICMP and ICMPv6 the port field holds the ICMP type (the code is not
/// matched), as Cilium does.
///
/// Build keys with [`PolicyKey::new`], which clamps the prefix and zeroes the bits beyond it, so
/// that equal key spaces compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// Remote identity; [`Identity::ANY`] (0) matches every identity.
    pub identity: Identity,
    /// Direction as seen from the endpoint.
    pub direction: Direction,
    /// IP protocol number; 0 when `prefix_len` is 0.
    pub protocol: u8,
    /// Destination port (host order); bits beyond the prefix are zero.
    pub port: u16,
    /// Number of significant bits of protocol+port, 0–24.
    pub prefix_len: u8,
}

impl PolicyKey {
    /// A normalised key: `prefix_len` is clamped to 24 and rounded down to a valid length
    /// (1–7 become 0, because protocol is never partially wildcarded), and the bits beyond it
    /// are zeroed.
    pub fn new(
        identity: Identity,
        direction: Direction,
        protocol: u8,
        port: u16,
        prefix_len: u8,
    ) -> Self {
        let prefix_len = match prefix_len.min(24) {
            p if p < 8 => 0,
            p => p,
        };
        PolicyKey {
            identity,
            direction,
            protocol: if prefix_len == 0 { 0 } else { protocol },
            port: port & port_mask(prefix_len),
            prefix_len,
        }
    }

    /// The key for every protocol and port of `identity` in `direction` (an L3-only entry).
    pub fn l3(identity: Identity, direction: Direction) -> Self {
        PolicyKey::new(identity, direction, 0, 0, 0)
    }

    /// The 24-bit protocol+port value as the LPM trie sees it: `protocol << 16 | port`.
    pub fn value24(&self) -> u32 {
        (u32::from(self.protocol) << 16) | u32::from(self.port)
    }

    /// The mask of the significant bits of [`PolicyKey::value24`] (the top `prefix_len` bits of
    /// 24).
    pub fn mask24(&self) -> u32 {
        let p = u32::from(self.prefix_len.min(24));
        if p == 0 {
            0
        } else {
            (0xFF_FFFF << (24 - p)) & 0xFF_FFFF
        }
    }

    /// Whether a packet with this protocol and port (ICMP type for ICMP) falls in the key's
    /// protocol/port prefix. Identity and direction are not compared.
    pub fn matches_port(&self, protocol: u8, port: u16) -> bool {
        let v = (u32::from(protocol) << 16) | u32::from(port);
        v & self.mask24() == self.value24()
    }

    /// Whether this key's space contains `other`'s: same direction, same identity or this one
    /// is [`Identity::ANY`], and this prefix is no longer than other's and agrees with it.
    pub fn covers(&self, other: &PolicyKey) -> bool {
        self.direction == other.direction
            && (self.identity == other.identity || self.identity == Identity::ANY)
            && self.prefix_len <= other.prefix_len
            && other.value24() & self.mask24() == self.value24()
    }
}

/// Splits the inclusive port range `[lo, hi]` into the fewest power-of-two aligned blocks.
///
/// Each block is returned as `(first port, key prefix length)` where the prefix length counts
/// the 8 protocol bits too (8 = all 65536 ports, 24 = one port), ready for [`PolicyKey::new`].
/// An empty range (`lo > hi`) yields nothing.
pub fn port_range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    if lo > hi {
        return out;
    }
    let (mut start, end) = (u32::from(lo), u32::from(hi));
    while start <= end {
        // The largest aligned block starting at `start` that does not pass `end`.
        let mut size: u32 = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros().min(16)
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        let bits = size.trailing_zeros() as u8; // wildcarded port bits, 0..=16
        out.push((start as u16, 24 - bits));
        start += size;
    }
    out
}

/// What a matching entry does with the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryAction {
    /// Allow.
    Allow,
    /// Deny with [`DROP_POLICY_DENY`].
    Deny,
    /// Allow, but steer the connection to the local proxy listening on `proxy_port`.
    Redirect {
        /// The proxy's port.
        proxy_port: u16,
        /// Listener priority: the higher wins when several redirect entries match.
        priority: u8,
    },
}

impl EntryAction {
    /// Whether this is [`EntryAction::Deny`].
    pub fn is_deny(self) -> bool {
        matches!(self, EntryAction::Deny)
    }

    /// The proxy port, 0 when the entry does not redirect (as the kernel value stores it).
    pub fn proxy_port(self) -> u16 {
        match self {
            EntryAction::Redirect { proxy_port, .. } => proxy_port,
            _ => 0,
        }
    }

    /// The redirect priority, `None` when the entry does not redirect.
    pub fn redirect_priority(self) -> Option<u8> {
        match self {
            EntryAction::Redirect { priority, .. } => Some(priority),
            _ => None,
        }
    }
}

/// The rules behind a [`PolicyEntry`], shared between the entries they produced.
pub type RuleSet = Arc<BTreeSet<Arc<RuleRef>>>;

/// A policy map value, with the rules that produced it (for explanations and dumps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    /// What the entry does.
    pub action: EntryAction,
    /// The rules that produced the entry (empty for synthesised entries such as allow-all
    /// when a direction is not enforced, or host-to-local-endpoint access). Shared, set and
    /// rules alike: the entries of many identities come from the same rules, and a compile's
    /// output would otherwise be dominated by copies of these sets.
    pub derived_from: RuleSet,
}

/// The per-endpoint policy map.
///
/// **Pre-resolution invariant** (checked by [`MapState::deny_violations`]): no non-deny entry
/// is covered ([`PolicyKey::covers`]) by a deny entry. The compiler turns every covered allow or
/// redirect into a deny. With it, the two-lookup kernel algorithm in [`crate::decide`] denies a
/// packet exactly when some deny entry matches it: the longest match among the keys of the
/// deny's identity (or among the wildcard keys, for a wildcard deny) is at least as long as the
/// deny, so it is covered by it, so it is itself a deny.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// The entries.
    pub entries: BTreeMap<PolicyKey, PolicyEntry>,
}

/// The change from one MapState to another: apply `upserts` first, then `removals`, so that
/// no packet ever sees a state that is neither the old nor the new policy's decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapStateDiff {
    /// Entries to insert or overwrite.
    pub upserts: Vec<(PolicyKey, PolicyEntry)>,
    /// Keys to delete.
    pub removals: Vec<PolicyKey>,
}

impl MapStateDiff {
    /// Whether the diff changes nothing.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

impl MapState {
    /// An empty map.
    pub fn new() -> Self {
        MapState::default()
    }

    /// The entry at exactly this key.
    pub fn get(&self, key: &PolicyKey) -> Option<&PolicyEntry> {
        self.entries.get(key)
    }

    /// Inserts or replaces an entry.
    pub fn insert(&mut self, key: PolicyKey, entry: PolicyEntry) {
        self.entries.insert(key, entry);
    }

    /// Removes an entry.
    pub fn remove(&mut self, key: &PolicyKey) -> Option<PolicyEntry> {
        self.entries.remove(key)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&PolicyKey, &PolicyEntry)> {
        self.entries.iter()
    }

    /// The entries whose remote identity is `identity` (all directions), in key order.
    pub fn entries_for_identity(
        &self,
        identity: Identity,
    ) -> impl Iterator<Item = (&PolicyKey, &PolicyEntry)> {
        let lo = PolicyKey {
            identity,
            direction: Direction::Ingress,
            protocol: 0,
            port: 0,
            prefix_len: 0,
        };
        self.entries
            .range(lo..)
            .take_while(move |(k, _)| k.identity == identity)
    }

    /// The longest-prefix entry for exactly this remote identity (no fallback to
    /// [`Identity::ANY`]) and direction whose protocol/port prefix matches: one probe per
    /// possible prefix length, longest first.
    pub fn lookup_lpm(
        &self,
        identity: Identity,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Option<(&PolicyKey, &PolicyEntry)> {
        PREFIX_LENGTHS.iter().rev().find_map(|&p| {
            self.entries
                .get_key_value(&PolicyKey::new(identity, direction, protocol, port, p))
        })
    }

    /// The deny entries covering `key` (at `key`'s identity or the wildcard identity, with a
    /// prefix no longer than `key`'s), found by probing each shorter prefix.
    pub fn covering_denies<'a>(
        &'a self,
        key: &'a PolicyKey,
    ) -> impl Iterator<Item = (&'a PolicyKey, &'a PolicyEntry)> + 'a {
        let n = if key.identity == Identity::ANY { 1 } else { 2 };
        [Identity::ANY, key.identity]
            .into_iter()
            .take(n)
            .flat_map(move |id| {
                PREFIX_LENGTHS
                    .iter()
                    .filter(move |&&p| p <= key.prefix_len)
                    .map(move |&p| PolicyKey::new(id, key.direction, key.protocol, key.port, p))
            })
            .filter_map(move |k| self.entries.get_key_value(&k))
            .filter(|(_, e)| e.action.is_deny())
    }

    /// Pairs `(deny key, other key)` that break the pre-resolution invariant: a non-deny entry
    /// covered by a deny entry. Empty for every map the compiler produces.
    pub fn deny_violations(&self) -> Vec<(PolicyKey, PolicyKey)> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.action.is_deny())
            .flat_map(|(k, _)| self.covering_denies(k).map(move |(d, _)| (*d, *k)))
            .collect()
    }

    /// What to do to turn `self` into `new`.
    pub fn diff(&self, new: &MapState) -> MapStateDiff {
        let mut d = MapStateDiff::default();
        for (k, e) in &new.entries {
            if self.entries.get(k) != Some(e) {
                d.upserts.push((*k, e.clone()));
            }
        }
        for k in self.entries.keys() {
            if !new.entries.contains_key(k) {
                d.removals.push(*k);
            }
        }
        d
    }

    /// Applies a diff: upserts first, then removals.
    pub fn apply(&mut self, diff: &MapStateDiff) {
        for (k, e) in &diff.upserts {
            self.entries.insert(*k, e.clone());
        }
        for k in &diff.removals {
            self.entries.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_into_aligned_blocks() {
        assert_eq!(port_range_prefixes(80, 80), vec![(80, 24)]);
        assert_eq!(port_range_prefixes(0, 65535), vec![(0, 8)]);
        assert_eq!(port_range_prefixes(8080, 8083), vec![(8080, 22)]);
        assert_eq!(
            port_range_prefixes(1, 6),
            vec![(1, 24), (2, 23), (4, 23), (6, 24)]
        );
        assert_eq!(port_range_prefixes(65535, 65535), vec![(65535, 24)]);
        assert_eq!(port_range_prefixes(32768, 65535), vec![(32768, 9)]);
        assert!(port_range_prefixes(5, 4).is_empty());
    }

    #[test]
    fn key_normalisation_and_cover() {
        let k = PolicyKey::new(Identity(5), Direction::Ingress, 6, 8081, 22);
        assert_eq!(k.port, 8080);
        assert!(k.matches_port(6, 8083));
        assert!(!k.matches_port(6, 8084));
        assert!(!k.matches_port(17, 8080));
        let all = PolicyKey::l3(Identity::ANY, Direction::Ingress);
        assert!(all.covers(&k));
        assert!(!k.covers(&all));
        let tcp = PolicyKey::new(Identity(5), Direction::Ingress, 6, 9, 8);
        assert_eq!(tcp.port, 0);
        assert!(tcp.covers(&k));
        assert!(!tcp.covers(&PolicyKey::new(Identity(6), Direction::Ingress, 6, 80, 24)));
        assert_eq!(
            PolicyKey::new(Identity(1), Direction::Egress, 6, 80, 3).prefix_len,
            0
        );
    }

    proptest::proptest! {
        #[test]
        fn range_blocks_cover_exactly(lo in 0u16.., len in 0u16..3000) {
            let hi = lo.saturating_add(len);
            let blocks = port_range_prefixes(lo, hi);
            let mut next = u32::from(lo);
            for (start, p) in blocks {
                proptest::prop_assert_eq!(u32::from(start), next);
                let size = 1u32 << (24 - p);
                proptest::prop_assert_eq!(u32::from(start) % size, 0);
                next += size;
            }
            proptest::prop_assert_eq!(next, u32::from(hi) + 1);
        }
    }
}
