//! The scenario file format and its strict parser.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use weir_policy_model::yaml::{Field, MapReader, YamlError, parse_documents};

/// One scenario: a small cluster, its policies, and flows with the verdict they must get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The file it came from.
    pub file: String,
    /// `name`, or the file name.
    pub name: String,
    /// `description`.
    pub description: Option<String>,
    /// Namespace labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The pods.
    pub endpoints: Vec<EndpointSpec>,
    /// What the cluster DNS answers, by name (lower-case, no trailing dot).
    pub dns: BTreeMap<String, Vec<IpAddr>>,
    /// The policies, as one multi-document YAML text.
    pub policies: PolicyText,
    /// Names of policy objects the scenario expects Weir (like Cilium) to reject; the other
    /// objects still apply, as when `kubectl apply -f` submits them one by one.
    pub rejected_policies: Vec<String>,
    /// The flows, in order.
    pub flows: Vec<FlowSpec>,
}

/// The `policies` block and where it sits in the scenario file, so that errors in it point at
/// the scenario file's own lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyText {
    /// The YAML text.
    pub text: String,
    /// Lines before the block's first line in the scenario file.
    pub line_offset: usize,
    /// Columns of indentation the block scalar removed.
    pub column_offset: usize,
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Unique name, used in flows.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod IP.
    pub ip: IpAddr,
    /// Named container ports.
    pub ports: BTreeMap<String, u16>,
    /// Service account (`default` when absent).
    pub service_account: String,
}

/// A flow endpoint: a pod, the local node, another node, or an outside address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A pod by name.
    Endpoint(String),
    /// The local node.
    Host,
    /// Another node of the cluster.
    RemoteNode,
    /// An address outside the cluster.
    World(IpAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Endpoint(n) => f.write_str(n),
            Peer::Host => f.write_str("host"),
            Peer::RemoteNode => f.write_str("remote-node"),
            Peer::World(ip) => write!(f, "world:{ip}"),
        }
    }
}

/// A flow's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowProto {
    /// TCP
    Tcp,
    /// UDP
    Udp,
    /// SCTP
    Sctp,
    /// ICMP (ICMPv6 between IPv6 peers)
    Icmp,
}

impl fmt::Display for FlowProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowProto::Tcp => "TCP",
            FlowProto::Udp => "UDP",
            FlowProto::Sctp => "SCTP",
            FlowProto::Icmp => "ICMP",
        })
    }
}

/// The HTTP request a flow carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpSpec {
    /// Method, as sent.
    pub method: String,
    /// Path, with any query string.
    pub path: String,
    /// Host header.
    pub host: Option<String>,
    /// Other headers.
    pub headers: Vec<(String, String)>,
}

/// The expected verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The flow must be allowed.
    Allow,
    /// The flow must be denied.
    Deny,
}

/// Why a flow is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DenyReason {
    /// No allow matched (drop reason 133).
    PolicyDenied,
    /// A deny rule matched (drop reason 181).
    PolicyDeny,
    /// The HTTP proxy answered 403.
    Http403,
    /// The DNS proxy refused the query.
    DnsRefused,
}

impl DenyReason {
    /// The name used in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::PolicyDenied => "policy-denied",
            DenyReason::PolicyDeny => "policy-deny",
            DenyReason::Http403 => "http-403",
            DenyReason::DnsRefused => "dns-refused",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            DenyReason::PolicyDenied,
            DenyReason::PolicyDeny,
            DenyReason::Http403,
            DenyReason::DnsRefused,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// One flow and what it must get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSpec {
    /// Line of the flow in the scenario file.
    pub line: usize,
    /// Source.
    pub from: Peer,
    /// Destination.
    pub to: Peer,
    /// Protocol.
    pub proto: FlowProto,
    /// Destination port (for a reply: the original connection's destination port, `sport`).
    pub port: u16,
    /// ICMP type.
    pub icmp_type: Option<u8>,
    /// The HTTP request, if the flow is one.
    pub http: Option<HttpSpec>,
    /// The name queried, if the flow is a DNS query.
    pub dns_query: Option<String>,
    /// The name the source resolved just before.
    pub after_dns: Option<String>,
    /// Whether this is a reply of an earlier flow.
    pub reply: bool,
    /// Expected verdict.
    pub expect: Expect,
    /// Expected reason, when given.
    pub reason: Option<DenyReason>,
}

