//! Evaluates a scenario's flows offline, with the compiler's `decide` and the L7 matchers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use weir_identity::{Identity, ReservedIdentity};
use weir_identity::{
    IdentityAllocator, InMemoryAllocator, Label, LabelFilter, LabelSet, cidr_labels,
    pod_identity_labels,
};
use weir_l7_match::{DnsMatcher, DnsRule, HttpMatcher, HttpRequestView};
use weir_policy_compiler::{
    Compiler, CompilerConfig, DROP_POLICY_DENY, Decision, EndpointInfo, EndpointPolicy, Flow,
    L7Verdict, NamedPorts, Verdict, fqdn_label, proto,
};
use weir_policy_model::yaml::{MapReader, parse_documents};
use weir_policy_model::{Direction, ParseError, Peer as PolicyPeer, Policy, parse_objects};

use crate::format::{DenyReason, Expect, FlowProto, FlowSpec, Peer, Scenario};

/// What happened to a flow, or what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed.
    Allow,
    /// Denied, for this reason.
    Deny(DenyReason),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allow => f.write_str("allow"),
            Outcome::Deny(r) => write!(f, "deny ({})", r.as_str()),
        }
    }
}

/// The result of one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowResult {
    /// The flow's line in the scenario file.
    pub line: usize,
    /// The flow, e.g. `frontend-1 -> backend-1 TCP/8080 GET /api`.
    pub flow: String,
    /// What the scenario expects (the reason only when it names one).
    pub expected: Expect,
    /// The expected reason, if given.
    pub expected_reason: Option<DenyReason>,
    /// What Weir decided.
    pub actual: Outcome,
    /// Why: the rules behind each side's decision.
    pub explanation: String,
    /// Whether actual matches expected.
    pub passed: bool,
}

/// The results of one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioRun {
    /// The scenario's file.
    pub file: String,
    /// The scenario's name.
    pub name: String,
    /// Problems that make the whole scenario fail (invalid policies not listed in
    /// `rejected_policies`, expected rejections that did not happen).
    pub errors: Vec<String>,
    /// Policy objects rejected as the scenario expected, with their errors.
    pub rejected: Vec<String>,
    /// One result per flow.
    pub flows: Vec<FlowResult>,
}

impl ScenarioRun {
    /// Flows that passed.
    pub fn passed(&self) -> usize {
        self.flows.iter().filter(|f| f.passed).count()
    }

    /// Flows that failed, counting a scenario-level error as one failure.
    pub fn failed(&self) -> usize {
        self.flows.iter().filter(|f| !f.passed).count() + self.errors.len()
    }
}

/// Runs every flow of a scenario.
pub fn run_scenario(s: &Scenario) -> ScenarioRun {
    let mut run = ScenarioRun {
        file: s.file.clone(),
        name: s.name.clone(),
        errors: Vec::new(),
        rejected: Vec::new(),
        flows: Vec::new(),
    };
    let policies = load_policies(s, &mut run);
    let mut world = World::new(s, policies);
    let mut done: Vec<(FlowSpec, Outcome)> = Vec::new();
    for flow in &s.flows {
        let (actual, explanation) = world.evaluate(flow, &done);
        let passed = match (flow.expect, actual) {
            (Expect::Allow, Outcome::Allow) => true,
            (Expect::Deny, Outcome::Deny(r)) => flow.reason.is_none_or(|want| want == r),
            _ => false,
        };
        run.flows.push(FlowResult {
            line: flow.line,
            flow: describe(flow),
            expected: flow.expect,
            expected_reason: flow.reason,
            actual,
            explanation,
            passed,
        });
        done.push((flow.clone(), actual));
    }
    run
}

