//! Turning datapath verdict events and proxy records into Hubble flows: endpoint, identity
//! and policy-decision data come from a [`FlowContext`] the agent implements.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_datapath::{DatapathEvent, EndpointId, EventKind};
use weir_dns_proxy::{DnsRecord, DnsRecordKind, DnsVerdict, Transport};
use weir_identity::Identity;
use weir_l7_proxy::{L7Record, RecordVerdict};
use weir_policy_compiler::{Decision, Verdict as PolicyVerdict};
use weir_policy_model::{Direction, PolicyName};

use crate::model::{self, EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT, match_type};
use crate::proto::flow::{
    CiliumEventType, Dns, Endpoint, Flow, FlowType, Http, IcmPv4, IcmPv6, Ip, IpVersion,
    L7FlowType, Layer4, Layer7, NetworkInterface, Policy, Sctp, Tcp, TcpFlags, TrafficDirection,
    Udp, Verdict, layer4, layer7,
};
use crate::snapshot::ContextSnapshot;

/// What the flow model shows of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointMeta {
    /// The endpoint id (0 for remote peers).
    pub id: u32,
    /// Its security identity.
    pub identity: u32,
    /// Its Kubernetes namespace.
    pub namespace: String,
    /// Its pod name.
    pub pod_name: String,
    /// Its labels, `source:key=value`.
    pub labels: Vec<String>,
}

/// What enrichment needs to know about the node: local endpoints, identities, policy.
pub trait FlowContext {
    /// A local endpoint by id.
    fn local_endpoint(&self, id: EndpointId) -> Option<EndpointMeta>;
    /// A local endpoint owning `ip`.
    fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointMeta>;
    /// The labels of an identity, `source:key=value` (empty when unknown).
    fn identity_labels(&self, identity: Identity) -> Vec<String>;
    /// The policy decision of `endpoint` for a new connection, with the rules behind it.
    fn decide(&self, endpoint: EndpointId, flow: &weir_policy_compiler::Flow) -> Option<Decision>;
    /// The DNS names `endpoint` learned for `ip` from DNS answers (see [`crate::names`]):
    /// Hubble's `source_names` and `destination_names`. None by default.
    fn names_of(&self, _endpoint: EndpointId, _ip: IpAddr) -> Vec<String> {
        Vec::new()
    }
}

/// The questions enrichment asks, answered with borrowed data where the answerer keeps it
/// (a [`ContextSnapshot`]) and owned data where it builds it (a [`FlowContext`]).
pub(crate) trait Resolve {
    fn local(&self, id: EndpointId) -> Option<Cow<'_, EndpointMeta>>;
    fn by_ip(&self, ip: IpAddr) -> Option<Cow<'_, EndpointMeta>>;
    fn labels(&self, identity: Identity) -> Cow<'_, [String]>;
    fn decision(
        &self,
        endpoint: EndpointId,
        flow: &weir_policy_compiler::Flow,
    ) -> Option<Cow<'_, Decision>>;
    fn names(&self, endpoint: EndpointId, ip: IpAddr) -> Cow<'_, [String]>;
}

/// A [`FlowContext`] asked directly.
struct Direct<'a, C>(&'a C);

impl<C: FlowContext> Resolve for Direct<'_, C> {
    fn local(&self, id: EndpointId) -> Option<Cow<'_, EndpointMeta>> {
        self.0.local_endpoint(id).map(Cow::Owned)
    }
    fn by_ip(&self, ip: IpAddr) -> Option<Cow<'_, EndpointMeta>> {
        self.0.endpoint_by_ip(ip).map(Cow::Owned)
    }
    fn labels(&self, identity: Identity) -> Cow<'_, [String]> {
        Cow::Owned(self.0.identity_labels(identity))
    }
    fn decision(
        &self,
        endpoint: EndpointId,
        flow: &weir_policy_compiler::Flow,
    ) -> Option<Cow<'_, Decision>> {
        self.0.decide(endpoint, flow).map(Cow::Owned)
    }
    fn names(&self, endpoint: EndpointId, ip: IpAddr) -> Cow<'_, [String]> {
        Cow::Owned(self.0.names_of(endpoint, ip))
    }
}

/// A context that knows nothing: flows carry only what the event itself holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoContext;

impl FlowContext for NoContext {
    fn local_endpoint(&self, _id: EndpointId) -> Option<EndpointMeta> {
        None
    }
    fn endpoint_by_ip(&self, _ip: IpAddr) -> Option<EndpointMeta> {
        None
    }
    fn identity_labels(&self, _identity: Identity) -> Vec<String> {
        Vec::new()
    }
    fn decide(&self, _e: EndpointId, _f: &weir_policy_compiler::Flow) -> Option<Decision> {
        None
    }
}

/// Reads `CLOCK_MONOTONIC`, the clock `bpf_ktime_get_ns` uses.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// A protobuf timestamp of a wall-clock time.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Builds flows. Holds the node name, the monotonic-to-wall clock offset and the uuid source.
#[derive(Debug)]
pub struct Enricher {
    node_name: String,
    /// Wall-clock nanoseconds at monotonic zero.
    wall_at_mono_zero_ns: u128,
    uuid_prefix: u64,
    uuid_counter: AtomicU64,
}

