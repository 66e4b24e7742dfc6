//! The endpoint manager: endpoints, identities, policies and the datapath, kept consistent.
//!
//! Every change (an endpoint created or deleted, a policy file changed) ends with the kernel maps
//! updated through [`Datapath`]: the compiler produces [`MapStateDiff`]s and the manager applies
//! them, upserts before removals. An endpoint is attached only once its policy is in the maps,
//! so its first packet already sees its policy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use weir_datapath::{Datapath, DatapathError, EndpointAttachment, EndpointId};
use weir_dns_proxy::{CacheConfig, ConnectionActivity, NameCache};
use weir_identity::{Identity, ReservedIdentity};
use weir_identity::{
    IdentityAllocator, InMemoryAllocator, Label, LabelFilter, LabelSet, cidr_labels,
    pod_identity_labels,
};
use weir_l7_match::DnsRule;
use weir_l7_proxy::EndpointId as ProxyEndpointId;
use weir_policy_compiler::{
    Compiler, CompilerConfig, EndpointInfo, EndpointPolicy, L7Policy, MapState, MapStateDiff,
    NamedPorts, fqdn_label, proto,
};
use weir_policy_model::{ParseErrors, Peer, Policy, PolicyName};

use crate::proxies::{ProxyHandles, ResolverSnapshot, proxy_endpoint_id};

/// What the CNI plugin tells the agent about a new pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// The container runtime's id.
    pub container_id: String,
    /// Path of the pod's network namespace.
    pub netns_path: String,
    /// Interface name inside the pod.
    pub ifname: String,
    /// Host-side veth name (in the agent's network namespace).
    pub host_ifname: String,
    /// The pod's addresses.
    pub addresses: Vec<IpAddr>,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Named container ports: name → (IP protocol, port).
    pub named_ports: BTreeMap<String, (u8, u16)>,
}

/// Where an endpoint is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndpointState {
    /// Its policy is in the kernel and its interface is attached.
    Ready,
    /// Being set up.
    WaitingForPolicy,
}

/// An endpoint the agent manages.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its id on this node.
    pub id: EndpointId,
    /// What the CNI plugin said.
    pub spec: EndpointSpec,
    /// Its security identity.
    pub identity: Identity,
    /// Its identity labels.
    pub labels: LabelSet,
    /// Its compiled policy (what is in the kernel).
    pub policy: EndpointPolicy,
    /// Its state.
    pub state: EndpointState,
}

impl Endpoint {
    fn info(&self) -> EndpointInfo {
        EndpointInfo {
            identity: self.identity,
            labels: self.labels.clone(),
            named_ports: self.spec.named_ports.clone(),
        }
    }
}

/// Manager settings.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Cluster name (for the `cluster` entity and identity labels).
    pub cluster_name: String,
    /// Labels of each Kubernetes namespace (for namespace selectors).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Where state is persisted (`None`: nothing persisted).
    pub state_dir: Option<PathBuf>,
    /// Compiler settings (proxy ports, enforcement mode).
    pub compiler: CompilerConfig,
    /// The node's own addresses: they map to the `host` identity (1) in the ipcache, so
    /// traffic between pods and their node is `host` traffic, as in Cilium.
    pub node_addresses: Vec<IpAddr>,
    /// Limits of the DNS name cache (minimum TTL, IPs per name, idle grace).
    pub fqdn_cache: CacheConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            cluster_name: "default".into(),
            namespace_labels: BTreeMap::new(),
            state_dir: None,
            compiler: CompilerConfig::default(),
            node_addresses: Vec::new(),
            fqdn_cache: CacheConfig::default(),
        }
    }
}

/// Manager failures.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The datapath refused an operation.
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    /// Identity allocation failed.
    #[error("identity allocation: {0}")]
    Identity(String),
    /// Reading or writing the state directory failed.
    #[error("state {path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// No more endpoint ids.
    #[error("no free endpoint id")]
    NoEndpointId,
}

/// What the last load of one policy file gave.
#[derive(Debug, Clone, Default)]
pub struct PolicyFile {
    /// The policies it holds now (the last good version).
    pub policies: Vec<PolicyName>,
    /// The error of the last attempt, if it was rejected.
    pub error: Option<String>,
}

/// Persistent state: enough to rebuild after a restart with the same numbers in the maps.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    endpoints: Vec<(u32, EndpointSpec)>,
    identities: Vec<(u32, Vec<String>)>,
}

/// An address learned from DNS answers, with the identity it has in the ipcache.
#[derive(Debug, Clone)]
struct FqdnIp {
    identity: Identity,
    /// `cidr:<ip>/32` (or /128), `reserved:world` and one `fqdn:` label per selector that
    /// selected a name the address was learned for.
    labels: LabelSet,
    /// When an answer last taught it (an expiry racing a fresh answer keeps it).
    learned: Instant,
}

/// An expiry within this long of the address being (re)learned is ignored: the answer that
/// taught it is being recorded in the name cache right now.
const RELEARN_GRACE: Duration = Duration::from_secs(5);

/// Keeps endpoints, identities, policies and the datapath consistent.
pub struct Manager<D: Datapath> {
    config: ManagerConfig,
    datapath: D,
    allocator: InMemoryAllocator,
    compiler: Compiler,
    filter: LabelFilter,
    endpoints: BTreeMap<EndpointId, Endpoint>,
    by_container: BTreeMap<String, EndpointId>,
    /// Named ports per identity, over all endpoints that have it.
    identity_ports: BTreeMap<Identity, BTreeMap<EndpointId, NamedPorts>>,
    /// CIDR identities for the prefixes the policies name.
    cidrs: BTreeMap<IpNet, Identity>,
    files: BTreeMap<PathBuf, PolicyFile>,
    /// Addresses learned from DNS answers.
    fqdn: BTreeMap<IpAddr, FqdnIp>,
    /// What the proxies read.
    proxies: ProxyHandles,
    /// The L7 policy last published per endpoint (unchanged ones are not republished, so
    /// they keep their compiled matchers).
    published: HashMap<ProxyEndpointId, Arc<L7Policy>>,
    published_selectors: Vec<DnsRule>,
    /// Identities learned from DNS answers that the state file does not hold yet: written
    /// by [`Manager::flush_state`] (the agent calls it every second and on shutdown), not
    /// on the answer's path, which the pod is waiting on.
    state_dirty: bool,
}

