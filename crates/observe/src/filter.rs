//! Hubble's flow filters: a flow passes when it matches any whitelist filter (or there is
//! none) and no blacklist filter. Within one [`FlowFilter`] every set field must match (AND);
//! within one field, any of the listed values (OR).

use std::net::IpAddr;

use ipnet::IpNet;
use regex_automata::meta::Regex;

use crate::model;
use crate::proto::flow::{Flow, FlowFilter, TcpFlags, Workload, layer4};

/// A filter value that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// An IP or CIDR did not parse.
    #[error("invalid IP or CIDR {0:?}")]
    Ip(String),
    /// A port is not a number in 0..=65535.
    #[error("invalid port {0:?}")]
    Port(String),
    /// A regular expression did not compile.
    #[error("invalid regular expression {0:?}: {1}")]
    Regex(String, String),
    /// A label selector did not parse.
    #[error("invalid label selector {0:?}")]
    Label(String),
    /// An HTTP status filter is not `NNN` or a prefix with `+` (`4+`, `40+`).
    #[error("invalid HTTP status code filter {0:?}")]
    Status(String),
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector: all requirements must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelSelector(Vec<LabelReq>);

/// Splits `a,b,key in (x,y)` at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s.get(start..i).unwrap_or(""));
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(s.get(start..).unwrap_or(""));
    parts
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

impl LabelSelector {
    fn parse(s: &str) -> Result<Self, FilterError> {
        let err = || FilterError::Label(s.to_string());
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(err());
            }
            let req = if let Some((k, v)) = p.split_once("!=") {
                LabelReq::NotIn(k.trim().to_string(), vec![v.trim().to_string()])
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                LabelReq::In(k.trim().to_string(), vec![v.trim().to_string()])
            } else if let Some((k, v)) = p.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), set_values(v).ok_or_else(err)?)
            } else if let Some((k, v)) = p.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), set_values(v).ok_or_else(err)?)
            } else if let Some(k) = p.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else {
                LabelReq::Exists(p.to_string())
            };
            let key = match &req {
                LabelReq::Exists(k)
                | LabelReq::NotExists(k)
                | LabelReq::In(k, _)
                | LabelReq::NotIn(k, _) => k,
            };
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(err());
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// Values of `key` among `source:key=value` labels; a selector key without a source
    /// (`app`) matches any source, one with a source (`k8s:app`) only that source.
    fn values<'a>(key: &str, labels: &'a [String]) -> Vec<&'a str> {
        labels
            .iter()
            .filter_map(|l| {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                let matches = if key.contains(':') {
                    k == key
                        || (key.starts_with("any:")
                            && k.split_once(':').map(|x| x.1) == key.split_once(':').map(|x| x.1))
                } else {
                    k.split_once(':').map_or(k, |(_, bare)| bare) == key
                };
                matches.then_some(v)
            })
            .collect()
    }

    fn matches(&self, labels: &[String]) -> bool {
        self.0.iter().all(|r| match r {
            LabelReq::Exists(k) => !Self::values(k, labels).is_empty(),
            LabelReq::NotExists(k) => Self::values(k, labels).is_empty(),
            LabelReq::In(k, vs) => Self::values(k, labels)
                .iter()
                .any(|v| vs.iter().any(|x| x == v)),
            LabelReq::NotIn(k, vs) => !Self::values(k, labels)
                .iter()
                .any(|v| vs.iter().any(|x| x == v)),
        })
    }
}

/// An HTTP status filter: exact code, or a prefix followed by `+`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StatusFilter {
    digits: String,
    prefix: bool,
}

impl StatusFilter {
    fn parse(s: &str) -> Result<Self, FilterError> {
        let (digits, prefix) = match s.strip_suffix('+') {
            Some(d) => (d, true),
            None => (s, false),
        };
        if digits.is_empty()
            || digits.len() > 3
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || (!prefix && digits.len() != 3)
        {
            return Err(FilterError::Status(s.to_string()));
        }
        Ok(StatusFilter {
            digits: digits.to_string(),
            prefix,
        })
    }

    fn matches(&self, code: u32) -> bool {
        let c = code.to_string();
        if self.prefix {
            c.len() == 3 && c.starts_with(&self.digits)
        } else {
            c == self.digits
        }
    }
}

/// A pod filter: `ns/prefix`, `ns/` (whole namespace) or `prefix` (any namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodFilter {
    namespace: Option<String>,
    prefix: String,
}