impl Enricher {
    /// An enricher for flows observed on `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos();
        Enricher {
            node_name: node_name.into(),
            wall_at_mono_zero_ns: wall.saturating_sub(u128::from(monotonic_ns())),
            uuid_prefix: RandomState::new().hash_one(0xfeed_u64),
            uuid_counter: AtomicU64::new(0),
        }
    }

    /// The node name flows carry.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The wall-clock time of a datapath timestamp (`CLOCK_MONOTONIC` nanoseconds).
    pub fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        let ns = self
            .wall_at_mono_zero_ns
            .saturating_add(u128::from(monotonic_ns));
        let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
        let nanos = u32::try_from(ns % 1_000_000_000).unwrap_or(0);
        UNIX_EPOCH
            .checked_add(Duration::new(secs, nanos))
            .unwrap_or(UNIX_EPOCH)
    }

    /// A fresh uuid (random per agent run, then a counter), in the usual 8-4-4-4-12 form.
    fn uuid(&self) -> String {
        let n = self.uuid_counter.fetch_add(1, Ordering::Relaxed);
        let p = self.uuid_prefix;
        // Written digit by digit: one allocation, no formatting machinery (once per flow).
        let mut out = String::with_capacity(36);
        fn hex(out: &mut String, value: u64, digits: u32) {
            for i in (0..digits).rev() {
                let nibble = ((value >> (4 * i)) & 0xf) as u32;
                out.push(char::from_digit(nibble, 16).unwrap_or('0'));
            }
        }
        hex(&mut out, p >> 32, 8);
        out.push('-');
        hex(&mut out, (p >> 16) & 0xffff, 4);
        out.push_str("-4");
        hex(&mut out, p & 0xfff, 3);
        out.push_str("-8");
        hex(&mut out, (n >> 48) & 0xfff, 3);
        out.push('-');
        hex(&mut out, n & 0xffff_ffff_ffff, 12);
        out
    }

    fn base(&self, time: SystemTime) -> Flow {
        Flow {
            time: Some(timestamp(time)),
            uuid: self.uuid(),
            node_name: self.node_name.clone(),
            ..Flow::default()
        }
    }

    /// The main flow of one datapath verdict event: the drop for a drop, the policy verdict
    /// for an allowed or redirected new connection. A drop by policy has a second flow,
    /// its policy verdict: [`Enricher::datapath_event_flows`] gives both.
    pub fn datapath_flow(&self, ctx: &impl FlowContext, ev: &DatapathEvent) -> Flow {
        self.datapath_flow_with(&Direct(ctx), ev)
    }

    /// Every flow of one datapath verdict event, as Hubble shows them: a drop by policy is a
    /// policy-verdict flow (`--type policy-verdict`, Cilium event type 5, verdict DROPPED,
    /// the deciding policies named) followed by the drop flow (`--type drop`); any other
    /// event is the one flow of [`Enricher::datapath_flow`].
    pub fn datapath_event_flows(&self, ctx: &impl FlowContext, ev: &DatapathEvent) -> Vec<Flow> {
        let mut out = Vec::with_capacity(2);
        self.push_datapath_flows(&Direct(ctx), ev, &mut out);
        out
    }

    fn push_datapath_flows(&self, ctx: &impl Resolve, ev: &DatapathEvent, out: &mut Vec<Flow>) {
        let flow = self.datapath_flow_with(ctx, ev);
        if is_policy_drop_event(ev) {
            // Cilium sends the policy verdict notification before the drop notification.
            let mut verdict = flow.clone();
            verdict.uuid = self.uuid();
            verdict.event_type = Some(CiliumEventType {
                r#type: EVENT_POLICY_VERDICT,
                sub_type: 0,
            });
            out.push(verdict);
        }
        out.push(flow);
    }

    /// The flows of a batch of datapath events from what [`ContextSnapshot::capture`] took:
    /// the same flows as [`Enricher::datapath_event_flows`] with the original context, built
    /// from borrowed answers (each flow copies what it shows, once).
    pub fn datapath_flows(
        &self,
        snapshot: &ContextSnapshot,
        events: &[DatapathEvent],
    ) -> Vec<Flow> {
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            self.push_datapath_flows(snapshot, ev, &mut out);
        }
        out
    }

    fn datapath_flow_with(&self, ctx: &impl Resolve, ev: &DatapathEvent) -> Flow {
        let mut flow = self.base(self.wall_time(ev.timestamp_ns));
        let reason = u32::from(ev.drop_reason);
        let verdict = match ev.kind {
            EventKind::Drop => Verdict::Dropped,
            EventKind::AllowNew => Verdict::Forwarded,
            EventKind::RedirectNew => Verdict::Redirected,
            EventKind::Unknown(_) if reason != 0 => Verdict::Dropped,
            EventKind::Unknown(_) => Verdict::Unknown,
        };
        flow.verdict = verdict as i32;
        flow.r#type = FlowType::L3L4 as i32;
        if verdict == Verdict::Dropped {
            flow.drop_reason = reason;
            flow.drop_reason_desc = i32::from(ev.drop_reason);
            flow.event_type = Some(CiliumEventType {
                r#type: EVENT_DROP,
                sub_type: i32::from(ev.drop_reason),
            });
        } else {
            flow.event_type = Some(CiliumEventType {
                r#type: EVENT_POLICY_VERDICT,
                sub_type: 0,
            });
        }
        flow.traffic_direction = traffic_direction(ev.direction) as i32;
        flow.ip = ip_of(ev.src, ev.dst);
        flow.l4 = l4_of(ev.protocol, ev.sport, ev.dport, ev.tcp_flags);
        flow.interface = Some(NetworkInterface {
            index: ev.ifindex,
            name: String::new(),
        });
        flow.proxy_port = u32::from(ev.proxy_port);
        let query = policy_query(ev);
        // Policy verdict events are emitted for a connection's first packet only.
        if query.is_some() {
            flow.is_reply = Some(false);
        }

        let mut local = ctx.local(ev.endpoint_id);
        let peer = |ip: Option<IpAddr>, identity: Identity| -> Endpoint {
            match ip.and_then(|ip| ctx.by_ip(ip)) {
                Some(meta) => endpoint(meta.into_owned()),
                None => Endpoint {
                    identity: identity.get(),
                    labels: ctx.labels(identity).into_owned(),
                    ..Endpoint::default()
                },
            }
        };
        // Called once per flow: the endpoint's data moves into it.
        let mut local_ep = |identity: Identity| match local.take() {
            Some(meta) => endpoint(meta.into_owned()),
            None => Endpoint {
                id: ev.endpoint_id.0,
                identity: identity.get(),
                labels: ctx.labels(identity).into_owned(),
                ..Endpoint::default()
            },
        };
        let (source, destination) = match ev.direction {
            Direction::Ingress => (peer(ev.src, ev.src_identity), local_ep(ev.dst_identity)),
            Direction::Egress => (local_ep(ev.src_identity), peer(ev.dst, ev.dst_identity)),
        };
        let (src_ep, dst_ep) = (EndpointId(source.id), EndpointId(destination.id));
        flow.source = Some(source);
        flow.destination = Some(destination);
        for (resolver, ip, names) in name_questions(ev, src_ep, dst_ep) {
            let found = ctx.names(resolver, ip).into_owned();
            match names {
                Side::Source => flow.source_names = found,
                Side::Destination => flow.destination_names = found,
            }
        }
        flow.summary = l4_summary(&flow);

        if let Some(query) = query
            && let Some(decision) = ctx.decision(ev.endpoint_id, &query)
        {
            apply_decision(&mut flow, ev.direction, &decision);
        }
        flow
    }

    /// The flows of one HTTP proxy record: the request, and the response when the upstream
    /// answered (or failed). A request the proxy denied is one DROPPED request flow.
    pub fn http_flows(&self, ctx: &impl FlowContext, rec: &L7Record) -> Vec<Flow> {
        let local = rec
            .endpoint
            .and_then(|id| ctx.local_endpoint(EndpointId(u32::from(id.0))));
        let remote = Endpoint {
            identity: rec.remote_identity.get(),
            labels: ctx.identity_labels(rec.remote_identity),
            ..Endpoint::default()
        };
        let (client, server) = match rec.direction {
            Direction::Egress => (
                local.map(endpoint).unwrap_or_default(),
                peer_or(ctx, rec.destination.ip(), remote),
            ),
            Direction::Ingress => (
                peer_or(ctx, rec.source.ip(), remote),
                local.map(endpoint).unwrap_or_default(),
            ),
        };
        let url = match &rec.host {
            Some(h) => format!("http://{h}{}", rec.url),
            None => format!("http://{}{}", rec.destination, rec.url),
        };
        let protocol = format!("{:?}", rec.version);
        let mut http = Http {
            code: 0,
            method: rec.method.as_str().to_string(),
            url,
            protocol,
            headers: Vec::new(),
        };
        let mut request = self.l7_base(rec.time, rec.direction, rec.source, rec.destination);
        request.source = Some(client.clone());
        request.destination = Some(server.clone());
        l7_names(ctx, &mut request, rec.source.ip(), rec.destination.ip());
        request.is_reply = Some(false);
        request.weir_deciding_rules = rec.rule.iter().cloned().collect();
        let mut out = Vec::with_capacity(2);
        match rec.verdict {
            RecordVerdict::Denied(reason) => {
                request.verdict = Verdict::Dropped as i32;
                request.weir_policy_decision = format!("denied by L7 policy: {}", reason.as_str());
                http.code = u32::from(rec.status);
                request.l7 = Some(Layer7 {
                    r#type: L7FlowType::Request as i32,
                    latency_ns: 0,
                    record: Some(layer7::Record::Http(http)),
                });
                request.summary = http_summary(&request);
                out.push(request);
            }
            RecordVerdict::Forwarded | RecordVerdict::Error => {
                request.verdict = Verdict::Forwarded as i32;
                if let Some(rule) = &rec.rule {
                    request.weir_policy_decision = format!("allowed by {rule}");
                }
                request.l7 = Some(Layer7 {
                    r#type: L7FlowType::Request as i32,
                    latency_ns: 0,
                    record: Some(layer7::Record::Http(http.clone())),
                });
                request.summary = http_summary(&request);
                let time = rec.time.checked_add(rec.latency).unwrap_or(rec.time);
                let mut response = self.l7_base(time, rec.direction, rec.destination, rec.source);
                response.source = Some(server);
                response.destination = Some(client);
                l7_names(ctx, &mut response, rec.destination.ip(), rec.source.ip());
                response.is_reply = Some(true);
                response.verdict = if rec.verdict == RecordVerdict::Error {
                    Verdict::Error as i32
                } else {
                    Verdict::Forwarded as i32
                };
                response.weir_deciding_rules = request.weir_deciding_rules.clone();
                response.weir_policy_decision = request.weir_policy_decision.clone();
                http.code = u32::from(rec.status);
                response.l7 = Some(Layer7 {
                    r#type: L7FlowType::Response as i32,
                    latency_ns: u64::try_from(rec.latency.as_nanos()).unwrap_or(u64::MAX),
                    record: Some(layer7::Record::Http(http)),
                });
                response.summary = http_summary(&response);
                out.push(request);
                out.push(response);
            }
        }
        out
    }

    /// The flow of one DNS proxy record (a query or an answer).
    pub fn dns_flow(&self, ctx: &impl FlowContext, rec: &DnsRecord) -> Flow {
        let client = rec
            .endpoint
            .and_then(|id| ctx.local_endpoint(EndpointId(u32::from(id.0))))
            .map(endpoint)
            .unwrap_or_default();
        let server = peer_or(
            ctx,
            rec.server.ip(),
            Endpoint {
                identity: rec.server_identity.get(),
                labels: ctx.identity_labels(rec.server_identity),
                ..Endpoint::default()
            },
        );
        let is_answer = rec.kind == DnsRecordKind::Response;
        let (mut flow, src, dst) = if is_answer {
            let time = rec.time.checked_add(rec.latency).unwrap_or(rec.time);
            (
                self.l7_base(time, Direction::Egress, rec.server, rec.source),
                server,
                client,
            )
        } else {
            (
                self.l7_base(rec.time, Direction::Egress, rec.source, rec.server),
                client,
                server,
            )
        };
        if rec.transport == Transport::Tcp {
            let (s, d) = if is_answer {
                (rec.server, rec.source)
            } else {
                (rec.source, rec.server)
            };
            flow.l4 = l4_of(6, s.port(), d.port(), 0);
        }
        flow.source = Some(src);
        flow.destination = Some(dst);
        let (src_ip, dst_ip) = if is_answer {
            (rec.server.ip(), rec.source.ip())
        } else {
            (rec.source.ip(), rec.server.ip())
        };
        l7_names(ctx, &mut flow, src_ip, dst_ip);
        flow.is_reply = Some(is_answer);
        flow.verdict = match rec.verdict {
            DnsVerdict::Forwarded => Verdict::Forwarded,
            DnsVerdict::Denied(_) => Verdict::Dropped,
            DnsVerdict::Malformed | DnsVerdict::Error => Verdict::Error,
        } as i32;
        flow.weir_deciding_rules = rec.rule.iter().cloned().collect();
        flow.weir_policy_decision = match (&rec.verdict, &rec.rule) {
            (DnsVerdict::Denied(r), _) => format!("denied by DNS policy: {}", r.as_str()),
            (_, Some(rule)) => format!("allowed by {rule}"),
            _ => String::new(),
        };
        let dns = Dns {
            query: rec.query.clone(),
            ips: rec.ips.iter().map(ToString::to_string).collect(),
            ttl: rec.ttl.unwrap_or(0),
            cnames: rec.cnames.clone(),
            observation_source: "proxy".to_string(),
            rcode: u32::from(rec.rcode.unwrap_or(0)),
            qtypes: rec.qtypes.clone(),
            rrtypes: Vec::new(),
        };
        flow.l7 = Some(Layer7 {
            r#type: if is_answer {
                L7FlowType::Response
            } else {
                L7FlowType::Request
            } as i32,
            latency_ns: u64::try_from(rec.latency.as_nanos()).unwrap_or(u64::MAX),
            record: Some(layer7::Record::Dns(dns)),
        });
        flow.summary = dns_summary(&flow);
        flow
    }

    fn l7_base(
        &self,
        time: SystemTime,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Flow {
        let mut flow = self.base(time);
        flow.r#type = FlowType::L7 as i32;
        flow.event_type = Some(CiliumEventType {
            r#type: EVENT_L7,
            sub_type: 0,
        });
        flow.traffic_direction = traffic_direction(direction) as i32;
        flow.ip = ip_of(Some(src.ip()), Some(dst.ip()));
        flow.l4 = l4_of(
            if dst.port() == 53 || src.port() == 53 {
                17
            } else {
                6
            },
            src.port(),
            dst.port(),
            0,
        );
        flow
    }
}