impl<D: Datapath> Manager<D> {
    /// A manager driving `datapath`. Restores the identity numbers saved in the state directory
    /// (so that the numbers already in the kernel keep their meaning); load the policies, then
    /// call [`Manager::restore_endpoints`].
    pub fn new(config: ManagerConfig, datapath: D) -> Result<Self, ManagerError> {
        let compiler = Compiler::new(config.compiler.clone());
        let name_cache = load_name_cache(&config);
        let mut m = Manager {
            config,
            datapath,
            allocator: InMemoryAllocator::new(),
            compiler,
            filter: LabelFilter::default(),
            endpoints: BTreeMap::new(),
            by_container: BTreeMap::new(),
            identity_ports: BTreeMap::new(),
            cidrs: BTreeMap::new(),
            files: BTreeMap::new(),
            fqdn: BTreeMap::new(),
            proxies: ProxyHandles::new(name_cache),
            published: HashMap::new(),
            published_selectors: Vec::new(),
            state_dirty: false,
        };
        m.restore_identities()?;
        for ip in m.config.node_addresses.clone() {
            m.datapath
                .upsert_ipcache(IpNet::from(ip), ReservedIdentity::Host.into())?;
        }
        m.publish_proxies();
        Ok(m)
    }

    /// The datapath.
    pub fn datapath(&self) -> &D {
        &self.datapath
    }

