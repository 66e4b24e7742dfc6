//! What the agent hands its L7 proxies: an IP → identity resolver, the HTTP and DNS policy
//! stores, the DNS name cache, and the [`DnsLearner`] that turns DNS answers into access.
//!
//! The [`Manager`] publishes a new [`ResolverSnapshot`] and new policy snapshots after every
//! change (arc-swap), so the proxies read them per request without taking the manager's lock.
//! Only learning (once per DNS answer that a `toFQDNs` selector selects) takes the lock,
//! because it changes identities and the kernel maps.
//!
//! # Endpoint ids
//!
//! The datapath numbers endpoints with `weir_datapath::EndpointId(u32)`, the proxies with
//! `weir_l7_proxy::EndpointId(u16)` (Cilium's endpoint ids are 16-bit). The manager only hands
//! out ids in `1..u16::MAX`, so the conversion is the plain numeric one
//! ([`proxy_endpoint_id`], [`datapath_endpoint_id`]); an id that does not fit (impossible
//! unless state was edited by hand) is left out of the proxies' snapshots, so its requests
//! are denied (fail closed).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::Mutex;
use weir_datapath::{Datapath, EndpointId};
use weir_datapath_abi::{MARK_MAGIC_FROM_INGRESS_PROXY, egress_proxy_mark};
use weir_dns_proxy::{DnsLearner, DnsPolicyStore, LearnError, LearnFuture, Learned, NameCache};
use weir_identity::{Identity, ReservedIdentity};
use weir_l7_proxy::{
    ConnectionContext, EndpointId as ProxyEndpointId, IdentityResolver, PolicyStore, UpstreamMark,
};
use weir_policy_model::Direction;

use crate::manager::Manager;

/// The proxies' id of a datapath endpoint (`None` above `u16::MAX`).
pub fn proxy_endpoint_id(id: EndpointId) -> Option<ProxyEndpointId> {
    u16::try_from(id.0).ok().map(ProxyEndpointId)
}

/// The datapath's id of a proxy endpoint id.
pub fn datapath_endpoint_id(id: ProxyEndpointId) -> EndpointId {
    EndpointId(u32::from(id.0))
}

/// IP → identity and IP → local endpoint at one moment, as the kernel's ipcache sees it:
/// exact host entries (endpoint addresses, learned FQDN addresses) first, then the longest
/// policy CIDR prefix, then `world`.
#[derive(Debug, Clone, Default)]
pub struct ResolverSnapshot {
    hosts: HashMap<IpAddr, Identity>,
    endpoints: HashMap<IpAddr, ProxyEndpointId>,
    /// Sorted by prefix length, longest first.
    prefixes: Vec<(IpNet, Identity)>,
}

impl ResolverSnapshot {
    /// A snapshot from the local endpoints' addresses, host entries and CIDR prefixes.
    /// Endpoint addresses win over any other entry for the same address.
    pub fn new(
        endpoints: impl IntoIterator<Item = (IpAddr, ProxyEndpointId, Identity)>,
        hosts: impl IntoIterator<Item = (IpAddr, Identity)>,
        prefixes: impl IntoIterator<Item = (IpNet, Identity)>,
    ) -> Self {
        let mut snap = ResolverSnapshot {
            hosts: hosts.into_iter().collect(),
            endpoints: HashMap::new(),
            prefixes: Vec::new(),
        };
        for (ip, ep, identity) in endpoints {
            snap.hosts.insert(ip, identity);
            snap.endpoints.insert(ip, ep);
        }
        for (net, identity) in prefixes {
            if net.prefix_len() == net.max_prefix_len() {
                snap.hosts.entry(net.addr()).or_insert(identity);
            } else {
                snap.prefixes.push((net, identity));
            }
        }
        snap.prefixes
            .sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        snap
    }

    /// The identity of `ip`; `world` when nothing covers it.
    pub fn identity(&self, ip: IpAddr) -> Identity {
        let ip = canonical(ip);
        if let Some(id) = self.hosts.get(&ip) {
            return *id;
        }
        self.prefixes
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, id)| *id)
            .unwrap_or(Identity::from(ReservedIdentity::World))
    }

    /// The local endpoint with address `ip`.
    pub fn local_endpoint(&self, ip: IpAddr) -> Option<ProxyEndpointId> {
        self.endpoints.get(&canonical(ip)).copied()
    }
}

/// IPv4-mapped IPv6 addresses (from a dual-stack socket) are looked up as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The agent's [`IdentityResolver`]: reads the latest published [`ResolverSnapshot`].
#[derive(Debug, Default)]
pub struct AgentIdentities {
    snapshot: ArcSwap<ResolverSnapshot>,
}

impl AgentIdentities {
    /// The current snapshot.
    pub fn load(&self) -> Arc<ResolverSnapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot (the manager does this after every change).
    pub fn publish(&self, snapshot: ResolverSnapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }
}

impl IdentityResolver for AgentIdentities {
    fn identity(&self, ip: IpAddr) -> Identity {
        self.snapshot.load().identity(ip)
    }

    fn local_endpoint(&self, ip: IpAddr) -> Option<ProxyEndpointId> {
        self.snapshot.load().local_endpoint(ip)
    }
}

/// Marks the HTTP proxy's upstream connections the way Weir's datapath reads them: the
/// ingress proxy's connections pass the destination's (already enforced) ingress policy, the
/// egress proxy's carry the client's identity so the destination judges the client, not the
/// node.
#[derive(Debug, Clone, Copy, Default)]
pub struct DatapathMarks;