/// The policy lookup behind a datapath event that is a policy verdict (a new connection
/// allowed or redirected, or a policy drop); `None` for other events.
pub(crate) fn policy_query(ev: &DatapathEvent) -> Option<weir_policy_compiler::Flow> {
    let policy_event = matches!(ev.kind, EventKind::AllowNew | EventKind::RedirectNew)
        || model::is_policy_drop(u32::from(ev.drop_reason));
    policy_event.then_some(weir_policy_compiler::Flow {
        direction: ev.direction,
        remote: match ev.direction {
            Direction::Ingress => ev.src_identity,
            Direction::Egress => ev.dst_identity,
        },
        protocol: ev.protocol,
        port: ev.dport,
    })
}

/// Fills an L7 flow's names (its endpoints already set) the way [`name_questions`] does.
fn l7_names(ctx: &impl FlowContext, flow: &mut Flow, src: IpAddr, dst: IpAddr) {
    let id = |e: &Option<Endpoint>| EndpointId(e.as_ref().map_or(0, |e| e.id));
    let (src_ep, dst_ep) = (id(&flow.source), id(&flow.destination));
    if dst_ep.0 != 0 {
        flow.source_names = ctx.names_of(dst_ep, src);
    }
    if src_ep.0 != 0 {
        flow.destination_names = ctx.names_of(src_ep, dst);
    }
}