    /// The datapath, mutably (for event reading and GC).
    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.datapath
    }

    /// The compiler (identities and policy repository).
    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }

    /// The endpoints.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    /// One endpoint by id.
    pub fn endpoint(&self, id: EndpointId) -> Option<&Endpoint> {
        self.endpoints.get(&id)
    }

    /// One endpoint by container id.
    pub fn endpoint_by_container(&self, container_id: &str) -> Option<&Endpoint> {
        self.by_container
            .get(container_id)
            .and_then(|id| self.endpoints.get(id))
    }

    /// Policy files and their last load.
    pub fn policy_files(&self) -> &BTreeMap<PathBuf, PolicyFile> {
        &self.files
    }

    /// Every allocated identity with its labels (reserved ones first).
    pub fn identities(&self) -> Vec<(Identity, LabelSet)> {
        self.allocator
            .identities()
            .map(|(i, l)| (i, l.clone()))
            .collect()
    }

    /// The manager's settings.
    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    fn free_endpoint_id(&self) -> Result<EndpointId, ManagerError> {
        // Ids are small and reused, as Cilium's are; 0 is never used.
        (1..u32::from(u16::MAX))
            .map(EndpointId)
            .find(|id| !self.endpoints.contains_key(id))
            .ok_or(ManagerError::NoEndpointId)
    }

    fn identity_labels(&self, spec: &EndpointSpec) -> LabelSet {
        let ns_labels = self
            .config
            .namespace_labels
            .get(&spec.namespace)
            .cloned()
            .unwrap_or_default();
        let service_account = spec
            .labels
            .get("io.cilium.k8s.policy.serviceaccount")
            .cloned()
            .unwrap_or_default();
        pod_identity_labels(
            &spec.namespace,
            spec.labels
                .iter()
                .filter(|(k, _)| k.as_str() != "io.cilium.k8s.policy.serviceaccount"),
            &ns_labels,
            &service_account,
            &self.config.cluster_name,
            &self.filter,
        )
    }

    /// Creates an endpoint (idempotent per container id): allocates its identity, installs its
    /// policy, maps its addresses in the ipcache, and only then attaches its interface.
    pub fn create_endpoint(&mut self, spec: EndpointSpec) -> Result<&Endpoint, ManagerError> {
        if let Some(id) = self.by_container.get(&spec.container_id).copied() {
            if self.endpoints.get(&id).is_some_and(|e| e.spec == spec) {
                return self.endpoints.get(&id).ok_or(ManagerError::NoEndpointId);
            }
            self.delete_endpoint(&spec.container_id)?;
        }
        let id = self.free_endpoint_id()?;
        let installed = self.install_endpoint(id, spec);
        self.publish_proxies();
        installed?;
        self.save()?;
        self.endpoints.get(&id).ok_or(ManagerError::NoEndpointId)
    }

    fn install_endpoint(&mut self, id: EndpointId, spec: EndpointSpec) -> Result<(), ManagerError> {
        let labels = self.identity_labels(&spec);
        let alloc = self
            .allocator
            .allocate(&labels)
            .map_err(|e| ManagerError::Identity(e.to_string()))?;
        let identity = alloc.identity;
        self.identity_ports
            .entry(identity)
            .or_default()
            .insert(id, spec.named_ports.clone());
        self.publish_identity(identity, &labels)?;
        let mut ep = Endpoint {
            id,
            spec,
            identity,
            labels,
            policy: EndpointPolicy::default(),
            state: EndpointState::WaitingForPolicy,
        };
        let compiled = self.compiler.compile(&ep.info());
        let diff = self.reconcile_diff(id, &compiled.map_state);
        self.datapath.apply_policy_diff(id, &diff)?;
        ep.policy = compiled;
        for ip in &ep.spec.addresses {
            self.datapath.upsert_ipcache(IpNet::from(*ip), identity)?;
        }
        self.datapath.attach_endpoint(&EndpointAttachment {
            ifname: ep.spec.host_ifname.clone(),
            endpoint_id: id,
            identity,
            addresses: ep.spec.addresses.clone(),
        })?;
        ep.state = EndpointState::Ready;
        info!(endpoint = id.0, %identity, pod = %format!("{}/{}", ep.spec.namespace, ep.spec.pod_name), "endpoint ready");
        self.by_container.insert(ep.spec.container_id.clone(), id);
        self.endpoints.insert(id, ep);
        Ok(())
    }

    /// The diff from what the kernel holds for an endpoint now to `desired` (after a restart
    /// the kernel may already hold entries; they are kept where they are right).
    fn reconcile_diff(&self, id: EndpointId, desired: &MapState) -> MapStateDiff {
        let current = self.datapath.dump_policy(id).unwrap_or_default();
        let mut diff = MapStateDiff::default();
        for (k, e) in desired.iter() {
            if current.get(k) != Some(&e.action) {
                diff.upserts.push((*k, e.clone()));
            }
        }
        for k in current.keys() {
            if desired.get(k).is_none() {
                diff.removals.push(*k);
            }
        }
        diff
    }

    /// Tells the compiler about an identity (new, or with changed named ports) and brings every
    /// endpoint's map up to date for it.
    fn publish_identity(
        &mut self,
        identity: Identity,
        labels: &LabelSet,
    ) -> Result<(), ManagerError> {
        let ports: NamedPorts = self
            .identity_ports
            .get(&identity)
            .map(|m| {
                m.values()
                    .flat_map(|p| p.iter().map(|(k, v)| (k.clone(), *v)))
                    .collect()
            })
            .unwrap_or_default();
        let known = self
            .compiler
            .identities()
            .get(identity)
            .is_some_and(|i| i.labels.as_ref() == labels && i.named_ports == ports);
        if known {
            return Ok(());
        }
        // One copy of the labels, shared with the allocator (memory per identity).
        let shared = self
            .allocator
            .shared_labels(identity)
            .unwrap_or_else(|| std::sync::Arc::new(labels.clone()));
        self.compiler
            .upsert_identity_shared(identity, shared, ports);
        self.update_all_for_identity(identity)
    }

    fn update_all_for_identity(&mut self, identity: Identity) -> Result<(), ManagerError> {
        let ids: Vec<EndpointId> = self.endpoints.keys().copied().collect();
        for id in ids {
            let Some(ep) = self.endpoints.get_mut(&id) else {
                continue;
            };
            let info = ep.info();
            let diff = self
                .compiler
                .update_identity(&info, &mut ep.policy, identity);
            if !diff.is_empty() {
                self.datapath.apply_policy_diff(id, &diff)?;
            }
        }
        Ok(())
    }

    /// Deletes an endpoint; succeeds for unknown containers. Returns whether it existed.
    pub fn delete_endpoint(&mut self, container_id: &str) -> Result<bool, ManagerError> {
        let Some(id) = self.by_container.remove(container_id) else {
            return Ok(false);
        };
        let Some(ep) = self.endpoints.remove(&id) else {
            return Ok(false);
        };
        let attachment = EndpointAttachment {
            ifname: ep.spec.host_ifname.clone(),
            endpoint_id: id,
            identity: ep.identity,
            addresses: ep.spec.addresses.clone(),
        };
        if let Err(e) = self.datapath.detach_endpoint(&attachment) {
            // The veth may already be gone (the runtime deleted the netns): not an error.
            warn!(endpoint = id.0, error = %e, "detach");
        }
        for ip in &ep.spec.addresses {
            if let Err(e) = self.datapath.remove_ipcache(IpNet::from(*ip)) {
                warn!(endpoint = id.0, error = %e, "ipcache removal");
            }
        }
        if let Some(m) = self.identity_ports.get_mut(&ep.identity) {
            m.remove(&id);
            if m.is_empty() {
                self.identity_ports.remove(&ep.identity);
            }
        }
        let freed = self
            .allocator
            .release(ep.identity)
            .map_err(|e| ManagerError::Identity(e.to_string()))?;
        if freed {
            self.compiler.remove_identity(ep.identity);
            self.update_all_for_identity(ep.identity)?;
        } else {
            self.publish_identity(ep.identity, &ep.labels)?;
        }
        info!(
            endpoint = id.0,
            container = container_id,
            "endpoint deleted"
        );
        // What it learned from DNS goes with it (addresses other endpoints also learned stay).
        if let Some(pid) = proxy_endpoint_id(id) {
            let dropped = self.proxies.name_cache.remove_endpoint(pid);
            self.forget_uncached(dropped.iter().map(|e| e.ip), false)?;
        }
        self.publish_proxies();
        self.save()?;
        Ok(true)
    }

    /// Replaces the policies of one file. An invalid file is rejected whole: its error is
    /// recorded and its last good policies stay enforced.
    pub fn load_policy_file(
        &mut self,
        path: &Path,
        result: Result<Vec<Policy>, ParseErrors>,
    ) -> Result<(), ManagerError> {
        let policies = match result {
            Ok(p) => p,
            Err(errors) => {
                let text = errors.to_string();
                warn!(file = %path.display(), errors = %text, "policy file rejected; the last good version stays enforced");
                self.files.entry(path.to_path_buf()).or_default().error = Some(text);
                return Ok(());
            }
        };
        let old: BTreeSet<PolicyName> = self
            .files
            .get(path)
            .map(|f| f.policies.iter().cloned().collect())
            .unwrap_or_default();
        let new: BTreeSet<PolicyName> = policies.iter().map(|p| p.name.clone()).collect();
        let mut changed: Vec<PolicyName> = Vec::new();
        for gone in old.difference(&new) {
            // A policy moved to another file (an import taking it over) stays enforced.
            if self.defined_elsewhere(gone, path) {
                continue;
            }
            self.compiler.remove_policy(gone);
            changed.push(gone.clone());
        }
        for p in policies {
            // Unchanged objects (the same file saved again) cost nothing.
            if self.compiler.repository().get(&p.name) == Some(&p) {
                continue;
            }
            changed.push(p.name.clone());
            self.compiler.upsert_policy(p);
        }
        self.files.insert(
            path.to_path_buf(),
            PolicyFile {
                policies: new.into_iter().collect(),
                error: None,
            },
        );
        info!(file = %path.display(), revision = self.compiler.repository().revision().0, changed = changed.len(), "policy file loaded");
        let r = self.regenerate(&changed);
        self.publish_proxies();
        r
    }

    /// Removes a file's policies.
    pub fn remove_policy_file(&mut self, path: &Path) -> Result<(), ManagerError> {
        let Some(file) = self.files.remove(path) else {
            return Ok(());
        };
        let gone: Vec<PolicyName> = file
            .policies
            .into_iter()
            .filter(|name| !self.defined_elsewhere(name, path))
            .collect();
        for name in &gone {
            self.compiler.remove_policy(name);
        }
        info!(file = %path.display(), "policy file removed");
        let r = self.regenerate(&gone);
        self.publish_proxies();
        r
    }

    /// Whether a file other than `path` holds `name` (its last good version).
    fn defined_elsewhere(&self, name: &PolicyName, path: &Path) -> bool {
        self.files
            .iter()
            .any(|(p, f)| p.as_path() != path && f.policies.contains(name))
    }

    /// Brings CIDR identities and every endpoint's map up to date after the named policies
    /// changed: only the entries those policies touch are recomputed (the compiler falls back
    /// to a full compile where it must).
    fn regenerate(&mut self, changed: &[PolicyName]) -> Result<(), ManagerError> {
        self.sync_cidr_identities()?;
        let ids: Vec<EndpointId> = self.endpoints.keys().copied().collect();
        for id in ids {
            let Some(ep) = self.endpoints.get_mut(&id) else {
                continue;
            };
            let info = ep.info();
            for name in changed {
                let diff = self.compiler.update_policy(&info, &mut ep.policy, name);
                if !diff.is_empty() {
                    self.datapath.apply_policy_diff(id, &diff)?;
                }
            }
        }
        Ok(())
    }

    /// Every prefix a policy names gets a CIDR identity and an ipcache entry, as Cilium does.
    fn sync_cidr_identities(&mut self) -> Result<(), ManagerError> {
        let mut wanted = BTreeSet::new();
        for peer in self.compiler.repository().iter().flat_map(Policy::peers) {
            if let Peer::Cidr { cidr, except } = peer {
                wanted.insert(*cidr);
                wanted.extend(except.iter().copied());
            }
        }
        // /0 is the world identity itself.
        wanted.retain(|p| p.prefix_len() > 0);
        let have: BTreeSet<IpNet> = self.cidrs.keys().copied().collect();
        for prefix in wanted.difference(&have) {
            let labels = cidr_labels(*prefix);
            let a = self
                .allocator
                .allocate(&labels)
                .map_err(|e| ManagerError::Identity(e.to_string()))?;
            self.cidrs.insert(*prefix, a.identity);
            self.compiler
                .upsert_identity(a.identity, labels, NamedPorts::new());
            // A learned address keeps its own identity (it carries the same CIDR labels).
            if !self.is_learned_host(prefix) {
                self.datapath.upsert_ipcache(*prefix, a.identity)?;
            }
            self.update_all_for_identity(a.identity)?;
        }
        for prefix in have.difference(&wanted) {
            if let Some(id) = self.cidrs.remove(prefix) {
                if !self.is_learned_host(prefix) {
                    self.datapath.remove_ipcache(*prefix)?;
                }
                if self
                    .allocator
                    .release(id)
                    .map_err(|e| ManagerError::Identity(e.to_string()))?
                {
                    self.compiler.remove_identity(id);
                    self.update_all_for_identity(id)?;
                }
            }
        }
        Ok(())
    }

    fn is_learned_host(&self, prefix: &IpNet) -> bool {
        prefix.prefix_len() == prefix.max_prefix_len() && self.fqdn.contains_key(&prefix.addr())
    }

    /// What the proxies read: the proxy stores, the resolver and the name cache.
    pub fn proxy_handles(&self) -> &ProxyHandles {
        &self.proxies
    }

    /// Publishes the current state to the proxies: the resolver snapshot, each endpoint's L7
    /// policy (only those that changed, so the others keep their compiled matchers) and the
    /// `toFQDNs` selectors in use. Called after every change.
    fn publish_proxies(&mut self) {
        let endpoints: Vec<(IpAddr, ProxyEndpointId, Identity)> = self
            .endpoints
            .values()
            .filter_map(|e| proxy_endpoint_id(e.id).map(|p| (e, p)))
            .flat_map(|(e, p)| e.spec.addresses.iter().map(move |ip| (*ip, p, e.identity)))
            .collect();
        self.proxies.identities.publish(ResolverSnapshot::new(
            endpoints,
            self.fqdn.iter().map(|(ip, f)| (*ip, f.identity)),
            self.cidrs.iter().map(|(n, id)| (*n, *id)),
        ));

        let mut changed: Vec<(ProxyEndpointId, Arc<L7Policy>)> = Vec::new();
        let mut live = BTreeSet::new();
        for ep in self.endpoints.values() {
            let Some(pid) = proxy_endpoint_id(ep.id) else {
                continue;
            };
            live.insert(pid);
            if self.published.get(&pid).map(|p| p.as_ref()) != Some(&ep.policy.l7) {
                changed.push((pid, Arc::new(ep.policy.l7.clone())));
            }
        }
        let gone: Vec<ProxyEndpointId> = self
            .published
            .keys()
            .filter(|p| !live.contains(p))
            .copied()
            .collect();
        let selectors = self.fqdn_selectors();
        let selectors_changed = selectors != self.published_selectors;
        if changed.is_empty() && gone.is_empty() && !selectors_changed {
            return;
        }
        let mut http = self.proxies.http.load().as_ref().clone();
        let mut dns = self.proxies.dns.load().as_ref().clone();
        for p in &gone {
            http = http.without_endpoint(*p);
            dns = dns.without_endpoint(*p);
            self.published.remove(p);
        }
        for (p, l7) in changed {
            http = http.with_endpoint(p, l7.clone());
            dns = dns.with_endpoint(p, l7.clone());
            self.published.insert(p, l7);
        }
        if selectors_changed {
            match dns.with_fqdn_selectors(selectors.clone()) {
                Ok(next) => {
                    dns = next;
                    self.published_selectors = selectors;
                }
                Err(e) => {
                    warn!(error = %e, "toFQDNs selectors do not compile; the previous ones stay")
                }
            }
        }
        self.proxies.http.publish(http);
        self.proxies.dns.publish(dns);
    }

    /// Every `toFQDNs` selector in the policy repository, once each, in repository order.
    pub fn fqdn_selectors(&self) -> Vec<DnsRule> {
        let mut out: Vec<DnsRule> = Vec::new();
        for peer in self.compiler.repository().iter().flat_map(Policy::peers) {
            if let Peer::Fqdn(r) = peer
                && !out.contains(r)
            {
                out.push(r.clone());
            }
        }
        out
    }

    /// Makes `ips` reachable for the `toFQDNs` `selectors` that selected their name: each
    /// address gets (or keeps) an identity labelled `cidr:<ip>/32`, `reserved:world` and the
    /// `fqdn:` label of every selector it was ever learned for; the compiler and every
    /// endpoint's map learn it, then the ipcache maps the address to it. Everything is in
    /// the kernel when this returns. Addresses of local endpoints are left alone.
    pub fn learn_fqdn(
        &mut self,
        ips: &[IpAddr],
        selectors: &[DnsRule],
    ) -> Result<(), ManagerError> {
        let wanted: LabelSet = selectors.iter().map(fqdn_label).collect();
        let local: BTreeSet<IpAddr> = self
            .endpoints
            .values()
            .flat_map(|e| e.spec.addresses.iter().copied())
            .collect();
        let mut changed = false;
        let now = Instant::now();
        for &ip in ips {
            if local.contains(&ip) || wanted.is_empty() {
                continue;
            }
            let old = self.fqdn.get(&ip).cloned();
            if let Some(f) = self.fqdn.get_mut(&ip) {
                f.learned = now;
                if wanted.iter().all(|l| f.labels.contains(l)) {
                    continue;
                }
            }
            let mut labels = match &old {
                Some(f) => f.labels.clone(),
                None => cidr_labels(IpNet::from(ip)),
            };
            for l in wanted.iter() {
                labels.insert(l.clone());
            }
            let alloc = self
                .allocator
                .allocate(&labels)
                .map_err(|e| ManagerError::Identity(e.to_string()))?;
            let identity = alloc.identity;
            // Policy first, then the ipcache: the address never maps to an identity the maps
            // do not know yet.
            self.publish_identity(identity, &labels)?;
            self.datapath.upsert_ipcache(IpNet::from(ip), identity)?;
            self.fqdn.insert(
                ip,
                FqdnIp {
                    identity,
                    labels,
                    learned: now,
                },
            );
            if let Some(old) = old {
                self.release_identity(old.identity)?;
            }
            changed = true;
        }
        if changed {
            self.publish_proxies();
            self.state_dirty = true;
        }
        Ok(())
    }

    /// The identity an address learned from DNS answers has, if any.
    pub fn fqdn_identity(&self, ip: IpAddr) -> Option<Identity> {
        self.fqdn.get(&ip).map(|f| f.identity)
    }

    /// Writes the state file if DNS answers changed identities since it was last written;
    /// returns whether it wrote.
    pub fn flush_state(&mut self) -> Result<bool, ManagerError> {
        if !self.state_dirty {
            return Ok(false);
        }
        self.save()?;
        Ok(true)
    }

    fn release_identity(&mut self, identity: Identity) -> Result<(), ManagerError> {
        if self
            .allocator
            .release(identity)
            .map_err(|e| ManagerError::Identity(e.to_string()))?
        {
            self.compiler.remove_identity(identity);
            self.update_all_for_identity(identity)?;
        }
        Ok(())
    }

    /// Withdraws access to the addresses among `ips` that the name cache no longer holds:
    /// the ipcache entry goes first (back to the policy CIDR's identity if one names exactly
    /// the address), then the identity is released.
    fn forget_uncached(
        &mut self,
        ips: impl IntoIterator<Item = IpAddr>,
        respect_grace: bool,
    ) -> Result<usize, ManagerError> {
        let mut n = 0;
        let ips: BTreeSet<IpAddr> = ips.into_iter().collect();
        for ip in ips {
            if self.proxies.name_cache.contains_ip(ip) {
                continue;
            }
            let Some(f) = self.fqdn.get(&ip) else {
                continue;
            };
            if respect_grace && f.learned.elapsed() < RELEARN_GRACE {
                continue;
            }
            let identity = f.identity;
            self.fqdn.remove(&ip);
            let host = IpNet::from(ip);
            match self.cidrs.get(&host) {
                Some(cidr) => self.datapath.upsert_ipcache(host, *cidr)?,
                None => self.datapath.remove_ipcache(host)?,
            }
            self.release_identity(identity)?;
            n += 1;
        }
        if n > 0 {
            self.publish_proxies();
            self.save()?;
        }
        Ok(n)
    }

    /// Expires learned names (their TTL, raised to the minimum, passed and `activity` shows
    /// no recent connection) and withdraws access to addresses no name holds any more.
    /// Returns how many addresses lost access.
    pub fn gc_fqdn(
        &mut self,
        now: SystemTime,
        activity: &dyn ConnectionActivity,
    ) -> Result<usize, ManagerError> {
        let removed = self.proxies.name_cache.gc(now, activity);
        if removed.is_empty() {
            return Ok(0);
        }
        self.forget_uncached(removed.into_iter().map(|e| e.ip), true)
    }

    /// Saves the DNS name cache in the state directory.
    pub fn save_name_cache(&self) -> Result<(), ManagerError> {
        let Some(path) = name_cache_file(&self.config) else {
            return Ok(());
        };
        self.proxies
            .name_cache
            .save(&path)
            .map_err(|e| ManagerError::State {
                path,
                message: e.to_string(),
            })
    }

    /// Re-learns every address in the (reloaded) name cache for the selectors that select its
    /// name now, so access learned before a restart stays; entries no selector selects any
    /// more are left to expire. Call after the policies are loaded.
    pub fn restore_fqdn(&mut self) -> Result<usize, ManagerError> {
        let selectors = self.proxies.dns.load().fqdn_selectors().clone();
        let mut n = 0;
        for entry in self.proxies.name_cache.entries() {
            let matching = selectors.matching(&entry.name);
            if matching.is_empty() {
                continue;
            }
            self.learn_fqdn(&[entry.ip], &matching)?;
            n += 1;
        }
        Ok(n)
    }

    fn state_file(&self) -> Option<PathBuf> {
        self.config.state_dir.as_ref().map(|d| d.join("state.json"))
    }

    /// Writes endpoints and pod identities to the state directory (atomically).
    fn save(&mut self) -> Result<(), ManagerError> {
        self.state_dirty = false;
        let Some(path) = self.state_file() else {
            return Ok(());
        };
        let state = SavedState {
            endpoints: self
                .endpoints
                .values()
                .map(|e| (e.id.0, e.spec.clone()))
                .collect(),
            identities: self
                .allocator
                .identities()
                .filter(|(id, _)| !id.is_reserved())
                .map(|(id, labels)| (id.0, labels.iter().map(ToString::to_string).collect()))
                .collect(),
        };
        let err = |e: &dyn std::fmt::Display| ManagerError::State {
            path: path.clone(),
            message: e.to_string(),
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| err(&e))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| err(&e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&e))?;
        Ok(())
    }

    fn load_state(&self) -> Result<Option<SavedState>, ManagerError> {
        let Some(path) = self.state_file() else {
            return Ok(None);
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ManagerError::State {
                    path,
                    message: e.to_string(),
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ManagerError::State {
                path,
                message: e.to_string(),
            })
    }

    fn restore_identities(&mut self) -> Result<(), ManagerError> {
        let Some(state) = self.load_state()? else {
            return Ok(());
        };
        for (id, labels) in &state.identities {
            let labels: LabelSet = labels
                .iter()
                .filter_map(|l| l.parse::<Label>().ok())
                .collect();
            if let Err(e) = self.allocator.restore(Identity(*id), labels) {
                warn!(identity = id, error = %e, "identity not restored");
            }
        }
        Ok(())
    }

    /// Rebuilds the endpoints saved in the state directory, under their old ids. Call it after
    /// the policies are loaded: each endpoint's kernel entries are then reconciled with the
    /// same policy, not rewritten from scratch, so established and new traffic keep their
    /// verdicts across an agent restart.
    pub fn restore_endpoints(&mut self) -> Result<usize, ManagerError> {
        let Some(state) = self.load_state()? else {
            return Ok(0);
        };
        for (id, spec) in state.endpoints {
            let container = spec.container_id.clone();
            if self.by_container.contains_key(&container) {
                continue;
            }
            if let Err(e) = self.install_endpoint(EndpointId(id), spec) {
                warn!(endpoint = id, container, error = %e, "endpoint not restored");
            }
        }
        info!(endpoints = self.endpoints.len(), "endpoints restored");
        self.publish_proxies();
        let names = self.restore_fqdn()?;
        if names > 0 {
            info!(names, "learned DNS names restored");
        }
        let pruned = self.prune_unknown_ipcache()?;
        if pruned > 0 {
            info!(pruned, "ipcache entries with unknown identities removed");
        }
        self.save()?;
        Ok(self.endpoints.len())
    }
}