impl UpstreamMark for DatapathMarks {
    fn mark(&self, ctx: &ConnectionContext) -> Option<u32> {
        Some(match ctx.direction {
            Direction::Ingress => MARK_MAGIC_FROM_INGRESS_PROXY,
            Direction::Egress => egress_proxy_mark(ctx.local_identity.0),
        })
    }
}

/// Everything the proxies share with the manager. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxyHandles {
    /// IP → identity and local endpoint.
    pub identities: Arc<AgentIdentities>,
    /// The HTTP proxy's policy.
    pub http: Arc<PolicyStore>,
    /// The DNS proxy's policy and `toFQDNs` selectors.
    pub dns: Arc<DnsPolicyStore>,
    /// Learned names, shared by the DNS proxy (which records answers) and the manager (which
    /// expires them).
    pub name_cache: Arc<NameCache>,
}

impl ProxyHandles {
    /// Empty stores (every request denied until the manager publishes) around `name_cache`.
    pub fn new(name_cache: NameCache) -> Self {
        ProxyHandles {
            identities: Arc::new(AgentIdentities::default()),
            http: Arc::new(PolicyStore::default()),
            dns: Arc::new(DnsPolicyStore::default()),
            name_cache: Arc::new(name_cache),
        }
    }
}

/// The agent's [`DnsLearner`]: hands each learned answer to the manager, which allocates the
/// identities, updates every endpoint's map and the ipcache before the future completes, so
/// the DNS proxy releases the answer only once the datapath allows the addresses.
pub struct AgentLearner<D: Datapath> {
    manager: Arc<Mutex<Manager<D>>>,
}

impl<D: Datapath> AgentLearner<D> {
    /// A learner over the shared manager.
    pub fn new(manager: Arc<Mutex<Manager<D>>>) -> Self {
        AgentLearner { manager }
    }
}

impl<D: Datapath + Send + 'static> DnsLearner for AgentLearner<D> {
    fn learn<'a>(&'a self, learned: &'a Learned) -> LearnFuture<'a> {
        Box::pin(async move {
            let ips: Vec<IpAddr> = learned.ips.iter().map(|l| l.ip).collect();
            let mut m = self.manager.lock().await;
            m.learn_fqdn(&ips, &learned.selectors)
                .map_err(|e| LearnError(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn resolver_prefers_hosts_then_longest_prefix_then_world() {
        let snap = ResolverSnapshot::new(
            [(ip("10.0.1.1"), ProxyEndpointId(3), Identity(1000))],
            [(ip("1.2.3.4"), Identity(16777300))],
            [
                ("1.0.0.0/8".parse().unwrap(), Identity(16777217)),
                ("1.2.0.0/16".parse().unwrap(), Identity(16777218)),
                ("9.9.9.9/32".parse().unwrap(), Identity(16777219)),
            ],
        );
        assert_eq!(snap.identity(ip("10.0.1.1")), Identity(1000));
        assert_eq!(
            snap.local_endpoint(ip("10.0.1.1")),
            Some(ProxyEndpointId(3))
        );
        assert_eq!(
            snap.local_endpoint(ip("::ffff:10.0.1.1")),
            Some(ProxyEndpointId(3)),
            "v4-mapped addresses from dual-stack sockets"
        );
        assert_eq!(snap.identity(ip("1.2.3.4")), Identity(16777300));
        assert_eq!(snap.identity(ip("1.2.9.9")), Identity(16777218));
        assert_eq!(snap.identity(ip("1.9.9.9")), Identity(16777217));
        assert_eq!(snap.identity(ip("9.9.9.9")), Identity(16777219));
        assert_eq!(
            snap.identity(ip("8.8.8.8")),
            Identity::from(ReservedIdentity::World)
        );
        assert_eq!(snap.local_endpoint(ip("1.2.3.4")), None);
    }

    #[test]
    fn endpoint_id_conversion_round_trips() {
        assert_eq!(
            proxy_endpoint_id(EndpointId(7)).map(datapath_endpoint_id),
            Some(EndpointId(7))
        );
        assert_eq!(proxy_endpoint_id(EndpointId(70_000)), None);
    }

    #[test]
    fn learner_opens_the_datapath_before_returning() {
        use weir_datapath::FakeDatapath;
        use weir_dns_proxy::LearnedIp;
        use weir_l7_match::DnsRule;

        let mut m = Manager::new(
            crate::manager::ManagerConfig::default(),
            FakeDatapath::new(),
        )
        .unwrap();
        m.load_policy_file(
            std::path::Path::new("p.yaml"),
            weir_policy_model::parse_policies(
                "p.yaml",
                "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: prod}
spec:
  endpointSelector: {}
  egress:
    - toFQDNs: [{matchName: api.example.com}]
",
            ),
        )
        .unwrap();
        let resolver = m.proxy_handles().identities.clone();
        let manager = Arc::new(Mutex::new(m));
        let learner = AgentLearner::new(manager.clone());
        let target = ip("192.0.2.7");
        let learned = Learned {
            endpoint: ProxyEndpointId(1),
            name: "api.example.com.".into(),
            aliases: Vec::new(),
            ips: vec![LearnedIp {
                ip: target,
                ttl: 30,
            }],
            selectors: vec![DnsRule::MatchName("api.example.com".into())],
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(learner.learn(&learned)).unwrap();
        let id = rt.block_on(manager.lock()).datapath().identity_of(target);
        assert!(!id.is_reserved());
        assert_eq!(resolver.identity(target), id, "published to the proxies");
    }
}