/// Whether an event is a drop by policy, which Hubble also shows as a policy verdict.
fn is_policy_drop_event(ev: &DatapathEvent) -> bool {
    matches!(ev.kind, EventKind::Drop | EventKind::Unknown(_))
        && model::is_policy_drop(u32::from(ev.drop_reason))
}

/// Which of a flow's name lists an answer fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Destination,
}

/// The name questions of a datapath event whose source and destination endpoints are
/// `src_ep` and `dst_ep` (0 for a peer that is not a local endpoint, which has no cache):
/// source names from the destination endpoint's answers, destination names from the source
/// endpoint's, as Hubble asks them.
pub(crate) fn name_questions(
    ev: &DatapathEvent,
    src_ep: EndpointId,
    dst_ep: EndpointId,
) -> impl Iterator<Item = (EndpointId, IpAddr, Side)> {
    let source = ev
        .src
        .filter(|_| dst_ep.0 != 0)
        .map(|ip| (dst_ep, ip, Side::Source));
    let destination = ev
        .dst
        .filter(|_| src_ep.0 != 0)
        .map(|ip| (src_ep, ip, Side::Destination));
    source.into_iter().chain(destination)
}

fn peer_or(ctx: &impl FlowContext, ip: IpAddr, fallback: Endpoint) -> Endpoint {
    ctx.endpoint_by_ip(ip).map(endpoint).unwrap_or(fallback)
}

