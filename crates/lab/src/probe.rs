//! Real traffic for a scenario's flows: TCP connects with a deadline, UDP request/response,
//! ICMP echo over a raw socket, HTTP requests and DNS queries, each from the source's network
//! namespace; all of a scenario's flows run at once, so a run costs about one deadline.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use weir_scenario::{DenyReason, Expect, FlowProto, FlowSpec, Peer, Scenario};

use crate::lab::{Lab, NODE_IP};
use crate::sys;

/// What the network did with a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The connection or exchange went through.
    Allow,
    /// Nothing came back before the deadline (a drop).
    Deny,
    /// A proxy answered with a denial: HTTP 403 or DNS REFUSED.
    Refused(String),
    /// Not run, and why.
    Skipped(String),
    /// The probe itself failed.
    Error(String),
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Observed::Allow => f.write_str("allow"),
            Observed::Deny => f.write_str("deny"),
            Observed::Refused(how) => write!(f, "deny ({how})"),
            Observed::Skipped(why) => write!(f, "skipped: {why}"),
            Observed::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// One flow's result.
#[derive(Debug, Clone)]
pub struct FlowOutcome {
    /// The scenario's name.
    pub scenario: String,
    /// The flow's line in its file.
    pub line: usize,
    /// The flow, e.g. `frontend-1 -> backend-1 TCP/8080`.
    pub flow: String,
    /// The expected verdict.
    pub expected: Expect,
    /// The expected reason of a denial, when the scenario gives one.
    pub reason: Option<DenyReason>,
    /// What happened.
    pub observed: Observed,
}

impl FlowOutcome {
    /// `Some(true)` when observed equals expected, `None` when skipped. A denial must also be
    /// of the expected kind: a drop for `policy-denied`/`policy-deny`, the proxy's answer for
    /// `http-403`/`dns-refused`.
    pub fn passed(&self) -> Option<bool> {
        let proxy_reason = matches!(
            self.reason,
            Some(DenyReason::Http403 | DenyReason::DnsRefused)
        );
        let drop_reason = matches!(
            self.reason,
            Some(DenyReason::PolicyDenied | DenyReason::PolicyDeny)
        );
        match (&self.observed, self.expected) {
            (Observed::Skipped(_), _) => None,
            (Observed::Allow, Expect::Allow) => Some(true),
            (Observed::Deny, Expect::Deny) => Some(!proxy_reason),
            (Observed::Refused(_), Expect::Deny) => Some(!drop_reason),
            _ => Some(false),
        }
    }
}

/// Where a probe runs from and goes to.
struct Plan {
    netns: PathBuf,
    bind: Option<Ipv4Addr>,
    dst: Ipv4Addr,
    port: u16,
    kind: Kind,
    /// Resolve this name through kube-dns from the source first (`after_dns`).
    resolve_first: Option<(Ipv4Addr, String)>,
}

enum Kind {
    Tcp,
    Http(weir_scenario::HttpSpec),
    Udp,
    Dns(String),
    TcpDns(String),
    Icmp(u8),
}

/// The flow's text, as `weir policy test` shows it.
fn describe(f: &FlowSpec) -> String {
    let mut s = format!("{} -> {} {}", f.from, f.to, f.proto);
    if f.proto == FlowProto::Icmp {
        s.push_str(&format!(" type {}", f.icmp_type.unwrap_or(8)));
    } else if f.reply {
        s.push_str(&format!(" reply sport {}", f.port));
    } else {
        s.push_str(&format!("/{}", f.port));
    }
    if let Some(h) = &f.http {
        s.push_str(&format!(" {} {}", h.method, h.path));
    }
    if let Some(q) = &f.dns_query {
        s.push_str(&format!(" query {q}"));
    }
    if let Some(name) = &f.after_dns {
        s.push_str(&format!(" after resolving {name}"));
    }
    s
}

/// Why a flow cannot be checked with real traffic in the lab, if it cannot.
pub fn skip_reason(s: &Scenario, f: &FlowSpec) -> Option<String> {
    if f.proto == FlowProto::Sctp {
        return Some("SCTP is not probed".into());
    }
    if f.proto == FlowProto::Icmp && f.icmp_type.unwrap_or(8) != 8 {
        return Some("only ICMP echo requests are probed".into());
    }
    if matches!(f.from, Peer::RemoteNode) || matches!(f.to, Peer::RemoteNode) {
        return Some("the lab has one node".into());
    }
    for peer in [&f.from, &f.to] {
        let v6 = match peer {
            Peer::World(ip) => ip.is_ipv6(),
            Peer::Endpoint(n) => s
                .endpoints
                .iter()
                .find(|e| &e.name == n)
                .is_none_or(|e| e.ip.is_ipv6()),
            _ => false,
        };
        if v6 {
            return Some("IPv6 is not in the lab".into());
        }
    }
    None
}

