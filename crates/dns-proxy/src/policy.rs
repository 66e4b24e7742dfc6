//! The policy the DNS proxy enforces and the `toFQDNs` selectors it learns for: an immutable
//! snapshot, swapped atomically by the agent (the same model as the HTTP proxy's).
//!
//! Per endpoint, [`L7Policy::verdict`] gives the DNS rules for (server identity, protocol,
//! port); the compiled [`DnsMatcher`] is cached in the endpoint's entry, keyed by the set of
//! contributions that apply, so servers with the same rules share one matcher.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use weir_identity::Identity;
use weir_l7_match::{DnsMatcher, DnsRule, PatternError};
use weir_l7_proxy::EndpointId;
use weir_policy_compiler::{L7Policy, L7Verdict, proto};
use weir_policy_model::{Direction, RuleRef};

/// Above this many cached verdicts an endpoint's cache is cleared (bounds memory under a flood
/// of distinct server identities).
const MAX_CACHED_VERDICTS: usize = 4 * 1024;

/// The transport a query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// DNS over UDP.
    Udp,
    /// DNS over TCP (two-byte length prefix).
    Tcp,
}

impl Transport {
    /// The IP protocol number, as policy keys use it.
    pub fn protocol(self) -> u8 {
        match self {
            Transport::Udp => proto::UDP,
            Transport::Tcp => proto::TCP,
        }
    }

    /// `"udp"` or `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Why a query was denied (or not answered by forwarding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DnsDenyReason {
    /// No `matchName`/`matchPattern` of the applicable DNS rules matched the query name.
    NoRuleMatched,
    /// No allow covers this DNS server on the port.
    PeerNotAllowed,
    /// The client is not a local endpoint, the snapshot has no policy for it, or its policy
    /// does not redirect this port (the proxy fails closed).
    NoPolicy,
    /// The rules could not be compiled (fail closed).
    InvalidRules,
    /// A query class other than IN: DNS rules speak about Internet names only.
    UnsupportedClass,
}

impl DnsDenyReason {
    /// A short, stable name for logs and flows.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsDenyReason::NoRuleMatched => "no-rule-matched",
            DnsDenyReason::PeerNotAllowed => "peer-not-allowed",
            DnsDenyReason::NoPolicy => "no-policy",
            DnsDenyReason::InvalidRules => "invalid-rules",
            DnsDenyReason::UnsupportedClass => "unsupported-class",
        }
    }
}

/// The outcome of [`DnsPolicySnapshot::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDecision {
    /// `None` when allowed; the reason otherwise.
    pub denied: Option<DnsDenyReason>,
    /// The rule that allowed the query (for an L4 allow, the first such rule).
    pub rule: Option<Arc<RuleRef>>,
    /// `rule` as flows show it, formatted once when the rules were compiled.
    pub rule_text: Option<Arc<str>>,
}

impl DnsDecision {
    fn allow(rule: Option<&(Arc<RuleRef>, Arc<str>)>) -> Self {
        DnsDecision {
            denied: None,
            rule: rule.map(|(r, _)| r.clone()),
            rule_text: rule.map(|(_, t)| t.clone()),
        }
    }

    fn deny(reason: DnsDenyReason) -> Self {
        DnsDecision {
            denied: Some(reason),
            rule: None,
            rule_text: None,
        }
    }

    /// Whether the query may be forwarded.
    pub fn is_allowed(&self) -> bool {
        self.denied.is_none()
    }
}

/// The `toFQDNs` selectors in use on the node, compiled into one matcher.
#[derive(Debug, Clone, Default)]
pub struct FqdnSelectors {
    rules: Vec<DnsRule>,
    /// `None` when there are no selectors.
    matcher: Option<DnsMatcher>,
}

impl FqdnSelectors {
    /// Compiles selectors (duplicates are kept once).
    pub fn new(mut rules: Vec<DnsRule>) -> Result<Self, PatternError> {
        let mut seen = std::collections::HashSet::new();
        rules.retain(|r| seen.insert(r.clone()));
        let matcher = if rules.is_empty() {
            None
        } else {
            Some(DnsMatcher::compile(&rules)?)
        };
        Ok(FqdnSelectors { matcher, rules })
    }

    /// The selectors.
    pub fn rules(&self) -> &[DnsRule] {
        &self.rules
    }

    /// The selectors that select `name` (normalised first), in selector order.
    pub fn matching(&self, name: &str) -> Vec<DnsRule> {
        let Some(matcher) = &self.matcher else {
            return Vec::new();
        };
        matcher
            .matching_rules(name)
            .into_iter()
            .filter_map(|i| self.rules.get(i).cloned())
            .collect()
    }