fn endpoint(meta: EndpointMeta) -> Endpoint {
    Endpoint {
        id: meta.id,
        identity: meta.identity,
        namespace: meta.namespace,
        labels: meta.labels,
        pod_name: meta.pod_name,
        workloads: Vec::new(),
    }
}

fn traffic_direction(d: Direction) -> TrafficDirection {
    match d {
        Direction::Ingress => TrafficDirection::Ingress,
        Direction::Egress => TrafficDirection::Egress,
    }
}

fn ip_of(src: Option<IpAddr>, dst: Option<IpAddr>) -> Option<Ip> {
    let version = match src.or(dst)? {
        IpAddr::V4(_) => IpVersion::IPv4,
        IpAddr::V6(_) => IpVersion::IPv6,
    };
    Some(Ip {
        source: src.map(|a| a.to_string()).unwrap_or_default(),
        destination: dst.map(|a| a.to_string()).unwrap_or_default(),
        ip_version: version as i32,
        encrypted: false,
    })
}

/// TCP flag bits as they sit in the header's flags byte.
fn tcp_flags(bits: u8) -> TcpFlags {
    TcpFlags {
        fin: bits & 0x01 != 0,
        syn: bits & 0x02 != 0,
        rst: bits & 0x04 != 0,
        psh: bits & 0x08 != 0,
        ack: bits & 0x10 != 0,
        urg: bits & 0x20 != 0,
        ece: bits & 0x40 != 0,
        cwr: bits & 0x80 != 0,
        ns: false,
    }
}