impl PodFilter {
    fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((ns, p)) => PodFilter {
                namespace: Some(ns.to_string()),
                prefix: p.to_string(),
            },
            None => PodFilter {
                namespace: None,
                prefix: s.to_string(),
            },
        }
    }

    fn matches(&self, namespace: &str, name: &str) -> bool {
        if let Some(ns) = &self.namespace
            && ns != namespace
        {
            return false;
        }
        // A bare prefix needs a pod: it never matches world or host peers.
        if self.namespace.is_none() && name.is_empty() {
            return false;
        }
        name.starts_with(&self.prefix)
    }
}

/// Glob match with `*` only (node names, FQDNs).
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = rest.get(pos + part.len()..).unwrap_or(""),
                None => return false,
            }
        }
    }
    true
}

fn fqdn_norm(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

/// One compiled [`FlowFilter`].
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    raw: FlowFilter,
    source_ip: Vec<IpNet>,
    destination_ip: Vec<IpNet>,
    source_pod: Vec<PodFilter>,
    destination_pod: Vec<PodFilter>,
    source_service: Vec<PodFilter>,
    destination_service: Vec<PodFilter>,
    source_label: Vec<LabelSelector>,
    destination_label: Vec<LabelSelector>,
    http_status: Vec<StatusFilter>,
    source_port: Vec<u16>,
    destination_port: Vec<u16>,
    dns_query: Vec<Regex>,
    http_path: Vec<Regex>,
}

fn nets(values: &[String]) -> Result<Vec<IpNet>, FilterError> {
    values
        .iter()
        .map(|v| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| FilterError::Ip(v.clone()))
        })
        .collect()
}

fn port_list(values: &[String]) -> Result<Vec<u16>, FilterError> {
    values
        .iter()
        .map(|v| v.parse::<u16>().map_err(|_| FilterError::Port(v.clone())))
        .collect()
}

fn regexes(values: &[String]) -> Result<Vec<Regex>, FilterError> {
    values
        .iter()
        .map(|v| Regex::new(v).map_err(|e| FilterError::Regex(v.clone(), e.to_string())))
        .collect()
}

fn labels(values: &[String]) -> Result<Vec<LabelSelector>, FilterError> {
    values.iter().map(|v| LabelSelector::parse(v)).collect()
}

fn flags_cover(want: &TcpFlags, have: &TcpFlags) -> bool {
    (!want.fin || have.fin)
        && (!want.syn || have.syn)
        && (!want.rst || have.rst)
        && (!want.psh || have.psh)
        && (!want.ack || have.ack)
        && (!want.urg || have.urg)
        && (!want.ece || have.ece)
        && (!want.cwr || have.cwr)
        && (!want.ns || have.ns)
}

fn workload_matches(want: &[Workload], have: &[Workload]) -> bool {
    want.iter().any(|w| {
        have.iter().any(|h| {
            (w.name.is_empty() || w.name == h.name) && (w.kind.is_empty() || w.kind == h.kind)
        })
    })
}

/// The URL's path: after `scheme://authority`, before `?`.
fn url_path(url: &str) -> &str {
    let rest = match url.split_once("://") {
        Some((_, r)) => r.find('/').and_then(|i| r.get(i..)).unwrap_or("/"),
        None => url,
    };
    rest.split(['?', '#']).next().unwrap_or(rest)
}

impl CompiledFilter {
    /// Compiles a filter, checking every IP, port, regex and selector.
    pub fn new(f: &FlowFilter) -> Result<Self, FilterError> {
        Ok(CompiledFilter {
            source_ip: nets(&f.source_ip)?,
            destination_ip: nets(&f.destination_ip)?,
            source_pod: f.source_pod.iter().map(|p| PodFilter::parse(p)).collect(),
            destination_pod: f
                .destination_pod
                .iter()
                .map(|p| PodFilter::parse(p))
                .collect(),
            source_service: f
                .source_service
                .iter()
                .map(|p| PodFilter::parse(p))
                .collect(),
            destination_service: f
                .destination_service
                .iter()
                .map(|p| PodFilter::parse(p))
                .collect(),
            source_label: labels(&f.source_label)?,
            destination_label: labels(&f.destination_label)?,
            http_status: f
                .http_status_code
                .iter()
                .map(|s| StatusFilter::parse(s))
                .collect::<Result<_, _>>()?,
            source_port: port_list(&f.source_port)?,
            destination_port: port_list(&f.destination_port)?,
            dns_query: regexes(&f.dns_query)?,
            http_path: regexes(&f.http_path)?,
            raw: f.clone(),
        })
    }

