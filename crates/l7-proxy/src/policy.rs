//! The policy the proxy enforces: an immutable snapshot, swapped atomically by the agent.
//!
//! A snapshot maps each local endpoint to its compiled [`L7Policy`]. Matchers are compiled
//! lazily, once per (direction, port, set of contributions that apply to the remote identity),
//! and cached inside the endpoint's entry, so a request costs a lookup and a match. Entries are
//! shared between snapshots ([`PolicySnapshot::with_endpoint`]), so publishing a change to one
//! endpoint keeps every other endpoint's compiled matchers.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use weir_identity::Identity;
use weir_l7_match::{HttpMatcher, HttpRequestView, MismatchAction};
use weir_policy_compiler::{L7Policy, L7Verdict, proto};
use weir_policy_model::{Direction, RuleRef};

/// A local endpoint's id, as the agent numbers endpoints (Cilium's endpoint ids are 16-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(pub u16);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Above this many cached (direction, port, identity) verdicts an endpoint's cache is cleared,
/// so a flood of distinct remote identities cannot grow it without bound.
const MAX_CACHED_VERDICTS: usize = 16 * 1024;

/// The L7 policy of every local endpoint at one moment. Cheap to clone (entries are shared).
#[derive(Debug, Clone, Default)]
pub struct PolicySnapshot {
    endpoints: HashMap<EndpointId, Arc<EndpointEntry>>,
}

impl PolicySnapshot {
    /// A snapshot with no endpoints: every request is denied (fail closed).
    pub fn empty() -> Self {
        PolicySnapshot::default()
    }

    /// This snapshot with `endpoint`'s policy set to `policy` (other endpoints keep their
    /// compiled matchers).
    pub fn with_endpoint(&self, endpoint: EndpointId, policy: Arc<L7Policy>) -> Self {
        let mut next = self.clone();
        next.endpoints
            .insert(endpoint, Arc::new(EndpointEntry::new(policy)));
        next
    }

    /// This snapshot without `endpoint`: its requests are denied from then on.
    pub fn without_endpoint(&self, endpoint: EndpointId) -> Self {
        let mut next = self.clone();
        next.endpoints.remove(&endpoint);
        next
    }

    /// The L7 policy of an endpoint, if the snapshot has one.
    pub fn endpoint(&self, endpoint: EndpointId) -> Option<&Arc<L7Policy>> {
        self.endpoints.get(&endpoint).map(|e| &e.policy)
    }

    /// Decides one request on a connection to or from `endpoint`.
    ///
    /// Fails closed: no entry for the endpoint, or a port its policy does not redirect, denies.
    pub fn decide(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        remote: Identity,
        port: u16,
        request: &HttpRequestView<'_>,
    ) -> Decision {
        let Some(entry) = self.endpoints.get(&endpoint) else {
            return Decision::deny(DenyReason::NoPolicy, None);
        };
        entry.verdict(direction, remote, port).decide(request)
    }
}

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No rule matched the request.
    NoRuleMatched,
    /// No allow covers this remote identity on the port.
    PeerNotAllowed,
    /// The snapshot has no policy for the endpoint, or the endpoint's policy does not redirect
    /// the port to the proxy (the proxy fails closed rather than forwarding unchecked).
    NoPolicy,
    /// The rules could not be compiled (the policy is rejected as a whole: fail closed).
    InvalidRules,
    /// The request is ambiguous, so no rule can safely decide it (more than one `Host`
    /// header): answered `400`, never forwarded.
    MalformedRequest,
}

impl DenyReason {
    /// A short, stable name for logs and flows.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoRuleMatched => "no-rule-matched",
            DenyReason::PeerNotAllowed => "peer-not-allowed",
            DenyReason::NoPolicy => "no-policy",
            DenyReason::InvalidRules => "invalid-rules",
            DenyReason::MalformedRequest => "malformed-request",
        }
    }
}

/// A header change a matching `headerMatches` entry asks for (mismatch action other than
/// `Fail`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderAction {
    /// What to do.
    pub action: MismatchAction,
    /// Header name.
    pub name: String,
    /// The value the rule expects (set by `Add` and `Replace`).
    pub value: Option<String>,
}