    /// The selectors that select any of `names`, each once, in selector order.
    pub fn matching_any<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<DnsRule> {
        let Some(matcher) = &self.matcher else {
            return Vec::new();
        };
        let mut hit = vec![false; self.rules.len()];
        for n in names {
            for i in matcher.matching_rules(n) {
                if let Some(h) = hit.get_mut(i) {
                    *h = true;
                }
            }
        }
        self.rules
            .iter()
            .zip(hit)
            .filter(|(_, h)| *h)
            .map(|(r, _)| r.clone())
            .collect()
    }
}

/// The DNS policy of every local endpoint, and the node's `toFQDNs` selectors, at one moment.
/// Cheap to clone (entries are shared).
#[derive(Debug, Clone, Default)]
pub struct DnsPolicySnapshot {
    endpoints: HashMap<EndpointId, Arc<EndpointEntry>>,
    selectors: Arc<FqdnSelectors>,
}

impl DnsPolicySnapshot {
    /// No endpoints, no selectors: every query is refused (fail closed).
    pub fn empty() -> Self {
        DnsPolicySnapshot::default()
    }

    /// This snapshot with `endpoint`'s L7 policy set (other endpoints keep their matchers).
    pub fn with_endpoint(&self, endpoint: EndpointId, policy: Arc<L7Policy>) -> Self {
        let mut next = self.clone();
        next.endpoints
            .insert(endpoint, Arc::new(EndpointEntry::new(policy)));
        next
    }

    /// This snapshot without `endpoint`: its queries are refused from then on.
    pub fn without_endpoint(&self, endpoint: EndpointId) -> Self {
        let mut next = self.clone();
        next.endpoints.remove(&endpoint);
        next
    }

    /// This snapshot with the node's `toFQDNs` selectors replaced.
    pub fn with_fqdn_selectors(&self, rules: Vec<DnsRule>) -> Result<Self, PatternError> {
        let mut next = self.clone();
        next.selectors = Arc::new(FqdnSelectors::new(rules)?);
        Ok(next)
    }

    /// The `toFQDNs` selectors.
    pub fn fqdn_selectors(&self) -> &FqdnSelectors {
        &self.selectors
    }

    /// The L7 policy of an endpoint, if the snapshot has one.
    pub fn endpoint(&self, endpoint: EndpointId) -> Option<&Arc<L7Policy>> {
        self.endpoints.get(&endpoint).map(|e| &e.policy)
    }

    /// Decides a query from `endpoint` to a DNS server with identity `server` on
    /// `transport`/`port`. `qname` is normalised (lower-cased, trailing dot) before matching.
    pub fn decide(
        &self,
        endpoint: EndpointId,
        server: Identity,
        transport: Transport,
        port: u16,
        qname: &str,
    ) -> DnsDecision {
        let Some(entry) = self.endpoints.get(&endpoint) else {
            return DnsDecision::deny(DnsDenyReason::NoPolicy);
        };
        entry
            .verdict(server, transport.protocol(), port)
            .decide(qname)
    }
}

/// The compiled form of one [`L7Verdict`].
#[derive(Debug)]
enum CompiledVerdict {
    AllowAll(Option<(Arc<RuleRef>, Arc<str>)>),
    Rules {
        matcher: DnsMatcher,
        refs: Vec<(Arc<RuleRef>, Arc<str>)>,
    },
    Denied(DnsDenyReason),
}

impl CompiledVerdict {
    fn compile(v: L7Verdict) -> Self {
        match v {
            L7Verdict::NotRedirected => CompiledVerdict::Denied(DnsDenyReason::NoPolicy),
            L7Verdict::Denied => CompiledVerdict::Denied(DnsDenyReason::PeerNotAllowed),
            L7Verdict::AllowAll { derived_from } => {
                CompiledVerdict::AllowAll(derived_from.into_iter().next().map(with_text))
            }
            // HTTP rules on the port are not for this proxy, and an empty DNS rule list
            // matches nothing: refuse.
            L7Verdict::Rules(set) if set.dns.is_empty() => {
                CompiledVerdict::Denied(DnsDenyReason::NoPolicy)
            }
            L7Verdict::Rules(set) => {
                let (rules, refs): (Vec<_>, Vec<_>) = set.dns.into_iter().unzip();
                match DnsMatcher::compile(&rules) {
                    Ok(matcher) => CompiledVerdict::Rules {
                        matcher,
                        refs: refs.into_iter().map(with_text).collect(),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "DNS rules do not compile; refusing");
                        CompiledVerdict::Denied(DnsDenyReason::InvalidRules)
                    }
                }
            }
        }
    }

    fn decide(&self, qname: &str) -> DnsDecision {
        match self {
            CompiledVerdict::AllowAll(rule) => DnsDecision::allow(rule.as_ref()),
            CompiledVerdict::Denied(reason) => DnsDecision::deny(*reason),
            CompiledVerdict::Rules { matcher, refs } => match matcher.matches(qname) {
                None => DnsDecision::deny(DnsDenyReason::NoRuleMatched),
                Some(i) => DnsDecision::allow(refs.get(i)),
            },
        }
    }
}