    /// Whether `flow` matches every set field.
    pub fn matches(&self, flow: &Flow) -> bool {
        let f = &self.raw;
        let none = crate::proto::flow::Endpoint::default();
        let src = flow.source.as_ref().unwrap_or(&none);
        let dst = flow.destination.as_ref().unwrap_or(&none);
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        let (sip, dip) = match &flow.ip {
            Some(i) => (ip(&i.source), ip(&i.destination)),
            None => (None, None),
        };
        let in_nets = |nets: &[IpNet], a: Option<IpAddr>| {
            nets.is_empty() || a.is_some_and(|a| nets.iter().any(|n| n.contains(&a)))
        };
        if !(f.uuid.is_empty() || f.uuid.contains(&flow.uuid))
            || !in_nets(&self.source_ip, sip)
            || !in_nets(&self.destination_ip, dip)
        {
            return false;
        }
        let pods = |fs: &[PodFilter], ep: &crate::proto::flow::Endpoint| {
            fs.is_empty() || fs.iter().any(|p| p.matches(&ep.namespace, &ep.pod_name))
        };
        if !pods(&self.source_pod, src) || !pods(&self.destination_pod, dst) {
            return false;
        }
        let services = |fs: &[PodFilter], svc: &Option<crate::proto::flow::Service>| {
            fs.is_empty()
                || svc
                    .as_ref()
                    .is_some_and(|s| fs.iter().any(|p| p.matches(&s.namespace, &s.name)))
        };
        if !services(&self.source_service, &flow.source_service)
            || !services(&self.destination_service, &flow.destination_service)
        {
            return false;
        }
        let fqdns = |fs: &[String], names: &[String]| {
            fs.is_empty()
                || fs.iter().any(|p| {
                    let p = fqdn_norm(p);
                    names.iter().any(|n| glob(&p, &fqdn_norm(n)))
                })
        };
        if !fqdns(&f.source_fqdn, &flow.source_names)
            || !fqdns(&f.destination_fqdn, &flow.destination_names)
        {
            return false;
        }
        let sel =
            |fs: &[LabelSelector], l: &[String]| fs.is_empty() || fs.iter().any(|s| s.matches(l));
        if !sel(&self.source_label, &src.labels) || !sel(&self.destination_label, &dst.labels) {
            return false;
        }
        if (!f.source_workload.is_empty() && !workload_matches(&f.source_workload, &src.workloads))
            || (!f.destination_workload.is_empty()
                && !workload_matches(&f.destination_workload, &dst.workloads))
        {
            return false;
        }
        if !(f.traffic_direction.is_empty()
            || f.traffic_direction.contains(&flow.traffic_direction))
            || !(f.verdict.is_empty() || f.verdict.contains(&flow.verdict))
        {
            return false;
        }
        if !f.event_type.is_empty() {
            let Some(et) = &flow.event_type else {
                return false;
            };
            if !f
                .event_type
                .iter()
                .any(|w| w.r#type == et.r#type && (!w.match_sub_type || w.sub_type == et.sub_type))
            {
                return false;
            }
        }
        let http = model::http(flow);
        if !self.http_status.is_empty()
            && !http
                .is_some_and(|h| h.code != 0 && self.http_status.iter().any(|s| s.matches(h.code)))
        {
            return false;
        }
        if !f.protocol.is_empty() && !f.protocol.iter().any(|p| protocol_matches(p, flow)) {
            return false;
        }
        let ports = model::ports(flow);
        let port_ok = |want: &[u16], have: Option<u32>| {
            want.is_empty() || have.is_some_and(|h| want.iter().any(|w| u32::from(*w) == h))
        };
        if !port_ok(&self.source_port, ports.map(|p| p.0))
            || !port_ok(&self.destination_port, ports.map(|p| p.1))
        {
            return false;
        }
        if !f.reply.is_empty() && !flow.is_reply.is_some_and(|r| f.reply.contains(&r)) {
            return false;
        }
        if !self.dns_query.is_empty()
            && !model::dns(flow)
                .is_some_and(|d| self.dns_query.iter().any(|r| r.is_match(&d.query)))
        {
            return false;
        }
        if !(f.source_identity.is_empty() || f.source_identity.contains(&src.identity))
            || !(f.destination_identity.is_empty()
                || f.destination_identity.contains(&dst.identity))
        {
            return false;
        }
        if !f.http_method.is_empty()
            && !http.is_some_and(|h| {
                f.http_method
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(&h.method))
            })
        {
            return false;
        }
        if !self.http_path.is_empty()
            && !http.is_some_and(|h| self.http_path.iter().any(|r| r.is_match(url_path(&h.url))))
        {
            return false;
        }
        if !f.tcp_flags.is_empty() {
            let have = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                Some(layer4::Protocol::Tcp(t)) => t.flags,
                _ => None,
            };
            let Some(have) = have else {
                return false;
            };
            if !f.tcp_flags.iter().any(|w| flags_cover(w, &have)) {
                return false;
            }
        }
        if !f.node_name.is_empty()
            && !f.node_name.iter().any(|p| {
                let p = p.split_once('/').map_or(p.as_str(), |(_, n)| n);
                p.is_empty() || glob(p, &flow.node_name)
            })
        {
            return false;
        }
        if !f.ip_version.is_empty() && !f.ip_version.contains(&(model::ip_version(flow) as i32)) {
            return false;
        }
        // Weir does not propagate trace contexts: a trace id filter matches nothing.
        f.trace_id.is_empty()
    }
}