/// A scenario file that could not be read: file, line, column, field and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{error}")]
pub struct ScenarioError {
    /// The file.
    pub file: String,
    /// What and where.
    pub error: YamlError,
}

/// Parses a scenario file. Unknown keys are errors; every error found is returned.
pub fn parse_scenario(file: &str, text: &str) -> Result<Scenario, Vec<ScenarioError>> {
    let wrap = |errors: Vec<YamlError>| -> Vec<ScenarioError> {
        errors
            .into_iter()
            .map(|error| ScenarioError {
                file: file.to_string(),
                error,
            })
            .collect()
    };
    let docs = parse_documents(text).map_err(|e| wrap(vec![e]))?;
    let [doc] = docs.as_slice() else {
        return Err(wrap(vec![YamlError::new(
            Default::default(),
            "",
            "a scenario file holds exactly one YAML document",
        )]));
    };
    let mut errors = Vec::new();
    let scenario = read_scenario(file, text, doc, &mut errors);
    if errors.is_empty() {
        Ok(scenario)
    } else {
        Err(wrap(errors))
    }
}

fn ok<T>(r: Result<T, YamlError>, errors: &mut Vec<YamlError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

fn read_scenario(
    file: &str,
    text: &str,
    doc: &weir_policy_model::yaml::Node,
    errors: &mut Vec<YamlError>,
) -> Scenario {
    let mut s = Scenario {
        file: file.to_string(),
        name: file.rsplit('/').next().unwrap_or(file).to_string(),
        description: None,
        namespaces: BTreeMap::new(),
        endpoints: Vec::new(),
        dns: BTreeMap::new(),
        policies: PolicyText::default(),
        rejected_policies: Vec::new(),
        flows: Vec::new(),
    };
    let Some(mut m) = ok(MapReader::new(doc, ""), errors) else {
        return s;
    };
    if let Some(f) = m.optional("name")
        && let Some(v) = ok(f.str(), errors)
    {
        s.name = v.to_string();
    }
    if let Some(f) = m.optional("description") {
        s.description = ok(f.str(), errors).map(str::to_string);
    }
    if let Some(f) = m.optional("namespaces")
        && let Some(mut nm) = ok(f.map(), errors)
    {
        let names: Vec<String> = mapping_keys(nm.node());
        for name in names {
            if let Some(labels) = nm.optional(&name) {
                s.namespaces.insert(name, string_map(&labels, errors));
            } else {
                s.namespaces.insert(name, BTreeMap::new());
            }
        }
        errors.extend(nm.finish());
    }
    if let Some(f) = m.optional("endpoints")
        && let Some(items) = ok(f.list(), errors)
    {
        for item in items {
            if let Some(ep) = read_endpoint(&item, errors) {
                if s.endpoints.iter().any(|e| e.name == ep.name) {
                    errors.push(item.error(format!("endpoint name {:?} is used twice", ep.name)));
                }
                s.endpoints.push(ep);
            }
        }
    }
    if let Some(f) = m.optional("dns")
        && let Some(mut dm) = ok(f.map(), errors)
    {
        for name in mapping_keys(dm.node()) {
            let Some(v) = dm.optional(&name) else {
                continue;
            };
            let mut ips = Vec::new();
            for item in ok(v.list(), errors).unwrap_or_default() {
                if let Some(t) = ok(item.scalar_text(), errors) {
                    match t.parse::<IpAddr>() {
                        Ok(ip) => ips.push(ip),
                        Err(_) => errors.push(item.error(format!("{t:?} is not an IP address"))),
                    }
                }
            }
            s.dns
                .insert(name.trim_end_matches('.').to_ascii_lowercase(), ips);
        }
        errors.extend(dm.finish());
    }
    match m.required("policies") {
        Ok(f) => {
            if let Some(t) = ok(f.str(), errors) {
                s.policies = locate_block(text, f.node.position.line, t);
            }
        }
        Err(e) => errors.push(e),
    }
    if let Some(f) = m.optional("rejected_policies") {
        for item in ok(f.list(), errors).unwrap_or_default() {
            if let Some(t) = ok(item.str(), errors) {
                s.rejected_policies.push(t.to_string());
            }
        }
    }
    match m.required("flows") {
        Ok(f) => {
            for item in ok(f.list(), errors).unwrap_or_default() {
                if let Some(flow) = read_flow(&item, errors) {
                    s.flows.push(flow);
                }
            }
        }
        Err(e) => errors.push(e),
    }
    errors.extend(m.finish());
    for flow in &s.flows {
        for peer in [&flow.from, &flow.to] {
            if let Peer::Endpoint(n) = peer
                && !s.endpoints.iter().any(|e| &e.name == n)
            {
                errors.push(YamlError::new(
                    weir_policy_model::yaml::Position {
                        line: flow.line,
                        column: 1,
                    },
                    "flows",
                    format!("unknown endpoint {n:?}"),
                ));
            }
        }
    }
    s
}

/// Finds where a block scalar's text starts, so that policy errors can be mapped back.
fn locate_block(text: &str, key_line: usize, value: &str) -> PolicyText {
    let lines: Vec<&str> = text.lines().collect();
    // The block's content starts on the line after the `policies: |` indicator.
    let first = lines
        .iter()
        .enumerate()
        .skip(key_line)
        .find(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i, l.len() - l.trim_start().len()));
    match first {
        Some((i, indent)) => PolicyText {
            text: value.to_string(),
            line_offset: i,
            column_offset: indent,
        },
        None => PolicyText {
            text: value.to_string(),
            line_offset: key_line,
            column_offset: 0,
        },
    }
}