impl<D: Datapath> Manager<D> {
    /// Removes pinned ipcache entries whose identity nothing restored knows. After a crash
    /// they can exist (identities learned from DNS reach the state file up to a second
    /// later), and their number could be handed out again for other labels; without the
    /// entry the address is `world` until its name is answered again.
    fn prune_unknown_ipcache(&mut self) -> Result<usize, ManagerError> {
        let mut n = 0;
        for (prefix, identity) in self.datapath.list_ipcache()? {
            if identity.is_reserved() || self.allocator.shared_labels(identity).is_some() {
                continue;
            }
            self.datapath.remove_ipcache(prefix)?;
            n += 1;
        }
        Ok(n)
    }
}

fn name_cache_file(config: &ManagerConfig) -> Option<PathBuf> {
    config.state_dir.as_ref().map(|d| d.join("fqdn-cache.json"))
}

/// The saved name cache, or an empty one (a missing or unreadable file is not fatal: names
/// are learned again from the next answers).
fn load_name_cache(config: &ManagerConfig) -> NameCache {
    let Some(path) = name_cache_file(config) else {
        return NameCache::new(config.fqdn_cache);
    };
    match NameCache::load(config.fqdn_cache, &path) {
        Ok(c) => c,
        Err(weir_dns_proxy::CacheError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            NameCache::new(config.fqdn_cache)
        }
        Err(e) => {
            warn!(file = %path.display(), error = %e, "DNS name cache not restored");
            NameCache::new(config.fqdn_cache)
        }
    }
}

