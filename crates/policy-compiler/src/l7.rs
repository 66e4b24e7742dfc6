//! Per-endpoint L7 policy: what the proxies enforce on connections the map redirects to them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use weir_identity::Identity;
use weir_l7_match::{DnsRule, HttpRule};
use weir_policy_model::{Direction, L7Rules, RuleRef};

/// The remote identities an L7 contribution applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L7Peers {
    /// Every remote identity.
    Wildcard,
    /// These identities.
    Set(BTreeSet<Identity>),
}

impl L7Peers {
    /// Whether `remote` is among the peers.
    pub fn contains(&self, remote: Identity) -> bool {
        match self {
            L7Peers::Wildcard => true,
            L7Peers::Set(s) => s.contains(&remote),
        }
    }
}

/// One allow that covers an L7 port: either L7 rules, or an L4 allow (which lets every request
/// through: "L4 allow shadows L7"). Equality ignores the internal origin number.
#[derive(Debug, Clone)]
pub struct L7Contribution {
    /// The remote identities it applies to.
    pub peers: L7Peers,
    /// The L7 rules; `None` for an L4 (or L3-only) allow, which allows every request.
    pub rules: Option<Arc<L7Rules>>,
    /// The rule it comes from; `None` for synthesised host access.
    pub derived_from: Option<Arc<RuleRef>>,
    /// Slot of the compiler's contribution it came from (for incremental updates);
    /// `usize::MAX` for synthesised ones.
    pub(crate) origin: usize,
}

impl PartialEq for L7Contribution {
    fn eq(&self, o: &Self) -> bool {
        self.peers == o.peers && self.rules == o.rules && self.derived_from == o.derived_from
    }
}

impl Eq for L7Contribution {}

/// The union of the L7 rules that apply to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L7RuleSet {
    /// HTTP rules (ORed), each with its rule.
    pub http: Vec<(HttpRule, Arc<RuleRef>)>,
    /// DNS rules (ORed), each with its rule.
    pub dns: Vec<(DnsRule, Arc<RuleRef>)>,
}

/// What a proxy must do with requests from one remote identity on one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L7Verdict {
    /// The port has no L7 rules for this direction: the map does not redirect it.
    NotRedirected,
    /// An L4 allow covers this peer and port: every request is allowed (still proxied).
    AllowAll {
        /// The L4 allows (empty for synthesised host access).
        derived_from: Vec<Arc<RuleRef>>,
    },
    /// Requests must match one of these rules.
    Rules(L7RuleSet),
    /// No allow for this peer covers the port.
    Denied,
}

/// Per endpoint, for every (direction, protocol, port) that carries L7 rules, every allow that
/// covers it. The synthesised allow-all of an unenforced or `enableDefaultDeny: false`
/// direction is never listed, so it never shadows L7 rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L7Policy {
    /// (direction, IP protocol, port) → contributions, in rule order.
    pub ports: BTreeMap<(Direction, u8, u16), Vec<L7Contribution>>,
}

impl L7Policy {
    /// The rules for a request from (ingress) or to (egress) `remote` on `protocol`/`port`.
    ///
    /// The union of all contributions whose peers include `remote`; if any of them has no L7
    /// rules, every request is allowed.
    pub fn verdict(
        &self,
        direction: Direction,
        remote: Identity,
        protocol: u8,
        port: u16,
    ) -> L7Verdict {
        let Some(list) = self.ports.get(&(direction, protocol, port)) else {
            return L7Verdict::NotRedirected;
        };
        let matching: Vec<&L7Contribution> =
            list.iter().filter(|c| c.peers.contains(remote)).collect();
        if matching.is_empty() {
            return L7Verdict::Denied;
        }
        if matching.iter().any(|c| c.rules.is_none()) {
            let derived_from = matching
                .iter()
                .filter(|c| c.rules.is_none())
                .filter_map(|c| c.derived_from.clone())
                .collect();
            return L7Verdict::AllowAll { derived_from };
        }
        let mut set = L7RuleSet::default();
        for c in matching {
            let (Some(rules), Some(r)) = (&c.rules, &c.derived_from) else {
                continue;
            };
            match rules.as_ref() {
                L7Rules::Http(h) => set.http.extend(h.iter().map(|x| (x.clone(), r.clone()))),
                L7Rules::Dns(d) => set.dns.extend(d.iter().map(|x| (x.clone(), r.clone()))),
            }
        }
        L7Verdict::Rules(set)
    }
}
