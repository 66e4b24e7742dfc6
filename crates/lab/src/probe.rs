//! Real traffic for a scenario's flows: TCP connects with a deadline, UDP request/response,
//! ICMP echo over a raw socket, HTTP requests and DNS queries, each from the source's network
//! namespace; all of a scenario's flows run at once, so a run costs about one deadline.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use weir_scenario::{DenyReason, Expect, FlowProto, FlowSpec, Peer, Scenario};

use crate::cluster::has_l7_rules;
use crate::lab::{Lab, NODE_IP};
use crate::sys;

/// What the network did with a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The connection or exchange went through.
    Allow,
    /// Nothing came back before the deadline (a drop).
    Deny,
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
    /// What happened.
    pub observed: Observed,
}

impl FlowOutcome {
    /// `Some(true)` when observed equals expected, `None` when skipped.
    pub fn passed(&self) -> Option<bool> {
        match (&self.observed, self.expected) {
            (Observed::Skipped(_), _) => None,
            (Observed::Allow, Expect::Allow) | (Observed::Deny, Expect::Deny) => Some(true),
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
    s
}

/// Why a flow cannot be checked with L3/L4 traffic alone, if it cannot.
pub fn skip_reason(s: &Scenario, f: &FlowSpec) -> Option<String> {
    let l7_reason = matches!(f.reason, Some(DenyReason::Http403 | DenyReason::DnsRefused));
    if f.after_dns.is_some() || l7_reason || (has_l7_rules(s) && f.expect == Expect::Allow) {
        return Some("needs the L7/DNS proxy (issues 7/8)".into());
    }
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
    })
}

/// Runs every flow of `s` against the lab at once and returns one outcome per flow, in order.
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
    let observed: Vec<Observed> = std::thread::scope(|scope| {
        let handles: Vec<_> = plans
            .into_iter()
            .map(|(i, p)| {
                scope.spawn(move || match p {
                    Err(o) => o,
                    Ok(plan) => match sys::enter_netns(&plan.netns) {
                        Ok(()) => probe(&plan, deadline, i),
                        Err(e) => Observed::Error(e.to_string()),
                    },
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Observed::Error("probe thread panicked".into()))
            })
            .collect()
    });
    s.flows
        .iter()
        .zip(observed)
        .map(|(f, observed)| FlowOutcome {
            scenario: s.name.clone(),
            line: f.line,
            flow: describe(f),
            expected: f.expect,
            observed,
        })
        .collect()
}

fn probe(p: &Plan, deadline: Duration, seq: usize) -> Observed {
    let r = match &p.kind {
        Kind::Tcp => tcp(p, deadline, b"weir-lab ping\n".to_vec()),
        Kind::Http(h) => tcp(p, deadline, http_request(h)),
        Kind::TcpDns(name) => {
            // DNS over TCP: the message with a two-byte length in front.
            let q = dns_query(name, seq);
            let mut msg = u16::try_from(q.len()).unwrap_or(0).to_be_bytes().to_vec();
            msg.extend(q);
            tcp(p, deadline, msg)
        }
        Kind::Udp => udp(p, deadline, b"weir-lab ping\n".to_vec()),
        Kind::Dns(name) => udp(p, deadline, dns_query(name, seq)),
        Kind::Icmp(t) => icmp(p, deadline, *t, seq),
    };
    r.unwrap_or_else(|e| Observed::Error(e.to_string()))
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

fn tcp(p: &Plan, deadline: Duration, msg: Vec<u8>) -> std::io::Result<Observed> {
    let s = bound(p, Type::STREAM, Protocol::TCP)?;
    let addr = SockAddr::from(SocketAddr::new(IpAddr::V4(p.dst), p.port));
    match s.connect_timeout(&addr, deadline) {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Ok(Observed::Deny),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Ok(Observed::Allow);
        }
        Err(e) => return Err(e),
    }
    let mut stream: std::net::TcpStream = s.into();
    stream.set_read_timeout(Some(deadline))?;
    stream.write_all(&msg)?;
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => Ok(Observed::Allow),
        Ok(_) => Ok(Observed::Error("connection closed without data".into())),
        Err(e) if is_timeout(&e) => Ok(Observed::Error(
            "connected but no data came back (a proxy holding the connection?)".into(),
        )),
        Err(e) => Err(e),
    }
}

fn udp(p: &Plan, deadline: Duration, msg: Vec<u8>) -> std::io::Result<Observed> {
    let s = bound(p, Type::DGRAM, Protocol::UDP)?;
    s.connect(&SockAddr::from(SocketAddr::new(IpAddr::V4(p.dst), p.port)))?;
    s.set_read_timeout(Some(deadline))?;
    s.send(&msg)?;
    let mut buf = [0u8; 1500];
    match (&s).read(&mut buf) {
        Ok(_) => Ok(Observed::Allow),
        Err(e) if is_timeout(&e) => Ok(Observed::Deny),
        // ICMP port unreachable came back: the datagram got through.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(Observed::Allow),
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
    fn dns_query_encodes_labels() {
        let q = dns_query("api.example.com.", 0);
        assert_eq!(q.get(12..16), Some(&[3, b'a', b'p', b'i'][..]));
        assert_eq!(q.get(q.len() - 5..), Some(&[0, 0, 1, 0, 1][..]));
    }
}