/// Converts the CNI's protocol name for a named port.
pub fn port_protocol(name: &str) -> u8 {
    match name.to_ascii_uppercase().as_str() {
        "UDP" => proto::UDP,
        "SCTP" => proto::SCTP,
        _ => proto::TCP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_datapath::FakeDatapath;
    use weir_policy_compiler::{Flow, Verdict};
    use weir_policy_model::{Direction, parse_policies};

    const ALLOW_FRONTEND: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-frontend, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: frontend}}]
      toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
";

    fn spec(name: &str, app: &str, ip: &str) -> EndpointSpec {
        EndpointSpec {
            container_id: format!("c-{name}"),
            netns_path: format!("/run/netns/{name}"),
            ifname: "eth0".into(),
            host_ifname: format!("veth-{name}"),
            addresses: vec![ip.parse().unwrap()],
            namespace: "prod".into(),
            pod_name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            named_ports: BTreeMap::new(),
        }
    }

    fn verdict(m: &Manager<FakeDatapath>, to: &str, from: Identity, port: u16) -> Verdict {
        let ep = m.endpoint_by_container(&format!("c-{to}")).unwrap();
        // The map in the (fake) kernel must be exactly the compiled one.
        let dumped = m.datapath().dump_policy(ep.id).unwrap();
        let compiled: BTreeMap<_, _> = ep
            .policy
            .map_state
            .iter()
            .map(|(k, e)| (*k, e.action))
            .collect();
        assert_eq!(dumped, compiled, "kernel map differs from the compiled map");
        ep.policy
            .decide(&Flow {
                direction: Direction::Ingress,
                remote: from,
                protocol: proto::TCP,
                port,
            })
            .verdict
    }

    fn load(m: &mut Manager<FakeDatapath>, file: &str, text: &str) {
        let path = PathBuf::from(file);
        m.load_policy_file(&path, parse_policies(file, text))
            .unwrap();
    }

    #[test]
    fn endpoints_policies_and_broken_files() {
        let mut m = Manager::new(ManagerConfig::default(), FakeDatapath::new()).unwrap();
        let fe = m
            .create_endpoint(spec("fe", "frontend", "10.0.1.1"))
            .unwrap()
            .identity;
        m.create_endpoint(spec("be", "backend", "10.0.1.2"))
            .unwrap();
        assert_eq!(m.datapath().identity_of("10.0.1.1".parse().unwrap()), fe);
        assert_eq!(
            verdict(&m, "be", fe, 9090),
            Verdict::Allow,
            "no policy yet: open"
        );

        load(&mut m, "p.yaml", ALLOW_FRONTEND);
        assert_eq!(verdict(&m, "be", fe, 8080), Verdict::Allow);
        assert_eq!(verdict(&m, "be", fe, 9090), Verdict::Deny { reason: 133 });

        // A broken version is rejected whole; the last good policy stays enforced.
        load(
            &mut m,
            "p.yaml",
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {bogus: 1}\n",
        );
        assert!(
            m.policy_files()[Path::new("p.yaml")]
                .error
                .as_deref()
                .unwrap()
                .contains("p.yaml:4:")
        );
        assert_eq!(verdict(&m, "be", fe, 9090), Verdict::Deny { reason: 133 });

        // A pod that arrives later gets its identity into existing maps incrementally.
        let fe2 = m
            .create_endpoint(spec("fe2", "frontend", "10.0.1.3"))
            .unwrap()
            .identity;
        assert_eq!(fe2, fe, "same labels, same identity");
        let other = m
            .create_endpoint(spec("db", "db", "10.0.1.4"))
            .unwrap()
            .identity;
        assert_eq!(
            verdict(&m, "be", other, 8080),
            Verdict::Deny { reason: 133 }
        );

        m.remove_policy_file(Path::new("p.yaml")).unwrap();
        assert_eq!(verdict(&m, "be", fe, 9090), Verdict::Allow);

        assert!(m.delete_endpoint("c-db").unwrap());
        assert!(!m.delete_endpoint("c-db").unwrap(), "delete is idempotent");
        assert_eq!(
            m.datapath().identity_of("10.0.1.4".parse().unwrap()),
            Identity(2)
        );
    }

    #[test]
    fn restart_keeps_ids_identities_and_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let config = ManagerConfig {
            state_dir: Some(dir.path().to_path_buf()),
            ..ManagerConfig::default()
        };
        let (fe, be_id) = {
            let mut m = Manager::new(config.clone(), FakeDatapath::new()).unwrap();
            load(&mut m, "p.yaml", ALLOW_FRONTEND);
            let fe = m
                .create_endpoint(spec("fe", "frontend", "10.0.1.1"))
                .unwrap()
                .identity;
            let be = m
                .create_endpoint(spec("be", "backend", "10.0.1.2"))
                .unwrap()
                .id;
            (fe, be)
        };
        let mut m = Manager::new(config, FakeDatapath::new()).unwrap();
        load(&mut m, "p.yaml", ALLOW_FRONTEND);
        assert_eq!(m.restore_endpoints().unwrap(), 2);
        let fe_after = m.endpoint_by_container("c-fe").unwrap().identity;
        assert_eq!(fe_after, fe);
        assert_eq!(m.endpoint_by_container("c-be").unwrap().id, be_id);
        assert_eq!(verdict(&m, "be", fe, 8080), Verdict::Allow);
        assert_eq!(verdict(&m, "be", fe, 9090), Verdict::Deny { reason: 133 });
    }

    use weir_datapath::Verdict as DV;

    const FQDN_AND_HTTP: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: egress-l7, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
    - toFQDNs: [{matchName: api.example.com}, {matchPattern: '*.cdn.example.com'}]
      toPorts: [{ports: [{port: '443', protocol: TCP}]}]
    - toEndpoints: [{matchLabels: {app: backend}}]
      toPorts:
        - ports: [{port: '8080', protocol: TCP}]
          rules:
            http: [{method: GET, path: /allowed}]