fn l4_of(protocol: u8, sport: u16, dport: u16, flags: u8) -> Option<Layer4> {
    let (s, d) = (u32::from(sport), u32::from(dport));
    let p = match protocol {
        6 => layer4::Protocol::Tcp(Tcp {
            source_port: s,
            destination_port: d,
            flags: Some(tcp_flags(flags)),
        }),
        17 => layer4::Protocol::Udp(Udp {
            source_port: s,
            destination_port: d,
        }),
        132 => layer4::Protocol::Sctp(Sctp {
            source_port: s,
            destination_port: d,
        }),
        // The datapath puts the ICMP type in the destination port.
        1 => layer4::Protocol::IcmPv4(IcmPv4 { r#type: d, code: 0 }),
        58 => layer4::Protocol::IcmPv6(IcmPv6 { r#type: d, code: 0 }),
        _ => return None,
    };
    Some(Layer4 { protocol: Some(p) })
}

/// The flags set, Hubble style: `SYN, ACK`.
pub fn tcp_flags_text(f: &TcpFlags) -> String {
    let mut out = String::new();
    push_tcp_flags(&mut out, f);
    out
}

/// Appends the flags set, `SYN, ACK`, to `out`.
fn push_tcp_flags(out: &mut String, f: &TcpFlags) {
    let names = [
        (f.syn, "SYN"),
        (f.ack, "ACK"),
        (f.fin, "FIN"),
        (f.rst, "RST"),
        (f.psh, "PSH"),
        (f.urg, "URG"),
        (f.ece, "ECE"),
        (f.cwr, "CWR"),
        (f.ns, "NS"),
    ];
    let mut first = true;
    for (_, name) in names.iter().filter(|(on, _)| *on) {
        if !first {
            out.push_str(", ");
        }
        out.push_str(name);
        first = false;
    }
}

/// Hubble's L3/L4 summary: `TCP Flags: SYN`, `UDP`, `ICMPv4 EchoRequest`.
fn l4_summary(flow: &Flow) -> String {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => match &t.flags {
            Some(f) => {
                let mut out = String::with_capacity(24);
                out.push_str("TCP Flags: ");
                push_tcp_flags(&mut out, f);
                out
            }
            None => "TCP".to_string(),
        },
        Some(layer4::Protocol::Udp(_)) => "UDP".to_string(),
        Some(layer4::Protocol::Sctp(_)) => "SCTP".to_string(),
        Some(layer4::Protocol::IcmPv4(i)) => format!("ICMPv4 {}", icmp_v4_name(i.r#type)),
        Some(layer4::Protocol::IcmPv6(i)) => format!("ICMPv6 {}", icmp_v6_name(i.r#type)),
        None => String::new(),
    }
}

fn http_summary(flow: &Flow) -> String {
    let Some(h) = model::http(flow) else {
        return String::new();
    };
    if model::l7_type(flow) == L7FlowType::Response {
        let ms = flow.l7.as_ref().map_or(0, |l| l.latency_ns / 1_000_000);
        format!(
            "{} {} {}ms ({} {})",
            h.protocol, h.code, ms, h.method, h.url
        )
    } else {
        format!("{} {} {}", h.protocol, h.method, h.url)
    }
}

fn dns_summary(flow: &Flow) -> String {
    let Some(d) = model::dns(flow) else {
        return String::new();
    };
    let q = d.qtypes.join(",");
    if model::l7_type(flow) == L7FlowType::Response {
        format!(
            "DNS Answer \"{}\" RCode: {} TTL: {} (Proxy {} {})",
            d.ips.join(","),
            model::dns_rcode_name(d.rcode),
            d.ttl,
            d.query,
            q
        )
    } else {
        format!("DNS Query {} {}", d.query, q)
    }
}

/// Hubble's names of common ICMPv4 types.
pub fn icmp_v4_name(t: u32) -> String {
    match t {
        0 => "EchoReply".into(),
        3 => "DestinationUnreachable".into(),
        5 => "Redirect".into(),
        8 => "EchoRequest".into(),
        11 => "TimeExceeded".into(),
        _ => t.to_string(),
    }
}

/// Hubble's names of common ICMPv6 types.
pub fn icmp_v6_name(t: u32) -> String {
    match t {
        1 => "DestinationUnreachable".into(),
        3 => "TimeExceeded".into(),
        128 => "EchoRequest".into(),
        129 => "EchoReply".into(),
        135 => "NeighborSolicitation".into(),
        136 => "NeighborAdvertisement".into(),
        _ => t.to_string(),
    }
}

fn policy_of(name: &PolicyName) -> Policy {
    let ns = name.namespace.clone().unwrap_or_default();
    let mut labels = vec![format!("k8s:io.cilium.k8s.policy.name={}", name.name)];
    if !ns.is_empty() {
        labels.push(format!("k8s:io.cilium.k8s.policy.namespace={ns}"));
    }
    Policy {
        name: name.name.clone(),
        namespace: ns,
        labels,
        revision: 0,
        kind: name.kind.as_str().to_string(),
    }
}

/// Fills the policy fields of a flow from the decision that produced its verdict.
fn apply_decision(flow: &mut Flow, direction: Direction, d: &Decision) {
    flow.weir_policy_decision = d.to_string();
    flow.weir_deciding_rules = d.derived_from.iter().map(|r| r.to_string()).collect();
    let mut policies: Vec<Policy> = Vec::new();
    let names: Vec<&PolicyName> = if d.derived_from.is_empty() {
        d.selected_by.iter().collect()
    } else {
        d.derived_from.iter().map(|r| &r.policy).collect()
    };
    for n in names {
        let p = policy_of(n);
        if !policies.contains(&p) {
            policies.push(p);
        }
    }
    let denied = matches!(d.verdict, PolicyVerdict::Deny { .. });
    match (direction, denied) {
        (Direction::Ingress, false) => flow.ingress_allowed_by = policies,
        (Direction::Egress, false) => flow.egress_allowed_by = policies,
        (Direction::Ingress, true) => flow.ingress_denied_by = policies,
        (Direction::Egress, true) => flow.egress_denied_by = policies,
    }
    flow.policy_match_type = match d.key {
        None => match_type::NONE,
        Some(k) => {
            let any = k.identity == Identity::ANY;
            match (any, k.prefix_len) {
                (false, 0) => match_type::L3_ONLY,
                (false, 1..=8) => match_type::L3_PROTO,
                (false, _) => match_type::L3_L4,
                (true, 0) => match_type::ALL,
                (true, 1..=8) => match_type::PROTO_ONLY,
                (true, _) => match_type::L4_ONLY,
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{DnsNames, NameIndex};
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use weir_policy_compiler::PolicyKey;
    use weir_policy_model::{PolicyKind, RuleRef, Section};

    struct Ctx;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2));
    const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2));
    const WORLD: IpAddr = IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34));

    /// What the DNS proxy learned: the server (endpoint 7) resolved the world address and
    /// the client's; the client (endpoint 3) resolved the server's and the world address.
    fn learned() -> NameIndex {
        NameIndex::new([
            (EndpointId(7), "api.example.com.", WORLD),
            (EndpointId(7), "client.prod.svc.", CLIENT),
            (EndpointId(3), "server.prod.svc.", SERVER),
            (EndpointId(3), "seen-by-client.example.", WORLD),
        ])
    }

    fn pol(name: &str) -> PolicyName {
        PolicyName {
            kind: PolicyKind::CiliumNetworkPolicy,
            namespace: Some("prod".into()),
            name: name.into(),
        }
    }

    impl FlowContext for Ctx {
        fn local_endpoint(&self, id: EndpointId) -> Option<EndpointMeta> {
            (id.0 == 7).then(|| EndpointMeta {
                id: 7,
                identity: 1000,
                namespace: "prod".into(),
                pod_name: "server".into(),
                labels: vec!["k8s:app=server".into()],
            })
        }
        fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointMeta> {
            (ip == IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2))).then(|| EndpointMeta {
                id: 3,
                identity: 1001,
                namespace: "prod".into(),
                pod_name: "client".into(),
                labels: vec!["k8s:app=client".into()],
            })
        }
        fn identity_labels(&self, identity: Identity) -> Vec<String> {
            if identity == Identity(2) {
                vec!["reserved:world".into()]
            } else {
                Vec::new()
            }
        }
        fn decide(&self, _e: EndpointId, f: &weir_policy_compiler::Flow) -> Option<Decision> {
            if f.port == 8080 {
                Some(Decision {
                    verdict: PolicyVerdict::Allow,
                    key: Some(PolicyKey {
                        identity: f.remote,
                        direction: f.direction,
                        protocol: 6,
                        port: 8080,
                        prefix_len: 24,
                    }),
                    derived_from: vec![Arc::new(RuleRef {
                        policy: pol("allow-client"),
                        spec: 0,
                        multi_spec: false,
                        section: Section::Ingress,
                        index: 1,
                    })],
                    selected_by: Vec::new(),
                })
            } else {
                Some(Decision {
                    verdict: PolicyVerdict::Deny { reason: 133 },
                    key: None,
                    derived_from: Vec::new(),
                    selected_by: vec![pol("allow-client"), pol("other")],
                })
            }
        }
        fn names_of(&self, endpoint: EndpointId, ip: IpAddr) -> Vec<String> {
            learned().names_of(endpoint, ip)
        }
    }

    fn event(kind: EventKind, reason: u8, dport: u16) -> DatapathEvent {
        DatapathEvent {
            timestamp_ns: 5,
            kind,
            drop_reason: reason,
            direction: Direction::Ingress,
            protocol: 6,
            src: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2))),
            dst: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2))),
            sport: 40000,
            dport,
            tcp_flags: 0x02,
            src_identity: Identity(1001),
            dst_identity: Identity(1000),
            endpoint_id: EndpointId(7),
            ifindex: 4,
            proxy_port: 0,
        }
    }

    #[test]
    fn a_default_deny_names_the_selecting_policies() {
        let e = Enricher::new("node1");
        let f = e.datapath_flow(&Ctx, &event(EventKind::Drop, 133, 9999));
        assert_eq!(f.verdict, Verdict::Dropped as i32);
        assert_eq!(f.drop_reason_desc, 133);
        assert_eq!(f.event_type.map(|t| (t.r#type, t.sub_type)), Some((1, 133)));
        let src = f.source.clone().unwrap_or_default();
        let dst = f.destination.clone().unwrap_or_default();
        assert_eq!((src.pod_name.as_str(), src.identity), ("client", 1001));
        assert_eq!((dst.pod_name.as_str(), dst.id), ("server", 7));
        assert_eq!(f.traffic_direction, TrafficDirection::Ingress as i32);
        assert_eq!(f.is_reply, Some(false));
        assert_eq!(
            f.weir_policy_decision,
            "denied (default deny): selected by prod/allow-client, prod/other; no rule allowed this"
        );
        assert_eq!(f.ingress_denied_by.len(), 2);
        assert_eq!(f.policy_match_type, match_type::NONE);
        assert_eq!(f.summary, "TCP Flags: SYN");
        assert_eq!(f.node_name, "node1");
    }

    #[test]
    fn an_allowed_connection_names_the_rule() {
        let e = Enricher::new("node1");
        let f = e.datapath_flow(&Ctx, &event(EventKind::AllowNew, 0, 8080));
        assert_eq!(f.verdict, Verdict::Forwarded as i32);
        assert_eq!(f.event_type.map(|t| t.r#type), Some(EVENT_POLICY_VERDICT));
        assert_eq!(f.weir_deciding_rules, vec!["prod/allow-client ingress[1]"]);
        assert_eq!(f.ingress_allowed_by.len(), 1);
        assert_eq!(f.policy_match_type, match_type::L3_L4);
    }

    #[test]
    fn unknown_endpoints_and_malformed_events_still_make_flows() {
        let e = Enricher::new("n");
        let mut ev = event(EventKind::Unknown(9), 134, 0);
        ev.src = None;
        ev.dst = None;
        ev.protocol = 250;
        ev.endpoint_id = EndpointId(99);
        ev.timestamp_ns = u64::MAX;
        let f = e.datapath_flow(&NoContext, &ev);
        assert_eq!(f.verdict, Verdict::Dropped as i32);
        assert!(f.ip.is_none() && f.l4.is_none());
        assert_eq!(f.destination.map(|d| d.id), Some(99));
        assert_eq!(f.is_reply, None);
    }

    #[test]
    fn a_policy_drop_is_a_policy_verdict_flow_then_a_drop_flow() {
        let e = Enricher::new("node1");
        let flows = e.datapath_event_flows(&Ctx, &event(EventKind::Drop, 133, 9999));
        let types: Vec<_> = flows
            .iter()
            .map(|f| f.event_type.map(|t| (t.r#type, t.sub_type)))
            .collect();
        assert_eq!(
            types,
            vec![Some((EVENT_POLICY_VERDICT, 0)), Some((EVENT_DROP, 133))]
        );
        let (verdict, drop) = (&flows[0], &flows[1]);
        assert_ne!(verdict.uuid, drop.uuid);
        assert_eq!(verdict.verdict, Verdict::Dropped as i32);
        assert_eq!(verdict.drop_reason_desc, 133);
        let denied_by: Vec<_> = verdict
            .ingress_denied_by
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(denied_by, ["allow-client", "other"]);
        assert!(
            verdict
                .weir_policy_decision
                .starts_with("denied (default deny)")
        );
        assert_eq!(verdict.policy_match_type, match_type::NONE);
        assert_eq!(verdict.is_reply, Some(false));
        // Apart from the event type and uuid the two flows say the same.
        let strip = |f: &Flow| Flow {
            uuid: String::new(),
            event_type: None,
            ..f.clone()
        };
        assert_eq!(strip(verdict), strip(drop));
        assert_eq!(
            e.datapath_flow(&Ctx, &event(EventKind::Drop, 133, 9999))
                .event_type
                .map(|t| t.r#type),
            Some(EVENT_DROP)
        );

        // A drop that is not a policy decision has no policy verdict; an allowed new
        // connection is its policy verdict.
        let bad = e.datapath_event_flows(&Ctx, &event(EventKind::Drop, 134, 80));
        assert_eq!(bad.len(), 1);
        let allowed = e.datapath_event_flows(&Ctx, &event(EventKind::AllowNew, 0, 8080));
        assert_eq!(allowed.len(), 1);
        assert_eq!(
            allowed[0].event_type.map(|t| t.r#type),
            Some(EVENT_POLICY_VERDICT)
        );
        assert_eq!(allowed[0].ingress_allowed_by.len(), 1);
    }

    #[test]
    fn names_come_from_the_other_endpoints_dns_answers() {
        let e = Enricher::new("n");
        // Ingress client -> server, both local: source names are what the server resolved
        // to the client's address, destination names what the client resolved to the
        // server's.
        let f = e.datapath_flow(&Ctx, &event(EventKind::AllowNew, 0, 8080));
        assert_eq!(f.source_names, ["client.prod.svc"]);
        assert_eq!(f.destination_names, ["server.prod.svc"]);
        // Egress server -> world: the server's answer names the destination; the world
        // peer has no cache, so the source has no names.
        let mut out = event(EventKind::AllowNew, 0, 443);
        out.direction = Direction::Egress;
        out.src = Some(SERVER);
        out.dst = Some(WORLD);
        out.dst_identity = Identity(2);
        let f = e.datapath_flow(&Ctx, &out);
        assert_eq!(f.destination_names, ["api.example.com"]);
        assert!(f.source_names.is_empty());
        // An address nobody here resolved has no names, and no context means no names.
        out.dst = Some(IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)));
        assert!(e.datapath_flow(&Ctx, &out).destination_names.is_empty());
        out.dst = Some(WORLD);
        assert!(
            e.datapath_flow(&NoContext, &out)
                .destination_names
                .is_empty()
        );
    }

    #[test]
    fn a_snapshot_gives_the_flows_the_context_gives() {
        let e = Enricher::new("n");
        let mut events = vec![
            event(EventKind::Drop, 133, 9999),
            event(EventKind::AllowNew, 0, 8080),
            event(EventKind::Drop, 134, 80),
        ];
        let mut egress = event(EventKind::RedirectNew, 0, 8080);
        egress.direction = Direction::Egress;
        egress.endpoint_id = EndpointId(99);
        egress.dst_identity = Identity(2);
        events.push(egress);
        events.push(event(EventKind::AllowNew, 0, 8080));
        let mut to_world = event(EventKind::AllowNew, 0, 443);
        to_world.direction = Direction::Egress;
        to_world.src = Some(SERVER);
        to_world.dst = Some(WORLD);
        events.push(to_world);
        let snap = ContextSnapshot::capture(&Ctx, &events);
        let strip = |mut f: Flow| {
            f.uuid.clear();
            f
        };
        let direct: Vec<Flow> = events
            .iter()
            .flat_map(|ev| e.datapath_event_flows(&Ctx, ev))
            .map(strip)
            .collect();
        assert!(direct.iter().any(|f| !f.destination_names.is_empty()));
        let batched: Vec<Flow> = e
            .datapath_flows(&snap, &events)
            .into_iter()
            .map(strip)
            .collect();
        assert_eq!(direct, batched);
        let via_trait: Vec<Flow> = events
            .iter()
            .flat_map(|ev| e.datapath_event_flows(&snap, ev))
            .map(strip)
            .collect();
        assert_eq!(direct, via_trait);
        // Questions it was not asked get the unknown answer.
        assert!(snap.local_endpoint(EndpointId(1234)).is_none());
        assert!(snap.identity_labels(Identity(77)).is_empty());
    }

    #[test]
    fn uuids_differ() {
        let e = Enricher::new("n");
        assert_ne!(e.uuid(), e.uuid());
        assert_eq!(e.uuid().len(), 36);
    }

    #[test]
    fn monotonic_times_map_to_now() {
        let e = Enricher::new("n");
        let now = e.wall_time(monotonic_ns());
        let d = SystemTime::now()
            .duration_since(now)
            .unwrap_or_else(|err| err.duration());
        assert!(d < Duration::from_secs(60));
    }
}
