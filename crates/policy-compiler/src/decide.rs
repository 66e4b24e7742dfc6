//! The kernel policy lookup, as a pure function: the oracle every datapath test compares with.

use std::fmt;
use std::sync::Arc;

use weir_identity::Identity;
use weir_policy_model::{Direction, PolicyName, RuleRef};

use crate::mapstate::{
    DROP_POLICY_DENIED, DROP_POLICY_DENY, EntryAction, MapState, PolicyEntry, PolicyKey,
};

/// A new connection's first packet as the policy lookup sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// Direction as seen from the endpoint whose map is consulted.
    pub direction: Direction,
    /// The remote identity (source for ingress, destination for egress).
    pub remote: Identity,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port; the ICMP type for ICMP/ICMPv6.
    pub port: u16,
}

/// What happens to the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Forwarded.
    Allow,
    /// Forwarded to the local proxy on this port.
    Redirect {
        /// The proxy's port.
        proxy_port: u16,
    },
    /// Dropped with this drop reason ([`DROP_POLICY_DENIED`] or [`DROP_POLICY_DENY`]).
    Deny {
        /// Cilium's drop reason code.
        reason: u8,
    },
}

/// The verdict with the entry and rules behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What happens.
    pub verdict: Verdict,
    /// The map entry that decided; `None` for a default deny.
    pub key: Option<PolicyKey>,
    /// The rules behind that entry.
    pub derived_from: Vec<Arc<RuleRef>>,
    /// For a default deny: the policies that select the endpoint in this direction (filled by
    /// [`crate::EndpointPolicy::decide`]; the bare [`decide`] knows only the map).
    pub selected_by: Vec<PolicyName>,
}

impl Decision {
    /// Whether the packet is forwarded (directly or through a proxy).
    pub fn is_allowed(&self) -> bool {
        !matches!(self.verdict, Verdict::Deny { .. })
    }
}

impl fmt::Display for Decision {
    /// A one-line explanation, e.g. `denied (default deny): selected by production/deny-all;
    /// no rule allowed this`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules = |f: &mut fmt::Formatter<'_>| -> fmt::Result {
            if self.derived_from.is_empty() {
                return Ok(());
            }
            f.write_str(" by ")?;
            for (i, r) in self.derived_from.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{r}")?;
            }
            Ok(())
        };
        match self.verdict {
            Verdict::Allow => {
                f.write_str("allowed")?;
                rules(f)
            }
            Verdict::Redirect { proxy_port } => {
                write!(f, "redirected to proxy port {proxy_port}")?;
                rules(f)
            }
            Verdict::Deny { reason } if reason == DROP_POLICY_DENY => {
                f.write_str("denied (deny rule)")?;
                rules(f)
            }
            Verdict::Deny { .. } => {
                f.write_str("denied (default deny)")?;
                if !self.selected_by.is_empty() {
                    f.write_str(": selected by ")?;
                    for (i, p) in self.selected_by.iter().enumerate() {
                        if i > 0 {
                            f.write_str(", ")?;
                        }
                        write!(f, "{p}")?;
                    }
                }
                f.write_str("; no rule allowed this")
            }
        }
    }
}

/// Decides a new flow against a map, exactly as the kernel lookup does.
///
/// 1. Longest-prefix match among the entries with `key.identity == flow.remote` and the flow's
///    direction whose protocol/port prefix contains the flow's `protocol << 16 | port`.
/// 2. The same among the entries with [`Identity::ANY`].
/// 3. If either result is a deny entry → `Deny { reason: 181 }` (identity-specific deny
///    reported first). Otherwise, between the two results: a redirect beats an allow, the
///    higher redirect priority beats the lower; then the longer prefix wins; on a tie the
///    identity-specific entry wins. Its action gives `Allow` or `Redirect { proxy_port }`.
/// 4. No result at all → `Deny { reason: 133 }` (default deny), `key: None`.
///
/// The answer is only meaningful on maps that satisfy the pre-resolution invariant of
/// [`MapState`] (every compiled map does): then a packet is denied by an entry whenever any
/// deny entry matches it.
pub fn decide(map: &MapState, flow: &Flow) -> Decision {
    let specific = if flow.remote == Identity::ANY {
        None
    } else {
        map.lookup_lpm(flow.remote, flow.direction, flow.protocol, flow.port)
    };
    let wildcard = map.lookup_lpm(Identity::ANY, flow.direction, flow.protocol, flow.port);
    let chosen = match (specific, wildcard) {
        (None, None) => {
            return Decision {
                verdict: Verdict::Deny {
                    reason: DROP_POLICY_DENIED,
                },
                key: None,
                derived_from: Vec::new(),
                selected_by: Vec::new(),
            };
        }
        (Some(s), None) => s,
        (None, Some(w)) => w,
        (Some(s), Some(w)) => choose(s, w),
    };
    let (key, entry) = chosen;
    let verdict = match entry.action {
        EntryAction::Deny => Verdict::Deny {
            reason: DROP_POLICY_DENY,
        },
        EntryAction::Allow => Verdict::Allow,
        EntryAction::Redirect { proxy_port, .. } => Verdict::Redirect { proxy_port },
    };
    Decision {
        verdict,
        key: Some(*key),
        derived_from: entry.derived_from.iter().cloned().collect(),
        selected_by: Vec::new(),
    }
}

type Hit<'a> = (&'a PolicyKey, &'a PolicyEntry);

/// Picks between the identity-specific hit `s` and the wildcard hit `w`.
fn choose<'a>(s: Hit<'a>, w: Hit<'a>) -> Hit<'a> {
    if s.1.action.is_deny() {
        return s;
    }
    if w.1.action.is_deny() {
        return w;
    }
    // `None < Some(_)`, so any redirect beats an allow, then the higher priority wins.
    let rank = |h: &Hit<'_>| (h.1.action.redirect_priority(), h.0.prefix_len);
    if rank(&w) > rank(&s) { w } else { s }
}