fn plan(lab: &Lab, s: &Scenario, f: &FlowSpec) -> Result<Plan, String> {
    // A reply is checked as the connection it answers.
    let (src, dst) = if f.reply {
        (&f.to, &f.from)
    } else {
        (&f.from, &f.to)
    };
    let (netns, bind) = match src {
        Peer::Endpoint(n) => (
            sys::netns_path(&lab.pod(n).ok_or(format!("no pod {n}"))?.netns),
            None,
        ),
        Peer::Host => (sys::netns_path(&lab.config().node_ns()), None),
        Peer::World(IpAddr::V4(ip)) => (sys::netns_path(&lab.config().world_ns()), Some(*ip)),
        other => return Err(format!("cannot send from {other}")),
    };
    let dst = match dst {
        Peer::Endpoint(n) => lab.pod(n).ok_or(format!("no pod {n}"))?.spec.ip,
        Peer::Host => NODE_IP,
        Peer::World(IpAddr::V4(ip)) => *ip,
        other => return Err(format!("cannot send to {other}")),
    };
    let resolve_first = match &f.after_dns {
        Some(name) => Some((
            kube_dns(lab).ok_or("no kube-dns pod to resolve with")?,
            name.clone(),
        )),
        None => None,
    };
    let _ = s;
    // Port 53 gets a real query, so that dnsmasq answers (it ignores anything else).
    let query = f
        .dns_query
        .clone()
        .or_else(|| (f.port == 53).then(|| "kubernetes.default.svc.cluster.local".to_string()));
    let kind = match (f.proto, &f.http, query) {
        (FlowProto::Udp, _, Some(q)) => Kind::Dns(q),
        (FlowProto::Tcp, _, Some(q)) => Kind::TcpDns(q),
        (FlowProto::Tcp, Some(h), _) => Kind::Http(h.clone()),
        (FlowProto::Tcp, None, _) => Kind::Tcp,
        (FlowProto::Udp, _, _) => Kind::Udp,
        (FlowProto::Icmp, _, _) => Kind::Icmp(f.icmp_type.unwrap_or(8)),
        (FlowProto::Sctp, _, _) => return Err("SCTP".into()),
    };
    Ok(Plan {
        netns,
        bind,
        dst,
        port: f.port,
        kind,
        resolve_first,
    })
}

/// The address of the lab's kube-dns pod (label `k8s-app=kube-dns`).
fn kube_dns(lab: &Lab) -> Option<Ipv4Addr> {
    lab.state()
        .pods
        .iter()
        .find(|p| {
            p.spec
                .labels
                .get("k8s-app")
                .is_some_and(|v| v == "kube-dns")
        })
        .map(|p| p.spec.ip)
}

/// Whether a scenario's flows depend on each other (DNS answers open `toFQDNs` addresses,
/// and a flow before the lookup must see them closed), so they run one after another.
fn ordered(s: &Scenario) -> bool {
    s.flows
        .iter()
        .any(|f| f.after_dns.is_some() || f.dns_query.is_some())
        || s.policies.text.contains("toFQDNs")
}

/// Runs every flow of `s` against the lab and returns one outcome per flow, in order. Flows
/// run at once, or one after another when they depend on DNS lookups.
pub fn run_flows(lab: &Lab, s: &Scenario, deadline: Duration) -> Vec<FlowOutcome> {
    let plans: Vec<(usize, Result<Plan, Observed>)> = s
        .flows
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let p = match skip_reason(s, f) {
                Some(why) => Err(Observed::Skipped(why)),
                None => plan(lab, s, f).map_err(Observed::Error),
            };
            (i, p)
        })
        .collect();
    let one_by_one = ordered(s);
    let observed: Vec<Observed> = std::thread::scope(|scope| {
        let run = move |(i, p): (usize, Result<Plan, Observed>)| match p {
            Err(o) => o,
            Ok(plan) => match sys::enter_netns(&plan.netns) {
                Ok(()) => probe(&plan, deadline, i),
                Err(e) => Observed::Error(e.to_string()),
            },
        };
        let join = |h: std::thread::ScopedJoinHandle<'_, Observed>| {
            h.join()
                .unwrap_or_else(|_| Observed::Error("probe thread panicked".into()))
        };
        if one_by_one {
            // Each probe still gets a fresh thread: it enters the source's namespace.
            plans
                .into_iter()
                .map(|p| join(scope.spawn(move || run(p))))
                .collect()
        } else {
            let handles: Vec<_> = plans
                .into_iter()
                .map(|p| scope.spawn(move || run(p)))
                .collect();
            handles.into_iter().map(join).collect()
        }
    });
    s.flows
        .iter()
        .zip(observed)
        .map(|(f, observed)| FlowOutcome {
            scenario: s.name.clone(),
            line: f.line,
            flow: describe(f),
            expected: f.expect,
            reason: f.reason,
            observed,
        })
        .collect()
}