/// The outcome of [`PolicySnapshot::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `None` when allowed; the reason otherwise.
    pub denied: Option<DenyReason>,
    /// The rule that allowed the request (for an L4 allow that shadows L7, the first such
    /// rule); `None` for a denial or a synthesised allow.
    pub rule: Option<Arc<RuleRef>>,
    /// Header changes to make before forwarding (allowed requests only).
    pub header_actions: Vec<HeaderAction>,
}

impl Decision {
    fn allow(rule: Option<Arc<RuleRef>>) -> Self {
        Decision {
            denied: None,
            rule,
            header_actions: Vec::new(),
        }
    }

    fn deny(reason: DenyReason, rule: Option<Arc<RuleRef>>) -> Self {
        Decision {
            denied: Some(reason),
            rule,
            header_actions: Vec::new(),
        }
    }

    /// Whether the request may be forwarded.
    pub fn is_allowed(&self) -> bool {
        self.denied.is_none()
    }
}

/// The compiled form of one [`L7Verdict`].
#[derive(Debug)]
enum CompiledVerdict {
    AllowAll(Option<Arc<RuleRef>>),
    Rules {
        matcher: HttpMatcher,
        refs: Vec<Arc<RuleRef>>,
    },
    Denied(DenyReason),
}

impl CompiledVerdict {
    fn compile(v: L7Verdict) -> Self {
        match v {
            L7Verdict::NotRedirected => CompiledVerdict::Denied(DenyReason::NoPolicy),
            L7Verdict::Denied => CompiledVerdict::Denied(DenyReason::PeerNotAllowed),
            L7Verdict::AllowAll { derived_from } => {
                CompiledVerdict::AllowAll(derived_from.into_iter().next())
            }
            // A port whose rules are all DNS rules is not for the HTTP proxy; an empty
            // `HttpMatcher` would allow everything, so refuse it here.
            L7Verdict::Rules(set) if set.http.is_empty() && !set.dns.is_empty() => {
                CompiledVerdict::Denied(DenyReason::NoPolicy)
            }
            L7Verdict::Rules(set) => {
                let (rules, refs): (Vec<_>, Vec<_>) = set.http.into_iter().unzip();
                match HttpMatcher::compile(&rules) {
                    Ok(matcher) => CompiledVerdict::Rules { matcher, refs },
                    Err(e) => {
                        tracing::warn!(error = %e, "L7 rules do not compile; denying");
                        CompiledVerdict::Denied(DenyReason::InvalidRules)
                    }
                }
            }
        }
    }

    fn decide(&self, request: &HttpRequestView<'_>) -> Decision {
        match self {
            CompiledVerdict::AllowAll(rule) => Decision::allow(rule.clone()),
            CompiledVerdict::Denied(reason) => Decision::deny(*reason, None),
            CompiledVerdict::Rules { matcher, refs } => match matcher.evaluate(request) {
                None => Decision::deny(DenyReason::NoRuleMatched, None),
                Some(m) => {
                    // An empty rule list compiles to one allow-all rule with no ref.
                    let mut d = Decision::allow(refs.get(m.rule).cloned());
                    d.header_actions = m
                        .mismatches
                        .iter()
                        .map(|x| HeaderAction {
                            action: x.action(),
                            name: x.header.name.clone(),
                            value: x.header.value.clone(),
                        })
                        .collect();
                    d
                }
            },
        }
    }
}

type VerdictKey = (Direction, u16, Identity);
/// (direction, port, indices of the contributions that apply): identities with the same key
/// share one compiled matcher.
type SubsetKey = (Direction, u16, Vec<usize>);

#[derive(Default)]
struct Cache {
    by_identity: HashMap<VerdictKey, Arc<CompiledVerdict>>,
    by_subset: HashMap<SubsetKey, Arc<CompiledVerdict>>,
}

/// One endpoint's policy and its compiled matchers.
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

    fn verdict(&self, direction: Direction, remote: Identity, port: u16) -> Arc<CompiledVerdict> {
        let key = (direction, port, remote);
        if let Ok(cache) = self.cache.read()
            && let Some(v) = cache.by_identity.get(&key)
        {
            return v.clone();
        }
        let subset: Vec<usize> = self
            .policy
            .ports
            .get(&(direction, proto::TCP, port))
            .map(|list| {
                list.iter()
                    .enumerate()
                    .filter(|(_, c)| c.peers.contains(remote))
                    .map(|(i, _)| i)
                    .collect()
            })
            .unwrap_or_default();
        let subset_key = (direction, port, subset);
        let Ok(mut cache) = self.cache.write() else {
            // A poisoned cache only costs a compile per request.
            return Arc::new(CompiledVerdict::compile(self.policy.verdict(
                direction,
                remote,
                proto::TCP,
                port,
            )));
        };
        if cache.by_identity.len() >= MAX_CACHED_VERDICTS {
            cache.by_identity.clear();
            cache.by_subset.clear();
        }
        let compiled = match cache.by_subset.get(&subset_key) {
            Some(v) => v.clone(),
            None => {
                let v = Arc::new(CompiledVerdict::compile(self.policy.verdict(
                    direction,
                    remote,
                    proto::TCP,
                    port,
                )));
                cache.by_subset.insert(subset_key, v.clone());
                v
            }
        };
        cache.by_identity.insert(key, compiled.clone());
        compiled
    }
}

