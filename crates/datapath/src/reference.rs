//! A plain-Rust model of the kernel's two-lookup policy rule, for tests of kernel backends
//! (the compiler's `decide` is the project-wide oracle; this model must agree with it).

use weir_identity::Identity;
use weir_policy_compiler::{
    DROP_POLICY_DENIED, DROP_POLICY_DENY, EntryAction, MapState, PolicyEntry, PolicyKey,
};
use weir_policy_model::Direction;

use crate::Verdict;

/// A flow as the policy lookup sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// Remote identity (destination for egress, source for ingress).
    pub remote: Identity,
    /// Direction from the endpoint's view.
    pub direction: Direction,
    /// IP protocol.
    pub protocol: u8,
    /// Destination port, or ICMP type.
    pub port: u16,
}

/// Whether `key` (an entry) covers `proto<<16|port` under its prefix.
fn covers(key: &PolicyKey, protocol: u8, port: u16) -> bool {
    let bits = u32::from(key.prefix_len.min(24));
    if bits == 0 {
        return true;
    }
    let mask = (u32::MAX << (24 - bits)) & 0x00ff_ffff;
    let want = ((u32::from(protocol) << 16) | u32::from(port)) & mask;
    let have = ((u32::from(key.protocol) << 16) | u32::from(key.port)) & mask;
    want == have
}

/// Longest-prefix match among the entries of `identity` and `direction`.
fn lpm<'a>(
    map: &'a MapState,
    identity: Identity,
    flow: &FlowKey,
) -> Option<(&'a PolicyKey, &'a PolicyEntry)> {
    map.entries
        .iter()
        .filter(|(k, _)| {
            k.identity == identity
                && k.direction == flow.direction
                && covers(k, flow.protocol, flow.port)
        })
        .max_by_key(|(k, _)| k.prefix_len)
}

/// The verdict of the two-lookup rule: deny from either lookup wins (181); then a redirect
/// (higher priority among two); then the longer prefix; a tie goes to the identity-specific
/// entry; no entry drops with 133.
pub fn decide(map: &MapState, flow: &FlowKey) -> Verdict {
    let a = lpm(map, flow.remote, flow);
    let b = lpm(map, Identity::ANY, flow);
    let chosen = match (a, b) {
        (None, None) => {
            return Verdict::Drop {
                reason: DROP_POLICY_DENIED,
            };
        }
        (Some(x), None) | (None, Some(x)) => x,
        (Some(a), Some(b)) => {
            if a.1.action == EntryAction::Deny || b.1.action == EntryAction::Deny {
                return Verdict::Drop {
                    reason: DROP_POLICY_DENY,
                };
            }
            match (a.1.action, b.1.action) {
                (EntryAction::Redirect { .. }, EntryAction::Allow) => a,
                (EntryAction::Allow, EntryAction::Redirect { .. }) => b,
                (
                    EntryAction::Redirect { priority: pa, .. },
                    EntryAction::Redirect { priority: pb, .. },
                ) if pa != pb => {
                    if pa > pb {
                        a
                    } else {
                        b
                    }
                }
                _ => {
                    if b.0.prefix_len > a.0.prefix_len {
                        b
                    } else {
                        a
                    }
                }
            }
        }
    };
    match chosen.1.action {
        EntryAction::Allow => Verdict::Allow,
        EntryAction::Redirect { proxy_port, .. } => Verdict::Redirect { proxy_port },
        EntryAction::Deny => Verdict::Drop {
            reason: DROP_POLICY_DENY,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn entry(action: EntryAction) -> PolicyEntry {
        PolicyEntry {
            action,
            derived_from: BTreeSet::new(),
        }
    }

    fn key(identity: u32, protocol: u8, port: u16, prefix_len: u8) -> PolicyKey {
        PolicyKey {
            identity: Identity(identity),
            direction: Direction::Ingress,
            protocol,
            port,
            prefix_len,
        }
    }

    fn flow(remote: u32, protocol: u8, port: u16) -> FlowKey {
        FlowKey {
            remote: Identity(remote),
            direction: Direction::Ingress,
            protocol,
            port,
        }
    }

    #[test]
    fn rules() {
        let mut m = MapState::default();
        assert_eq!(decide(&m, &flow(300, 6, 80)), Verdict::Drop { reason: 133 });
        m.entries
            .insert(key(300, 6, 80, 24), entry(EntryAction::Allow));
        assert_eq!(decide(&m, &flow(300, 6, 80)), Verdict::Allow);
        assert_eq!(decide(&m, &flow(301, 6, 80)), Verdict::Drop { reason: 133 });
        m.entries.insert(key(0, 6, 0, 8), entry(EntryAction::Deny));
        assert_eq!(decide(&m, &flow(300, 6, 80)), Verdict::Drop { reason: 181 });
        m.entries.clear();
        m.entries
            .insert(key(0, 6, 0x1f00, 16), entry(EntryAction::Allow)); // 7936-8191
        assert_eq!(decide(&m, &flow(5, 6, 8080)), Verdict::Allow);
        assert_eq!(decide(&m, &flow(5, 6, 8192)), Verdict::Drop { reason: 133 });
        m.entries.insert(
            key(5, 0, 0, 0),
            entry(EntryAction::Redirect {
                proxy_port: 15001,
                priority: 1,
            }),
        );
        assert_eq!(
            decide(&m, &flow(5, 6, 8080)),
            Verdict::Redirect { proxy_port: 15001 }
        );
    }
}