fn probe(p: &Plan, deadline: Duration, seq: usize) -> Observed {
    if let Some((server, name)) = &p.resolve_first {
        let lookup = Plan {
            netns: p.netns.clone(),
            bind: p.bind,
            dst: *server,
            port: 53,
            kind: Kind::Dns(name.clone()),
            resolve_first: None,
        };
        match udp(&lookup, deadline, dns_query(name, seq)) {
            Ok(Reply::Data(_)) => {}
            Ok(other) => {
                return Observed::Error(format!("resolving {name} first: {}", other.observed()));
            }
            Err(e) => return Observed::Error(format!("resolving {name} first: {e}")),
        }
    }
    let r = match &p.kind {
        Kind::Tcp => tcp(p, deadline, b"weir-lab ping\n".to_vec()).map(Reply::observed),
        Kind::Http(h) => tcp(p, deadline, http_request(h)).map(|r| r.http()),
        Kind::TcpDns(name) => {
            // DNS over TCP: the message with a two-byte length in front.
            let q = dns_query(name, seq);
            let mut msg = u16::try_from(q.len()).unwrap_or(0).to_be_bytes().to_vec();
            msg.extend(q);
            tcp(p, deadline, msg).map(|r| r.dns(2))
        }
        Kind::Udp => udp(p, deadline, b"weir-lab ping\n".to_vec()).map(Reply::observed),
        Kind::Dns(name) => udp(p, deadline, dns_query(name, seq)).map(|r| r.dns(0)),
        Kind::Icmp(t) => icmp(p, deadline, *t, seq),
    };
    r.unwrap_or_else(|e| Observed::Error(e.to_string()))
}

/// What came back on a TCP or UDP exchange.
enum Reply {
    /// The first bytes of the answer.
    Data(Vec<u8>),
    /// Connection refused or port unreachable: the packet got through, nobody listened.
    Refused,
    /// Nothing before the deadline.
    Nothing,
    /// A connection that carried nothing back.
    Silent(String),
}

impl Reply {
    fn observed(self) -> Observed {
        match self {
            Reply::Data(_) | Reply::Refused => Observed::Allow,
            Reply::Nothing => Observed::Deny,
            Reply::Silent(why) => Observed::Error(why),
        }
    }

    /// An HTTP answer: 403 is the proxy's denial, any other status went through.
    fn http(self) -> Observed {
        match self {
            Reply::Data(d) => match http_status(&d) {
                Some(403) => Observed::Refused("http 403".into()),
                Some(_) => Observed::Allow,
                None => Observed::Error("not an HTTP answer".into()),
            },
            other => other.observed(),
        }
    }

    /// A DNS answer (after `skip` bytes of TCP length): REFUSED is the proxy's denial.
    fn dns(self, skip: usize) -> Observed {
        match self {
            Reply::Data(d) => match d.get(skip + 3).map(|b| b & 0x0f) {
                Some(5) => Observed::Refused("dns REFUSED".into()),
                Some(_) => Observed::Allow,
                None => Observed::Error("short DNS answer".into()),
            },
            other => other.observed(),
        }
    }
}

/// The status code of an HTTP/1.x response's first line.
fn http_status(data: &[u8]) -> Option<u16> {
    let line = data.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

fn bound(p: &Plan, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, ty, Some(proto))?;
    if let Some(src) = p.bind {
        s.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(src), 0)))?;
    }
    Ok(s)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// Opens a TCP connection and exchanges one message.
/// A refused connection counts as allowed: policy drops never answer with a reset.
fn http_request(h: &weir_scenario::HttpSpec) -> Vec<u8> {
    let mut req = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        h.method,
        h.path,
        h.host.as_deref().unwrap_or("lab")
    );
    for (k, v) in &h.headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

fn tcp(p: &Plan, deadline: Duration, msg: Vec<u8>) -> std::io::Result<Reply> {
    let s = bound(p, Type::STREAM, Protocol::TCP)?;
    let addr = SockAddr::from(SocketAddr::new(IpAddr::V4(p.dst), p.port));
    match s.connect_timeout(&addr, deadline) {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Ok(Reply::Nothing),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Ok(Reply::Refused);
        }
        Err(e) => return Err(e),
    }
    let mut stream: std::net::TcpStream = s.into();
    stream.set_read_timeout(Some(deadline))?;
    stream.write_all(&msg)?;
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => Ok(Reply::Data(buf.get(..n).unwrap_or_default().to_vec())),
        Ok(_) => Ok(Reply::Silent("connection closed without data".into())),
        Err(e) if is_timeout(&e) => Ok(Reply::Silent(
            "connected but no data came back (a proxy holding the connection?)".into(),
        )),
        Err(e) => Err(e),
    }
}