/// Where the agent publishes snapshots and the proxy reads them: an atomic pointer swap.
/// Every request loads the current snapshot, so a swap applies to the next request, on new
/// and existing connections alike.
#[derive(Debug, Default)]
pub struct PolicyStore {
    current: ArcSwap<PolicySnapshot>,
}

impl PolicyStore {
    /// A store holding `snapshot`.
    pub fn new(snapshot: PolicySnapshot) -> Self {
        PolicyStore {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<PolicySnapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot.
    pub fn publish(&self, snapshot: PolicySnapshot) {
        self.current.store(Arc::new(snapshot));
    }

    /// Derives a new snapshot from the current one and publishes it (retrying if another
    /// publisher raced).
    pub fn update(&self, f: impl Fn(&PolicySnapshot) -> PolicySnapshot) {
        self.current.rcu(|cur| f(cur));
    }

    pub(crate) fn decide(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        remote: Identity,
        port: u16,
        request: &HttpRequestView<'_>,
    ) -> Decision {
        self.current
            .load()
            .decide(endpoint, direction, remote, port, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_snapshot_fails_closed() {
        let view = HttpRequestView {
            method: "GET",
            path: "/",
            host: None,
            headers: &[],
        };
        let d = PolicySnapshot::empty().decide(
            EndpointId(1),
            Direction::Ingress,
            Identity(1000),
            80,
            &view,
        );
        assert_eq!(d.denied, Some(DenyReason::NoPolicy));
        let with = PolicySnapshot::empty().with_endpoint(EndpointId(1), Arc::default());
        let d = with.decide(EndpointId(1), Direction::Ingress, Identity(1000), 80, &view);
        assert_eq!(d.denied, Some(DenyReason::NoPolicy), "port not redirected");
        assert!(
            with.without_endpoint(EndpointId(1))
                .endpoint(EndpointId(1))
                .is_none()
        );
    }

    /// Identities to which the same contributions apply share one compiled matcher.
    #[test]
    fn matchers_are_shared_between_identities() {
        use weir_identity::{LabelFilter, pod_identity_labels};
        use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, NamedPorts};
        let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: ns}\nspec:\n  endpointSelector: {matchLabels: {app: srv}}\n  ingress:\n  - toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n      rules: {http: [{method: GET}]}\n";
        let filter = LabelFilter::default();
        let labels = |app: &str| {
            pod_identity_labels(
                "ns",
                [("app", app)],
                [("k", "v")],
                "default",
                "default",
                &filter,
            )
        };
        let mut c = Compiler::new(CompilerConfig::default());
        c.upsert_identity(Identity(1000), labels("srv"), NamedPorts::new());
        let policies = weir_policy_model::parse_policies("t.yaml", yaml);
        assert!(policies.is_ok(), "{policies:?}");
        for p in policies.unwrap_or_default() {
            c.upsert_policy(p);
        }
        let ep = EndpointInfo {
            identity: Identity(1000),
            labels: labels("srv"),
            named_ports: NamedPorts::new(),
        };
        let entry = EndpointEntry::new(Arc::new(c.compile(&ep).l7));
        let a = entry.verdict(Direction::Ingress, Identity(2000), 80);
        let b = entry.verdict(Direction::Ingress, Identity(3000), 80);
        assert!(Arc::ptr_eq(&a, &b));
        let get = HttpRequestView {
            method: "GET",
            path: "/x",
            host: None,
            headers: &[],
        };
        assert!(a.decide(&get).is_allowed());
        assert!(
            !a.decide(&HttpRequestView {
                method: "PUT",
                ..get
            })
            .is_allowed()
        );
    }
}