fn protocol_matches(p: &str, flow: &Flow) -> bool {
    let l4 = flow.l4.as_ref().and_then(|l| l.protocol.as_ref());
    match p.to_ascii_lowercase().as_str() {
        "tcp" => matches!(l4, Some(layer4::Protocol::Tcp(_))),
        "udp" => matches!(l4, Some(layer4::Protocol::Udp(_))),
        "sctp" => matches!(l4, Some(layer4::Protocol::Sctp(_))),
        "icmp" => matches!(
            l4,
            Some(layer4::Protocol::IcmPv4(_) | layer4::Protocol::IcmPv6(_))
        ),
        "icmpv4" => matches!(l4, Some(layer4::Protocol::IcmPv4(_))),
        "icmpv6" => matches!(l4, Some(layer4::Protocol::IcmPv6(_))),
        "http" => model::http(flow).is_some(),
        "dns" => model::dns(flow).is_some(),
        _ => false,
    }
}

/// A whitelist and a blacklist, compiled.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    whitelist: Vec<CompiledFilter>,
    blacklist: Vec<CompiledFilter>,
}

impl FilterSet {
    /// Compiles both lists.
    pub fn new(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Self, FilterError> {
        Ok(FilterSet {
            whitelist: whitelist
                .iter()
                .map(CompiledFilter::new)
                .collect::<Result<_, _>>()?,
            blacklist: blacklist
                .iter()
                .map(CompiledFilter::new)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether `flow` passes: some whitelist filter matches (or there is none) and no
    /// blacklist filter does.
    pub fn matches(&self, flow: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_match() {
        let labels = vec![
            "k8s:app=web".to_string(),
            "k8s:io.kubernetes.pod.namespace=prod".to_string(),
            "reserved:host".to_string(),
        ];
        let cases = [
            ("app=web", true),
            ("k8s:app=web", true),
            ("any:app=web", true),
            ("container:app=web", false),
            ("app==web", true),
            ("app!=web", false),
            ("app in (api, web)", true),
            ("app notin (api,web)", false),
            ("app", true),
            ("!app", false),
            ("reserved:host", true),
            ("app=web,io.kubernetes.pod.namespace=prod", true),
            ("app=web,io.kubernetes.pod.namespace=dev", false),
            ("tier", false),
        ];
        for (sel, want) in cases {
            let s = LabelSelector::parse(sel);
            assert!(s.is_ok(), "{sel}");
            assert_eq!(s.is_ok_and(|s| s.matches(&labels)), want, "{sel}");
        }
        for bad in ["", "app in web", "a b=c", ",", "=x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_filters() {
        let m = |f: &str, c: u32| StatusFilter::parse(f).is_ok_and(|s| s.matches(c));
        assert!(m("4+", 403) && m("40+", 404) && m("404", 404));
        assert!(!m("4+", 503) && !m("404", 403));
        for bad in ["", "+", "4x", "1234", "40"] {
            assert!(StatusFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs_and_paths() {
        assert!(glob("k8s*", "k8s-node1"));
        assert!(glob("*.example.com", "api.example.com"));
        assert!(!glob("*.example.com", "example.org"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert_eq!(url_path("http://h:80/a/b?x=1"), "/a/b");
        assert_eq!(url_path("/x?y"), "/x");
        assert_eq!(url_path("http://h"), "/");
    }

    #[test]
    fn bad_filter_values_are_errors() {
        let f = FlowFilter {
            source_ip: vec!["10.0.0.300".into()],
            ..FlowFilter::default()
        };
        assert!(matches!(CompiledFilter::new(&f), Err(FilterError::Ip(_))));
        let f = FlowFilter {
            http_path: vec!["(".into()],
            ..FlowFilter::default()
        };
        assert!(matches!(
            CompiledFilter::new(&f),
            Err(FilterError::Regex(..))
        ));
        let f = FlowFilter {
            destination_port: vec!["70000".into()],
            ..FlowFilter::default()
        };
        assert!(matches!(CompiledFilter::new(&f), Err(FilterError::Port(_))));
    }
}