/// Parses the policies object by object; maps error positions into the scenario file.
pub(crate) fn load_policies(s: &Scenario, run: &mut ScenarioRun) -> Vec<Policy> {
    let shift = |mut e: ParseError| {
        if e.location.line > 0 {
            e.location.line += s.policies.line_offset;
            e.location.column += s.policies.column_offset;
        }
        e
    };
    // Object names, in the same order as `parse_objects` returns results (null documents
    // skipped), so that a rejection can be matched against `rejected_policies`.
    let names: Vec<Option<String>> = parse_documents(&s.policies.text)
        .map(|docs| {
            docs.iter()
                .filter(|d| !d.is_null())
                .map(|d| {
                    let mut m = MapReader::new(d, "").ok()?;
                    let mut meta = m.optional("metadata")?.map().ok()?;
                    Some(meta.optional("name")?.str().ok()?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut policies = Vec::new();
    let mut expected: BTreeSet<&str> = s.rejected_policies.iter().map(String::as_str).collect();
    for (i, result) in parse_objects(&s.file, &s.policies.text)
        .into_iter()
        .enumerate()
    {
        match result {
            Ok(p) => policies.extend(p),
            Err(errors) => {
                let name = names.get(i).cloned().flatten();
                let text: Vec<String> =
                    errors.0.into_iter().map(|e| shift(e).to_string()).collect();
                match name.as_deref() {
                    Some(n) if expected.remove(n) => {
                        run.rejected.extend(
                            text.into_iter()
                                .map(|t| format!("policy {n} rejected: {t}")),
                        );
                    }
                    _ => run.errors.extend(text),
                }
            }
        }
    }
    for n in expected {
        run.errors.push(format!(
            "{}: policy {n} was expected to be rejected but is valid",
            s.file
        ));
    }
    policies
}

pub(crate) fn describe(f: &FlowSpec) -> String {
    let mut d = format!("{} -> {} {}", f.from, f.to, f.proto);
    match f.proto {
        FlowProto::Icmp => d.push_str(&format!(" type {}", f.port)),
        _ if f.reply => d.push_str(&format!(" reply from port {}", f.port)),
        _ => d.push_str(&format!("/{}", f.port)),
    }
    if let Some(h) = &f.http {
        d.push_str(&format!(" {} {}", h.method, h.path));
    }
    if let Some(q) = &f.dns_query {
        d.push_str(&format!(" query {q}"));
    }
    if let Some(n) = &f.after_dns {
        d.push_str(&format!(" after resolving {n}"));
    }
    d
}

/// The cluster of a scenario: identities, the compiler, learned DNS answers.
pub(crate) struct World<'s> {
    scenario: &'s Scenario,
    compiler: Compiler,
    allocator: InMemoryAllocator,
    /// Endpoint name → (identity, compile input).
    endpoints: BTreeMap<String, EndpointInfo>,
    /// CIDR identities by prefix.
    cidrs: Vec<(IpNet, Identity)>,
    /// Learned DNS answers: IP → identity.
    learned: BTreeMap<IpAddr, Identity>,
    /// Every `toFQDNs` selector in the policies.
    fqdn_selectors: Vec<DnsRule>,
}

impl<'s> World<'s> {
    pub(crate) fn new(s: &'s Scenario, policies: Vec<Policy>) -> Self {
        let mut compiler = Compiler::new(CompilerConfig::default());
        let mut allocator = InMemoryAllocator::new();
        let filter = LabelFilter::default();
        let mut endpoints = BTreeMap::new();
        let mut ports_by_identity: BTreeMap<Identity, NamedPorts> = BTreeMap::new();
        let mut labels_by_identity: BTreeMap<Identity, LabelSet> = BTreeMap::new();
        for ep in &s.endpoints {
            let ns_labels = s.namespaces.get(&ep.namespace).cloned().unwrap_or_default();
            let labels = pod_identity_labels(
                &ep.namespace,
                &ep.labels,
                &ns_labels,
                &ep.service_account,
                "default",
                &filter,
            );
            let Ok(alloc) = allocator.allocate(&labels) else {
                continue;
            };
            // Scenario ports are TCP; the name resolves for every protocol a rule asks for.
            let named: NamedPorts = ep
                .ports
                .iter()
                .map(|(n, p)| (n.clone(), (proto::TCP, *p)))
                .collect();
            ports_by_identity
                .entry(alloc.identity)
                .or_default()
                .extend(named.clone());
            labels_by_identity.insert(alloc.identity, labels.clone());
            endpoints.insert(
                ep.name.clone(),
                EndpointInfo {
                    identity: alloc.identity,
                    labels,
                    named_ports: named,
                },
            );
        }
        for (id, labels) in labels_by_identity {
            compiler.upsert_identity(
                id,
                labels,
                ports_by_identity.remove(&id).unwrap_or_default(),
            );
        }
        // Every prefix a policy names gets a CIDR identity, as Cilium allocates them.
        let mut prefixes = BTreeSet::new();
        let mut fqdn_selectors = Vec::new();
        for peer in policies.iter().flat_map(Policy::peers) {
            match peer {
                PolicyPeer::Cidr { cidr, except } => {
                    prefixes.insert(*cidr);
                    prefixes.extend(except.iter().copied());
                }
                PolicyPeer::Fqdn(r) => fqdn_selectors.push(r.clone()),
                _ => {}
            }
        }
        let mut cidrs = Vec::new();
        for prefix in prefixes {
            if prefix.prefix_len() == 0 {
                continue; // 0.0.0.0/0 and ::/0 are the world identity itself.
            }
            let labels = cidr_labels(prefix);
            if let Ok(a) = allocator.allocate(&labels) {
                compiler.upsert_identity(a.identity, labels, NamedPorts::new());
                cidrs.push((prefix, a.identity));
            }
        }
        for p in policies {
            compiler.upsert_policy(p);
        }
        World {
            scenario: s,
            compiler,
            allocator,
            endpoints,
            cidrs,
            learned: BTreeMap::new(),
            fqdn_selectors,
        }
    }

    /// What the node's ipcache holds now: CIDR identities, then pod addresses, then learned
    /// DNS answers (a later, same-prefix entry wins, as `ip_identity` prefers them), plus the
    /// addresses given to `host` and `remote-node`.
    pub(crate) fn ipcache(
        &self,
        host: &[IpAddr],
        remote_node: &[IpAddr],
    ) -> Vec<(IpNet, Identity)> {
        let mut m: BTreeMap<IpNet, Identity> = BTreeMap::new();
        for (p, id) in &self.cidrs {
            m.insert(p.trunc(), *id);
        }
        for ep in &self.scenario.endpoints {
            if let Some(info) = self.endpoints.get(&ep.name) {
                m.insert(IpNet::from(ep.ip), info.identity);
            }
        }
        for (ip, id) in &self.learned {
            m.insert(IpNet::from(*ip), *id);
        }
        for ip in host {
            m.insert(IpNet::from(*ip), ReservedIdentity::Host.into());
        }
        for ip in remote_node {
            m.insert(IpNet::from(*ip), ReservedIdentity::RemoteNode.into());
        }
        m.into_iter().collect()
    }

    /// A pod's identity, if it has one.
    pub(crate) fn endpoint_identity(&self, name: &str) -> Option<Identity> {
        self.endpoints.get(name).map(|e| e.identity)
    }

    pub(crate) fn ip_identity(&self, ip: IpAddr) -> Identity {
        if let Some(id) = self.learned.get(&ip) {
            return *id;
        }
        if let Some(ep) = self.scenario.endpoints.iter().find(|e| e.ip == ip)
            && let Some(info) = self.endpoints.get(&ep.name)
        {
            return info.identity;
        }
        self.cidrs
            .iter()
            .filter(|(p, _)| p.contains(&ip))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or(Identity::from(ReservedIdentity::World))
    }

    pub(crate) fn peer_identity(&self, p: &Peer) -> Identity {
        match p {
            Peer::Endpoint(n) => self
                .endpoints
                .get(n)
                .map(|e| e.identity)
                .unwrap_or(Identity::ANY),
            Peer::Host => ReservedIdentity::Host.into(),
            Peer::RemoteNode => ReservedIdentity::RemoteNode.into(),
            Peer::World(ip) => self.ip_identity(*ip),
        }
    }

    pub(crate) fn is_ipv6(&self, p: &Peer) -> bool {
        match p {
            Peer::Endpoint(n) => self
                .scenario
                .endpoints
                .iter()
                .any(|e| &e.name == n && e.ip.is_ipv6()),
            Peer::World(ip) => ip.is_ipv6(),
            _ => false,
        }
    }

    pub(crate) fn policy_of(&self, name: &str) -> Option<EndpointPolicy> {
        self.endpoints.get(name).map(|ep| self.compiler.compile(ep))
    }

    fn evaluate(&mut self, flow: &FlowSpec, done: &[(FlowSpec, Outcome)]) -> (Outcome, String) {
        if flow.reply {
            let original = done.iter().rev().find(|(f, _)| {
                !f.reply
                    && f.from == flow.to
                    && f.to == flow.from
                    && f.proto == flow.proto
                    && f.port == flow.port
            });
            return match original {
                Some((_, Outcome::Allow)) => (
                    Outcome::Allow,
                    "reply of an allowed connection (conntrack)".into(),
                ),
                // The proxy answered (403, REFUSED) on a connection the datapath allowed.
                Some((_, Outcome::Deny(DenyReason::Http403 | DenyReason::DnsRefused))) => (
                    Outcome::Allow,
                    "reply on a connection allowed at L3/L4 (the proxy answered the request)"
                        .into(),
                ),
                Some(_) => (
                    Outcome::Deny(DenyReason::PolicyDenied),
                    "reply of a connection that was denied".into(),
                ),
                None => (
                    Outcome::Deny(DenyReason::PolicyDenied),
                    "no earlier connection to reply to".into(),
                ),
            };
        }
        if let Some(name) = &flow.after_dns {
            self.resolve(&flow.from, name);
        }
        // A DNS query teaches the node its answer only when it went through the DNS proxy;
        // `connect` learns it then.
        self.connect(flow)
    }

    /// The source asks the cluster DNS for `name`; learn the answer if a DNS rule let the
    /// query through the proxy.
    pub(crate) fn resolve(&mut self, from: &Peer, name: &str) {
        let servers: Vec<String> = self
            .scenario
            .endpoints
            .iter()
            .filter(|e| e.labels.get("k8s-app").is_some_and(|v| v == "kube-dns"))
            .map(|e| e.name.clone())
            .collect();
        for server in servers {
            for proto in [FlowProto::Udp, FlowProto::Tcp] {
                let query = FlowSpec {
                    line: 0,
                    from: from.clone(),
                    to: Peer::Endpoint(server.clone()),
                    proto,
                    port: 53,
                    icmp_type: None,
                    http: None,
                    dns_query: Some(name.to_string()),
                    after_dns: None,
                    reply: false,
                    expect: Expect::Allow,
                    reason: None,
                };
                if self.connect(&query).0 == Outcome::Allow && self.learned_name(name) {
                    return;
                }
            }
        }
    }

    fn learned_name(&self, name: &str) -> bool {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        self.scenario
            .dns
            .get(&n)
            .is_some_and(|ips| ips.iter().all(|ip| self.learned.contains_key(ip)))
    }

    /// The DNS proxy released an answer for `name`: give its IPs identities carrying the
    /// `fqdn:` labels of every `toFQDNs` selector that matches the name.
    fn learn(&mut self, name: &str) {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        let Some(ips) = self.scenario.dns.get(&n).cloned() else {
            return;
        };
        let Ok(matcher) = DnsMatcher::compile(&self.fqdn_selectors) else {
            return;
        };
        let labels_of_name: Vec<Label> = matcher
            .matching_rules(&n)
            .into_iter()
            .filter_map(|i| self.fqdn_selectors.get(i))
            .map(fqdn_label)
            .collect();
        for ip in ips {
            let mut labels = cidr_labels(IpNet::from(ip));
            for l in &labels_of_name {
                labels.insert(l.clone());
            }
            if let Ok(a) = self.allocator.allocate(&labels) {
                self.compiler
                    .upsert_identity(a.identity, labels, NamedPorts::new());
                self.learned.insert(ip, a.identity);
            }
        }
    }

    /// A new connection (or request) from `flow.from` to `flow.to`.
    pub(crate) fn connect(&mut self, flow: &FlowSpec) -> (Outcome, String) {
        let src = self.peer_identity(&flow.from);
        let dst = self.peer_identity(&flow.to);
        let v6 = self.is_ipv6(&flow.from) || self.is_ipv6(&flow.to);
        let protocol = match flow.proto {
            FlowProto::Tcp => proto::TCP,
            FlowProto::Udp => proto::UDP,
            FlowProto::Sctp => proto::SCTP,
            FlowProto::Icmp if v6 => proto::ICMPV6,
            FlowProto::Icmp => proto::ICMP,
        };
        let mut notes = Vec::new();
        let mut dns_through_proxy = false;
        for (side, direction, local, remote) in [
            ("egress", Direction::Egress, &flow.from, dst),
            ("ingress", Direction::Ingress, &flow.to, src),
        ] {
            let Peer::Endpoint(name) = local else {
                continue;
            };
            let Some(policy) = self.policy_of(name) else {
                continue;
            };
            let decision = policy.decide(&Flow {
                direction,
                remote,
                protocol,
                port: flow.port,
            });
            let why = match decision.verdict {
                Verdict::Allow
                    if decision.derived_from.is_empty() && !policy.enforced(direction) =>
                {
                    format!("allowed (no policy enforces {side} on it)")
                }
                Verdict::Allow
                    if decision.derived_from.is_empty()
                        && direction == Direction::Ingress
                        && remote == Identity::from(ReservedIdentity::Host) =>
                {
                    "allowed (the local host may always reach its pods)".to_string()
                }
                _ => decision.to_string(),
            };
            notes.push(format!("{side} {name}: {why}"));
            match decision.verdict {
                Verdict::Deny { reason } => {
                    let r = if reason == DROP_POLICY_DENY {
                        DenyReason::PolicyDeny
                    } else {
                        DenyReason::PolicyDenied
                    };
                    return (Outcome::Deny(r), notes.join("; "));
                }
                Verdict::Allow => {}
                Verdict::Redirect { .. } => {
                    match self.check_l7(&policy, direction, remote, protocol, flow, &decision) {
                        Ok((note, via_dns)) => {
                            notes.push(note);
                            dns_through_proxy |= via_dns;
                        }
                        Err((reason, note)) => {
                            notes.push(note);
                            return (Outcome::Deny(reason), notes.join("; "));
                        }
                    }
                }
            }
        }
        if dns_through_proxy && let Some(q) = &flow.dns_query {
            self.learn(q);
        }
        if notes.is_empty() {
            notes.push("no local endpoint on either side".into());
        }
        (Outcome::Allow, notes.join("; "))
    }

    /// The proxy's view of a redirected flow. Ok((note, whether a DNS answer was seen)).
    fn check_l7(
        &self,
        policy: &EndpointPolicy,
        direction: Direction,
        remote: Identity,
        protocol: u8,
        flow: &FlowSpec,
        decision: &Decision,
    ) -> Result<(String, bool), (DenyReason, String)> {
        let to_dns_proxy = matches!(decision.verdict, Verdict::Redirect { proxy_port } if proxy_port == self.compiler.config().dns_proxy_port);
        let set = match policy.l7_verdict(direction, remote, protocol, flow.port) {
            L7Verdict::NotRedirected => return Ok(("proxy: no L7 rules".into(), false)),
            L7Verdict::AllowAll { .. } => {
                return Ok((
                    "proxy: an L4 allow covers this peer, every request passes".into(),
                    to_dns_proxy && flow.dns_query.is_some(),
                ));
            }
            L7Verdict::Denied => {
                return Err((
                    DenyReason::PolicyDenied,
                    "proxy: no allow for this peer".into(),
                ));
            }
            L7Verdict::Rules(set) => set,
        };
        if !set.dns.is_empty() {
            let Some(q) = &flow.dns_query else {
                return Ok(("DNS proxy: not a DNS query".into(), false));
            };
            let rules: Vec<DnsRule> = set.dns.iter().map(|(r, _)| r.clone()).collect();
            return match DnsMatcher::compile(&rules).ok().and_then(|m| m.matches(q)) {
                Some(i) => Ok((
                    format!(
                        "DNS proxy: {q} allowed by {}",
                        set.dns
                            .get(i)
                            .map(|(_, r)| r.to_string())
                            .unwrap_or_default()
                    ),
                    true,
                )),
                None => Err((
                    DenyReason::DnsRefused,
                    format!("DNS proxy: {q} matches no dns rule: REFUSED"),
                )),
            };
        }
        if !set.http.is_empty() {
            let Some(h) = &flow.http else {
                return Ok((
                    "HTTP proxy: connection allowed, no request given".into(),
                    false,
                ));
            };
            let rules: Vec<_> = set.http.iter().map(|(r, _)| r.clone()).collect();
            let headers: Vec<(&str, &str)> = h
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let view = HttpRequestView {
                method: &h.method,
                path: &h.path,
                host: h.host.as_deref(),
                headers: &headers,
            };
            return match HttpMatcher::compile(&rules)
                .ok()
                .and_then(|m| m.matches(&view))
            {
                Some(i) => Ok((
                    format!(
                        "HTTP proxy: allowed by {}",
                        set.http
                            .get(i)
                            .map(|(_, r)| r.to_string())
                            .unwrap_or_default()
                    ),
                    false,
                )),
                None => Err((
                    DenyReason::Http403,
                    format!(
                        "HTTP proxy: {} {} matches no http rule: 403",
                        h.method, h.path
                    ),
                )),
            };
        }
        Ok(("proxy: no rules".into(), false))
    }
}