fn mapping_keys(node: &weir_policy_model::yaml::Node) -> Vec<String> {
    match &node.kind {
        weir_policy_model::yaml::NodeKind::Mapping(entries) => entries
            .iter()
            .filter_map(|(k, _)| k.as_scalar().map(|s| s.value.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

fn string_map(f: &Field<'_>, errors: &mut Vec<YamlError>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let NodeKind::Mapping(entries) = &f.node.kind else {
        if !f.node.is_null() {
            errors.push(f.error(format!("expected a mapping, found {}", f.node.type_name())));
        }
        return out;
    };
    for (k, v) in entries {
        let key = Field::new(k, f.path.clone());
        let Some(name) = ok(key.str(), errors) else {
            continue;
        };
        let value = Field::new(v, format!("{}.{name}", f.path));
        if let Some(t) = ok(value.scalar_text(), errors) {
            out.insert(name.to_string(), t.to_string());
        }
    }
    out
}

use weir_policy_model::yaml::NodeKind;

fn parse_ip(f: &Field<'_>, errors: &mut Vec<YamlError>) -> Option<IpAddr> {
    let t = ok(f.scalar_text(), errors)?;
    match t.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            errors.push(f.error(format!("{t:?} is not an IP address")));
            None
        }
    }
}

fn read_u16(f: &Field<'_>, errors: &mut Vec<YamlError>) -> Option<u16> {
    let i = ok(f.int(), errors)?;
    match u16::try_from(i) {
        Ok(p) => Some(p),
        Err(_) => {
            errors.push(f.error(format!("{i} is not a port number")));
            None
        }
    }
}

fn read_endpoint(item: &Field<'_>, errors: &mut Vec<YamlError>) -> Option<EndpointSpec> {
    let mut m = ok(item.map(), errors)?;
    let name = m.required("name").and_then(|f| f.str().map(str::to_string));
    let namespace = m
        .required("namespace")
        .and_then(|f| f.str().map(str::to_string));
    let labels = m
        .optional("labels")
        .map(|f| string_map(&f, errors))
        .unwrap_or_default();
    let ip = match m.required("ip") {
        Ok(f) => parse_ip(&f, errors),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let mut ports = BTreeMap::new();
    if let Some(f) = m.optional("ports") {
        for (name, port) in string_map(&f, errors) {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {
                    ports.insert(name, p);
                }
                _ => errors
                    .push(f.error(format!("named port {name}: {port:?} is not a port number"))),
            }
        }
    }
    let service_account = m
        .optional("service_account")
        .and_then(|f| ok(f.str(), errors).map(str::to_string))
        .unwrap_or_else(|| "default".to_string());
    errors.extend(m.finish());
    let name = ok(name, errors)?;
    let namespace = ok(namespace, errors)?;
    Some(EndpointSpec {
        name,
        namespace,
        labels,
        ip: ip?,
        ports,
        service_account,
    })
}

fn read_peer(f: &Field<'_>, errors: &mut Vec<YamlError>) -> Option<Peer> {
    let t = ok(f.str(), errors)?;
    Some(match t {
        "host" => Peer::Host,
        "remote-node" => Peer::RemoteNode,
        _ => match t.strip_prefix("world:") {
            Some(ip) => match ip.parse() {
                Ok(ip) => Peer::World(ip),
                Err(_) => {
                    errors.push(f.error(format!("{ip:?} is not an IP address")));
                    return None;
                }
            },
            None => Peer::Endpoint(t.to_string()),
        },
    })
}

fn read_flow(item: &Field<'_>, errors: &mut Vec<YamlError>) -> Option<FlowSpec> {
    let mut m = ok(item.map(), errors)?;
    let from = m
        .required("from")
        .map_err(|e| errors.push(e))
        .ok()
        .and_then(|f| read_peer(&f, errors));
    let to = m
        .required("to")
        .map_err(|e| errors.push(e))
        .ok()
        .and_then(|f| read_peer(&f, errors));
    let proto = match m.required("proto") {
        Ok(f) => match ok(f.str(), errors) {
            Some("TCP") => Some(FlowProto::Tcp),
            Some("UDP") => Some(FlowProto::Udp),
            Some("SCTP") => Some(FlowProto::Sctp),
            Some("ICMP") => Some(FlowProto::Icmp),
            Some(other) => {
                errors.push(f.error(format!("{other:?} is not one of TCP, UDP, SCTP, ICMP")));
                None
            }
            None => None,
        },
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let reply = m
        .optional("reply")
        .and_then(|f| ok(f.bool(), errors))
        .unwrap_or(false);
    let dport = m.optional("dport").and_then(|f| read_u16(&f, errors));
    let sport = m.optional("sport").and_then(|f| read_u16(&f, errors));
    let icmp_type = m.optional("icmp_type").and_then(|f| {
        let v = ok(f.int(), errors)?;
        u8::try_from(v)
            .map_err(|_| errors.push(f.error(format!("{v} is not an ICMP type"))))
            .ok()
    });
    let http = m.optional("http").and_then(|f| read_http(&f, errors));
    let dns_query = m
        .optional("dns_query")
        .and_then(|f| ok(f.str(), errors).map(str::to_string));
    let after_dns = m
        .optional("after_dns")
        .and_then(|f| ok(f.str(), errors).map(str::to_string));
    let expect = match m.required("expect") {
        Ok(f) => match ok(f.str(), errors) {
            Some("allow") => Some(Expect::Allow),
            Some("deny") => Some(Expect::Deny),
            Some(other) => {
                errors.push(f.error(format!("{other:?} is not allow or deny")));
                None
            }
            None => None,
        },
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let reason = m.optional("reason").and_then(|f| {
        let t = ok(f.str(), errors)?;
        DenyReason::parse(t).or_else(|| {
            errors.push(f.error(format!(
                "{t:?} is not one of policy-denied, policy-deny, http-403, dns-refused"
            )));
            None
        })
    });
    errors.extend(m.finish());
    let proto = proto?;
    let port = match (reply, dport, sport, proto) {
        (_, _, _, FlowProto::Icmp) => icmp_type.map(u16::from).unwrap_or(8),
        (false, Some(p), None, _) => p,
        (true, None, Some(p), _) => p,
        (false, _, _, _) => {
            errors.push(item.error("a flow needs `dport` (and no `sport`)"));
            return None;
        }
        (true, _, _, _) => {
            errors.push(item.error(
                "a reply flow needs `sport` (the original destination port) and no `dport`",
            ));
            return None;
        }
    };
    if reason.is_some() && expect == Some(Expect::Allow) {
        errors.push(item.error("`reason` only goes with `expect: deny`"));
    }
    Some(FlowSpec {
        line: item.node.position.line,
        from: from?,
        to: to?,
        proto,
        port,
        icmp_type,
        http,
        dns_query,
        after_dns,
        reply,
        expect: expect?,
        reason,
    })
}

fn read_http(f: &Field<'_>, errors: &mut Vec<YamlError>) -> Option<HttpSpec> {
    let mut m = ok(f.map(), errors)?;
    let method = m
        .optional("method")
        .and_then(|f| ok(f.str(), errors).map(str::to_string))
        .unwrap_or_else(|| "GET".into());
    let path = m
        .optional("path")
        .and_then(|f| ok(f.str(), errors).map(str::to_string))
        .unwrap_or_else(|| "/".into());
    let host = m
        .optional("host")
        .and_then(|f| ok(f.str(), errors).map(str::to_string));
    let headers = m
        .optional("headers")
        .map(|f| string_map(&f, errors).into_iter().collect())
        .unwrap_or_default();
    errors.extend(m.finish());
    Some(HttpSpec {
        method,
        path,
        host,
        headers,
    })
}