";

    fn egress(
        m: &Manager<FakeDatapath>,
        from: &str,
        to: IpAddr,
        port: u16,
    ) -> weir_datapath::Verdict {
        let ep = m.endpoint_by_container(&format!("c-{from}")).unwrap();
        m.datapath().verdict(
            ep.id,
            &weir_datapath::Flow {
                remote: m.datapath().identity_of(to),
                direction: Direction::Egress,
                protocol: proto::TCP,
                port,
            },
        )
    }

    #[test]
    fn proxies_see_endpoints_l7_policy_and_selectors() {
        use weir_l7_proxy::IdentityResolver;
        let mut m = Manager::new(ManagerConfig::default(), FakeDatapath::new()).unwrap();
        load(&mut m, "p.yaml", FQDN_AND_HTTP);
        let fe = m
            .create_endpoint(spec("fe", "frontend", "10.0.1.1"))
            .unwrap()
            .clone();
        let be = m
            .create_endpoint(spec("be", "backend", "10.0.1.2"))
            .unwrap()
            .clone();
        let h = m.proxy_handles().clone();
        let fe_pid = proxy_endpoint_id(fe.id).unwrap();
        assert_eq!(
            h.identities.local_endpoint("10.0.1.1".parse().unwrap()),
            Some(fe_pid)
        );
        assert_eq!(
            h.identities.identity("10.0.1.2".parse().unwrap()),
            be.identity
        );
        assert_eq!(
            egress(&m, "fe", "10.0.1.2".parse().unwrap(), 8080),
            DV::Redirect { proxy_port: 15001 }
        );
        // The HTTP store decides the redirected requests with the endpoint's L7 policy.
        let http = h.http.load();
        let l7 = http.endpoint(fe_pid).expect("published");
        assert!(
            l7.ports
                .contains_key(&(Direction::Egress, proto::TCP, 8080))
        );
        assert_eq!(h.dns.load().fqdn_selectors().rules().len(), 2);
        assert_eq!(
            h.dns.load().fqdn_selectors().matching("x.cdn.example.com."),
            vec![DnsRule::MatchPattern("*.cdn.example.com".into())]
        );

        // Deleting the endpoint withdraws it from the proxies.
        m.delete_endpoint("c-be").unwrap();
        assert_eq!(
            h.identities.local_endpoint("10.0.1.2".parse().unwrap()),
            None
        );
        m.delete_endpoint("c-fe").unwrap();
        assert!(h.http.load().endpoint(fe_pid).is_none());
        assert!(h.dns.load().endpoint(fe_pid).is_none());
    }

    #[test]
    fn dns_identities_are_saved_off_the_answer_path_and_strays_pruned_on_restore() {
        let dir = tempfile::tempdir().unwrap();
        let config = ManagerConfig {
            state_dir: Some(dir.path().to_path_buf()),
            ..ManagerConfig::default()
        };
        let api: IpAddr = "192.0.2.10".parse().unwrap();
        let name = DnsRule::MatchName("api.example.com".into());
        let mut m = Manager::new(config, FakeDatapath::new()).unwrap();
        load(&mut m, "p.yaml", FQDN_AND_HTTP);
        m.create_endpoint(spec("fe", "frontend", "10.0.1.1"))
            .unwrap();
        let state = dir.path().join("state.json");
        let before = std::fs::read_to_string(&state).unwrap();

        m.learn_fqdn(&[api], std::slice::from_ref(&name)).unwrap();
        let id = m.datapath().identity_of(api);
        assert!(!id.is_reserved());
        assert_eq!(
            std::fs::read_to_string(&state).unwrap(),
            before,
            "not written while the pod waits for its answer"
        );
        assert!(m.flush_state().unwrap());
        assert!(!m.flush_state().unwrap(), "nothing new to write");
        assert!(
            std::fs::read_to_string(&state)
                .unwrap()
                .contains(&id.0.to_string())
        );

        // An entry whose identity nothing knows, as a crash before a flush leaves behind.
        let stray: IpAddr = "198.51.100.7".parse().unwrap();
        m.datapath_mut()
            .upsert_ipcache(IpNet::from(stray), Identity(16_777_999))
            .unwrap();
        m.restore_endpoints().unwrap();
        assert_eq!(
            m.datapath().identity_of(stray),
            Identity::from(ReservedIdentity::World)
        );
        assert_eq!(m.datapath().identity_of(api), id, "known entries stay");
    }

    #[test]
    fn learned_addresses_open_before_return_and_close_on_expiry() {
        use weir_l7_proxy::IdentityResolver;
        let dir = tempfile::tempdir().unwrap();
        let config = ManagerConfig {
            state_dir: Some(dir.path().to_path_buf()),
            ..ManagerConfig::default()
        };
        let api: IpAddr = "192.0.2.10".parse().unwrap();
        let cdn: IpAddr = "192.0.2.20".parse().unwrap();
        let name = DnsRule::MatchName("api.example.com".into());
        let pattern = DnsRule::MatchPattern("*.cdn.example.com".into());
        let fe_pid;
        {
            let mut m = Manager::new(config.clone(), FakeDatapath::new()).unwrap();
            load(&mut m, "p.yaml", FQDN_AND_HTTP);
            let fe = m
                .create_endpoint(spec("fe", "frontend", "10.0.1.1"))
                .unwrap()
                .id;
            fe_pid = proxy_endpoint_id(fe).unwrap();
            assert_eq!(egress(&m, "fe", api, 443), DV::Drop { reason: 133 });

            m.learn_fqdn(&[api], std::slice::from_ref(&name)).unwrap();
            let id = m.datapath().identity_of(api);
            assert!(!id.is_reserved(), "own identity in the ipcache");
            assert_eq!(egress(&m, "fe", api, 443), DV::Allow, "open on return");
            assert_eq!(egress(&m, "fe", api, 80), DV::Drop { reason: 133 });
            assert_eq!(m.proxy_handles().identities.identity(api), id);
            // Idempotent: the same answer again changes nothing.
            m.learn_fqdn(&[api], std::slice::from_ref(&name)).unwrap();
            assert_eq!(m.datapath().identity_of(api), id);

            // An address selected by a second selector gets the union of both labels.
            m.learn_fqdn(&[cdn], std::slice::from_ref(&pattern))
                .unwrap();
            m.learn_fqdn(&[cdn], std::slice::from_ref(&name)).unwrap();
            let both = m.datapath().identity_of(cdn);
            let labels = m.compiler().identities().get(both).unwrap().labels.clone();
            assert!(labels.contains(&fqdn_label(&name)) && labels.contains(&fqdn_label(&pattern)));
            assert!(labels.contains(&Label::reserved("world")));
            assert_eq!(egress(&m, "fe", cdn, 443), DV::Allow);

            // Local endpoint addresses are never relabelled.
            m.learn_fqdn(&["10.0.1.1".parse().unwrap()], std::slice::from_ref(&name))
                .unwrap();
            assert_eq!(
                m.datapath().identity_of("10.0.1.1".parse().unwrap()),
                m.endpoint(fe).unwrap().identity
            );

            let now = SystemTime::now();
            let cache = m.proxy_handles().name_cache.clone();
            cache.insert(fe_pid, "api.example.com.", &[(api, 1)], now);
            cache.insert(fe_pid, "x.cdn.example.com.", &[(cdn, 3600)], now);
            m.save_name_cache().unwrap();
            // Too soon after learning: the answer might still be on its way into the cache.
            assert_eq!(
                m.gc_fqdn(now + Duration::from_secs(2), &weir_dns_proxy::NoConnections)
                    .unwrap(),
                0
            );
        }
        // A restart keeps what was learned (same numbers), from the saved cache.
        let mut m = Manager::new(config, FakeDatapath::new()).unwrap();
        load(&mut m, "p.yaml", FQDN_AND_HTTP);
        assert_eq!(m.restore_endpoints().unwrap(), 1);
        assert_eq!(egress(&m, "fe", api, 443), DV::Allow, "restored");
        assert_eq!(egress(&m, "fe", cdn, 443), DV::Allow, "restored");
        // Expiry closes access: ipcache entry gone, identity released.
        let id = m.datapath().identity_of(api);
        for f in m.fqdn.values_mut() {
            f.learned = Instant::now()
                .checked_sub(RELEARN_GRACE)
                .unwrap_or(f.learned);
        }
        let later = SystemTime::now() + Duration::from_secs(10);
        assert_eq!(m.gc_fqdn(later, &weir_dns_proxy::NoConnections).unwrap(), 1);
        assert_eq!(m.datapath().identity_of(api), Identity(2), "back to world");
        assert!(m.compiler().identities().get(id).is_none());
        assert_eq!(egress(&m, "fe", api, 443), DV::Drop { reason: 133 });
        assert_eq!(egress(&m, "fe", cdn, 443), DV::Allow, "unexpired stays");
        assert_eq!(m.proxy_handles().identities.identity(api), Identity(2));
    }
}