/// A rule reference with its text for flows.
fn with_text(rule: Arc<RuleRef>) -> (Arc<RuleRef>, Arc<str>) {
    let text = Arc::from(rule.to_string());
    (rule, text)
}

type VerdictKey = (u8, u16, Identity);
type SubsetKey = (u8, u16, Vec<usize>);

#[derive(Default)]
struct Cache {
    by_identity: HashMap<VerdictKey, Arc<CompiledVerdict>>,
    by_subset: HashMap<SubsetKey, Arc<CompiledVerdict>>,
}

struct EndpointEntry {
    policy: Arc<L7Policy>,
    cache: RwLock<Cache>,
}

impl fmt::Debug for EndpointEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointEntry")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl EndpointEntry {
    fn new(policy: Arc<L7Policy>) -> Self {
        EndpointEntry {
            policy,
            cache: RwLock::new(Cache::default()),
        }
    }

    fn compile(&self, server: Identity, protocol: u8, port: u16) -> Arc<CompiledVerdict> {
        Arc::new(CompiledVerdict::compile(self.policy.verdict(
            Direction::Egress,
            server,
            protocol,
            port,
        )))
    }

    fn verdict(&self, server: Identity, protocol: u8, port: u16) -> Arc<CompiledVerdict> {
        let key = (protocol, port, server);
        if let Ok(cache) = self.cache.read()
            && let Some(v) = cache.by_identity.get(&key)
        {
            return v.clone();
        }
        let subset: Vec<usize> = self
            .policy
            .ports
            .get(&(Direction::Egress, protocol, port))
            .map(|list| {
                list.iter()
                    .enumerate()
                    .filter(|(_, c)| c.peers.contains(server))
                    .map(|(i, _)| i)
                    .collect()
            })
            .unwrap_or_default();
        let Ok(mut cache) = self.cache.write() else {
            return self.compile(server, protocol, port);
        };
        if cache.by_identity.len() >= MAX_CACHED_VERDICTS {
            cache.by_identity.clear();
            cache.by_subset.clear();
        }
        let subset_key = (protocol, port, subset);
        let compiled = match cache.by_subset.get(&subset_key) {
            Some(v) => v.clone(),
            None => {
                let v = self.compile(server, protocol, port);
                cache.by_subset.insert(subset_key, v.clone());
                v
            }
        };
        cache.by_identity.insert(key, compiled.clone());
        compiled
    }
}

/// Where the agent publishes snapshots and the proxy reads them (an atomic pointer swap; a
/// new snapshot applies from the next query).
#[derive(Debug, Default)]
pub struct DnsPolicyStore {
    current: ArcSwap<DnsPolicySnapshot>,
}

impl DnsPolicyStore {
    /// A store holding `snapshot`.
    pub fn new(snapshot: DnsPolicySnapshot) -> Self {
        DnsPolicyStore {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<DnsPolicySnapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot.
    pub fn publish(&self, snapshot: DnsPolicySnapshot) {
        self.current.store(Arc::new(snapshot));
    }

    /// Derives a new snapshot from the current one and publishes it (retrying on a race).
    pub fn update(&self, f: impl Fn(&DnsPolicySnapshot) -> DnsPolicySnapshot) {
        self.current.rcu(|cur| f(cur));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_snapshot_refuses() {
        let s = DnsPolicySnapshot::empty();
        let d = s.decide(EndpointId(1), Identity(2), Transport::Udp, 53, "a.com");
        assert_eq!(d.denied, Some(DnsDenyReason::NoPolicy));
        let s = s.with_endpoint(EndpointId(1), Arc::default());
        let d = s.decide(EndpointId(1), Identity(2), Transport::Udp, 53, "a.com");
        assert_eq!(d.denied, Some(DnsDenyReason::NoPolicy));
    }

    #[test]
    fn selectors_match_any_name_of_a_chain() {
        let s = FqdnSelectors::new(vec![
            DnsRule::MatchName("api.github.com".into()),
            DnsRule::MatchPattern("*.amazonaws.com".into()),
            DnsRule::MatchName("api.github.com".into()),
        ])
        .unwrap_or_default();
        assert_eq!(s.rules().len(), 2);
        assert_eq!(s.matching("API.GitHub.com").len(), 1);
        assert!(s.matching("a.b.amazonaws.com.").is_empty());
        let any = s.matching_any(["x.example.", "s3.amazonaws.com.", "api.github.com."]);
        assert_eq!(any.len(), 2);
        assert!(FqdnSelectors::default().matching("a.").is_empty());
    }
}