fn udp(p: &Plan, deadline: Duration, msg: Vec<u8>) -> std::io::Result<Reply> {
    let s = bound(p, Type::DGRAM, Protocol::UDP)?;
    s.connect(&SockAddr::from(SocketAddr::new(IpAddr::V4(p.dst), p.port)))?;
    s.set_read_timeout(Some(deadline))?;
    s.send(&msg)?;
    let mut buf = [0u8; 1500];
    match (&s).read(&mut buf) {
        Ok(n) => Ok(Reply::Data(buf.get(..n).unwrap_or_default().to_vec())),
        Err(e) if is_timeout(&e) => Ok(Reply::Nothing),
        // ICMP port unreachable came back: the datagram got through.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(Reply::Refused),
        Err(e) => Err(e),
    }
}

/// A DNS query for `name` (type A), id derived from `seq`.
pub fn dns_query(name: &str, seq: usize) -> Vec<u8> {
    let id = u16::try_from(seq % 65536).unwrap_or(0).wrapping_add(0x5700);
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        let bytes = label.as_bytes();
        q.push(u8::try_from(bytes.len().min(63)).unwrap_or(63));
        q.extend_from_slice(bytes.get(..63.min(bytes.len())).unwrap_or_default());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = match chunk {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum = sum.wrapping_add(u32::from(word));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap_or(0xffff))
}

fn icmp(p: &Plan, deadline: Duration, icmp_type: u8, seq: usize) -> std::io::Result<Observed> {
    let s = bound(p, Type::RAW, Protocol::ICMPV4)?;
    let id = u16::try_from((std::process::id() as usize + seq) % 65536).unwrap_or(1);
    let mut pkt = vec![icmp_type, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&1u16.to_be_bytes());
    pkt.extend_from_slice(b"weir-lab");
    let sum = checksum(&pkt).to_be_bytes();
    if let Some(c) = pkt.get_mut(2..4) {
        c.copy_from_slice(&sum);
    }
    s.send_to(&pkt, &SockAddr::from(SocketAddr::new(IpAddr::V4(p.dst), 0)))?;
    let end = Instant::now() + deadline;
    let mut buf = [0u8; 1500];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Observed::Deny);
        }
        s.set_read_timeout(Some(left))?;
        let n = match (&s).read(&mut buf) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => return Ok(Observed::Deny),
            Err(e) => return Err(e),
        };
        let data = buf.get(..n).unwrap_or_default();
        let ihl = usize::from(data.first().map_or(0, |b| b & 0x0f)) * 4;
        let src = data
            .get(12..16)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(Ipv4Addr::from);
        let icmp = data.get(ihl..).unwrap_or_default();
        let reply_id = icmp
            .get(4..6)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_be_bytes);
        if icmp.first() == Some(&0) && reply_id == Some(id) && src == Some(p.dst) {
            return Ok(Observed::Allow);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_an_echo_request() {
        // Type 8, code 0, id 1, seq 1: 0xf7fd by hand.
        assert_eq!(checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }

    #[test]
    fn http_status_and_dns_rcode() {
        assert_eq!(http_status(b"HTTP/1.1 403 Forbidden\r\n"), Some(403));
        assert_eq!(http_status(b"SSH-2.0"), None);
        let refused = Reply::Data(vec![0x57, 0, 0x81, 0x85]).dns(0);
        assert_eq!(refused, Observed::Refused("dns REFUSED".into()));
        let nx = Reply::Data(vec![0, 20, 0x57, 0, 0x81, 0x83]).dns(2);
        assert_eq!(nx, Observed::Allow);
    }

    #[test]
    fn a_denial_must_be_of_the_expected_kind() {
        let o = |observed, reason| FlowOutcome {
            scenario: "s".into(),
            line: 1,
            flow: "f".into(),
            expected: Expect::Deny,
            reason,
            observed,
        };
        let refused = Observed::Refused("http 403".into());
        assert_eq!(
            o(refused.clone(), Some(DenyReason::Http403)).passed(),
            Some(true)
        );
        assert_eq!(
            o(Observed::Deny, Some(DenyReason::Http403)).passed(),
            Some(false)
        );
        assert_eq!(
            o(refused.clone(), Some(DenyReason::PolicyDenied)).passed(),
            Some(false)
        );
        assert_eq!(o(refused, None).passed(), Some(true));
    }

    #[test]
    fn dns_query_encodes_labels() {
        let q = dns_query("api.example.com.", 0);
        assert_eq!(q.get(12..16), Some(&[3, b'a', b'p', b'i'][..]));
        assert_eq!(q.get(q.len() - 5..), Some(&[0, 0, 1, 0, 1][..]));
    }
}
