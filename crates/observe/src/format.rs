//! Printing flows the way `hubble observe` does: `compact` (one line per flow), `table`,
//! `json` (the flow, protobuf JSON with the schema's field names) and `jsonpb` (the whole
//! `GetFlowsResponse`).

use serde_json::{Map, Value, json};

use crate::enrich::tcp_flags_text;
use crate::model::{self, EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT};
use crate::proto::flow::{
    AuthType, Endpoint, Flow, FlowType, IpVersion, L7FlowType, LostEvent, LostEventSource,
    TrafficDirection, layer4, layer7,
};
use crate::proto::observer::{GetFlowsResponse, get_flows_response};

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One line per flow.
    Compact,
    /// Aligned columns.
    Table,
    /// The flow as protobuf JSON.
    Json,
    /// The `GetFlowsResponse` as protobuf JSON.
    JsonPb,
}

/// Days since 1970-01-01 to a civil (year, month, day), proleptic Gregorian.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

fn split_time(ts: &prost_types::Timestamp) -> ((i64, u32, u32), (i64, i64, i64), i32) {
    let secs = ts.seconds;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    (
        civil(days),
        (rem / 3600, (rem % 3600) / 60, rem % 60),
        ts.nanos.clamp(0, 999_999_999),
    )
}

/// RFC 3339 in UTC with nanoseconds, as protobuf JSON writes timestamps.
pub fn rfc3339(ts: &prost_types::Timestamp) -> String {
    let ((y, mo, d), (h, mi, s), n) = split_time(ts);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{n:09}Z")
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Hubble's compact time, `Jan  2 15:04:05.000` (UTC).
pub fn compact_time(ts: &prost_types::Timestamp) -> String {
    let ((_, mo, d), (h, mi, s), n) = split_time(ts);
    let month = MONTHS
        .get(usize::try_from(mo).unwrap_or(1).saturating_sub(1))
        .unwrap_or(&"Jan");
    format!("{month} {d:>2} {h:02}:{mi:02}:{s:02}.{:03}", n / 1_000_000)
}

/// `ns/pod:port`, the IP when there is no pod, and `(world)`-style reserved names.
fn peer(ep: Option<&Endpoint>, ip: &str, port: Option<u32>) -> String {
    let mut s = match ep {
        Some(e) if !e.pod_name.is_empty() => format!("{}/{}", e.namespace, e.pod_name),
        _ => ip.to_string(),
    };
    if let Some(p) = port {
        s.push(':');
        s.push_str(&p.to_string());
    }
    s
}

fn identity_note(ep: Option<&Endpoint>) -> String {
    let Some(e) = ep else {
        return String::new();
    };
    let reserved: Vec<&str> = e
        .labels
        .iter()
        .filter_map(|l| l.strip_prefix("reserved:"))
        .collect();
    if !reserved.is_empty() && e.pod_name.is_empty() {
        format!("({})", reserved.join(","))
    } else {
        format!("(ID:{})", e.identity)
    }
}

/// The middle part of a compact line: the observation point or drop reason.
fn what(flow: &Flow) -> String {
    let et = flow.event_type.as_ref().map_or(0, |e| e.r#type);
    let dir = match TrafficDirection::try_from(flow.traffic_direction) {
        Ok(TrafficDirection::Ingress) => "INGRESS",
        Ok(TrafficDirection::Egress) => "EGRESS",
        _ => "",
    };
    match et {
        EVENT_DROP => model::drop_reason_description(flow.drop_reason).to_string(),
        EVENT_POLICY_VERDICT => {
            let m = match flow.policy_match_type {
                model::match_type::L3_ONLY => "L3-Only",
                model::match_type::L3_L4 => "L3-L4",
                model::match_type::L4_ONLY => "L4-Only",
                model::match_type::ALL => "all",
                model::match_type::L3_PROTO => "L3-Proto",
                model::match_type::PROTO_ONLY => "Proto-Only",
                _ => "none",
            };
            format!("policy-verdict:{m} {dir}")
        }
        EVENT_L7 => {
            let kind = if model::dns(flow).is_some() {
                "dns"
            } else {
                "http"
            };
            let t = if model::l7_type(flow) == L7FlowType::Response {
                "response"
            } else {
                "request"
            };
            format!("{kind}-{t}")
        }
        _ => "to-endpoint".to_string(),
    }
}

/// One compact line, e.g. `Jan  2 15:04:05.000: prod/client:40000 (ID:1001) ->
/// prod/server:80 (ID:1000) Policy denied DROPPED (TCP Flags: SYN) [denied ...]`.
pub fn compact(flow: &Flow) -> String {
    let time = flow.time.as_ref().map(compact_time).unwrap_or_default();
    let (sip, dip) = flow
        .ip
        .as_ref()
        .map_or(("", ""), |i| (i.source.as_str(), i.destination.as_str()));
    let ports = model::ports(flow);
    let src = peer(flow.source.as_ref(), sip, ports.map(|p| p.0));
    let dst = peer(flow.destination.as_ref(), dip, ports.map(|p| p.1));
    let mut line = format!(
        "{time}: {src} {} -> {dst} {} {} {} ({})",
        identity_note(flow.source.as_ref()),
        identity_note(flow.destination.as_ref()),
        what(flow),
        model::verdict_name(flow.verdict),
        flow.summary
    );
    if !flow.weir_policy_decision.is_empty() {
        line.push_str(" [");
        line.push_str(&flow.weir_policy_decision);
        line.push(']');
    }
    line
}

/// A compact line for lost events.
pub fn compact_lost(lost: &LostEvent) -> String {
    let source = LostEventSource::try_from(lost.source)
        .map_or("UNKNOWN_LOST_EVENT_SOURCE", |s| s.as_str_name());
    format!("EVENTS LOST: {source} {} events", lost.num_events_lost)
}

/// The table's header line.
pub const TABLE_HEADER: &str = "TIMESTAMP            SOURCE                         DESTINATION                    TYPE                   VERDICT     SUMMARY";

/// One table row (pad columns to the header).
pub fn table_row(flow: &Flow) -> String {
    let time = flow.time.as_ref().map(compact_time).unwrap_or_default();
    let (sip, dip) = flow
        .ip
        .as_ref()
        .map_or(("", ""), |i| (i.source.as_str(), i.destination.as_str()));
    let ports = model::ports(flow);
    let src = peer(flow.source.as_ref(), sip, ports.map(|p| p.0));
    let dst = peer(flow.destination.as_ref(), dip, ports.map(|p| p.1));
    let mut summary = flow.summary.clone();
    if !flow.weir_policy_decision.is_empty() {
        summary.push_str(" [");
        summary.push_str(&flow.weir_policy_decision);
        summary.push(']');
    }
    format!(
        "{time:<20} {src:<30} {dst:<30} {:<22} {:<11} {summary}",
        what(flow),
        model::verdict_name(flow.verdict)
    )
}

fn put(m: &mut Map<String, Value>, k: &str, v: Value) {
    let empty = match &v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(n) => n.as_u64() == Some(0) || n.as_i64() == Some(0),
        Value::Bool(b) => !b,
    };
    if !empty {
        m.insert(k.to_string(), v);
    }
}

fn endpoint_json(e: &Endpoint) -> Value {
    let mut m = Map::new();
    put(&mut m, "ID", json!(e.id));
    put(&mut m, "identity", json!(e.identity));
    put(&mut m, "namespace", json!(e.namespace));
    put(&mut m, "labels", json!(e.labels));
    put(&mut m, "pod_name", json!(e.pod_name));
    put(
        &mut m,
        "workloads",
        Value::Array(
            e.workloads
                .iter()
                .map(|w| json!({"name": w.name, "kind": w.kind}))
                .collect(),
        ),
    );
    Value::Object(m)
}

fn enum_name(name: Option<&'static str>, raw: i32) -> Value {
    match name {
        Some(n) => json!(n),
        None => json!(raw),
    }
}

/// The flow as protobuf JSON (field names as in the schema, enums by name, zero values
/// left out, 64-bit integers as strings).
pub fn flow_json(flow: &Flow) -> Value {
    let mut m = Map::new();
    if let Some(t) = &flow.time {
        put(&mut m, "time", json!(rfc3339(t)));
    }
    put(&mut m, "uuid", json!(flow.uuid));
    put(&mut m, "verdict", json!(model::verdict_name(flow.verdict)));
    put(&mut m, "drop_reason", json!(flow.drop_reason));
    if flow.auth_type != 0 {
        put(
            &mut m,
            "auth_type",
            enum_name(
                AuthType::try_from(flow.auth_type)
                    .ok()
                    .map(|a| a.as_str_name()),
                flow.auth_type,
            ),
        );
    }
    if let Some(ip) = &flow.ip {
        let mut o = Map::new();
        put(&mut o, "source", json!(ip.source));
        put(&mut o, "destination", json!(ip.destination));
        if ip.ip_version != 0 {
            put(
                &mut o,
                "ipVersion",
                enum_name(
                    IpVersion::try_from(ip.ip_version)
                        .ok()
                        .map(|v| v.as_str_name()),
                    ip.ip_version,
                ),
            );
        }
        put(&mut o, "encrypted", json!(ip.encrypted));
        put(&mut m, "IP", Value::Object(o));
    }
    if let Some(p) = flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        let v = match p {
            layer4::Protocol::Tcp(t) => {
                let mut o = Map::new();
                put(&mut o, "source_port", json!(t.source_port));
                put(&mut o, "destination_port", json!(t.destination_port));
                if let Some(f) = &t.flags {
                    let mut fl = Map::new();
                    for (on, n) in [
                        (f.fin, "FIN"),
                        (f.syn, "SYN"),
                        (f.rst, "RST"),
                        (f.psh, "PSH"),
                        (f.ack, "ACK"),
                        (f.urg, "URG"),
                        (f.ece, "ECE"),
                        (f.cwr, "CWR"),
                        (f.ns, "NS"),
                    ] {
                        put(&mut fl, n, json!(on));
                    }
                    put(&mut o, "flags", Value::Object(fl));
                }
                json!({"TCP": o})
            }
            layer4::Protocol::Udp(u) => {
                json!({"UDP": {"source_port": u.source_port, "destination_port": u.destination_port}})
            }
            layer4::Protocol::Sctp(u) => {
                json!({"SCTP": {"source_port": u.source_port, "destination_port": u.destination_port}})
            }
            layer4::Protocol::IcmPv4(i) => json!({"ICMPv4": {"type": i.r#type, "code": i.code}}),
            layer4::Protocol::IcmPv6(i) => json!({"ICMPv6": {"type": i.r#type, "code": i.code}}),
        };
        put(&mut m, "l4", v);
    }
    if let Some(e) = &flow.source {
        put(&mut m, "source", endpoint_json(e));
    }
    if let Some(e) = &flow.destination {
        put(&mut m, "destination", endpoint_json(e));
    }
    put(
        &mut m,
        "Type",
        enum_name(
            FlowType::try_from(flow.r#type)
                .ok()
                .map(|t| t.as_str_name()),
            flow.r#type,
        ),
    );
    put(&mut m, "node_name", json!(flow.node_name));
    put(&mut m, "source_names", json!(flow.source_names));
    put(&mut m, "destination_names", json!(flow.destination_names));
    if let Some(l7) = &flow.l7 {
        let mut o = Map::new();
        put(
            &mut o,
            "type",
            enum_name(
                L7FlowType::try_from(l7.r#type)
                    .ok()
                    .map(|t| t.as_str_name()),
                l7.r#type,
            ),
        );
        if l7.latency_ns != 0 {
            put(&mut o, "latency_ns", json!(l7.latency_ns.to_string()));
        }
        match &l7.record {
            Some(layer7::Record::Http(h)) => {
                let mut r = Map::new();
                put(&mut r, "code", json!(h.code));
                put(&mut r, "method", json!(h.method));
                put(&mut r, "url", json!(h.url));
                put(&mut r, "protocol", json!(h.protocol));
                put(&mut o, "http", Value::Object(r));
            }
            Some(layer7::Record::Dns(d)) => {
                let mut r = Map::new();
                put(&mut r, "query", json!(d.query));
                put(&mut r, "ips", json!(d.ips));
                put(&mut r, "ttl", json!(d.ttl));
                put(&mut r, "cnames", json!(d.cnames));
                put(&mut r, "observation_source", json!(d.observation_source));
                put(&mut r, "rcode", json!(d.rcode));
                put(&mut r, "qtypes", json!(d.qtypes));
                put(&mut r, "rrtypes", json!(d.rrtypes));
                put(&mut o, "dns", Value::Object(r));
            }
            None => {}
        }
        put(&mut m, "l7", Value::Object(o));
    }
    put(&mut m, "reply", json!(flow.reply));
    if let Some(et) = &flow.event_type {
        let mut o = Map::new();
        put(&mut o, "type", json!(et.r#type));
        put(&mut o, "sub_type", json!(et.sub_type));
        put(&mut m, "event_type", Value::Object(o));
    }
    if flow.traffic_direction != 0 {
        put(
            &mut m,
            "traffic_direction",
            enum_name(
                TrafficDirection::try_from(flow.traffic_direction)
                    .ok()
                    .map(|t| t.as_str_name()),
                flow.traffic_direction,
            ),
        );
    }
    put(&mut m, "policy_match_type", json!(flow.policy_match_type));
    if flow.drop_reason_desc != 0 {
        put(
            &mut m,
            "drop_reason_desc",
            json!(model::drop_reason_name(flow.drop_reason_desc)),
        );
    }
    if let Some(r) = flow.is_reply {
        m.insert("is_reply".into(), json!(r));
    }
    if let Some(i) = &flow.interface {
        let mut o = Map::new();
        put(&mut o, "index", json!(i.index));
        put(&mut o, "name", json!(i.name));
        put(&mut m, "interface", Value::Object(o));
    }
    put(&mut m, "proxy_port", json!(flow.proxy_port));
    let policies = |ps: &[crate::proto::flow::Policy]| {
        Value::Array(
            ps.iter()
                .map(|p| {
                    let mut o = Map::new();
                    put(&mut o, "name", json!(p.name));
                    put(&mut o, "namespace", json!(p.namespace));
                    put(&mut o, "labels", json!(p.labels));
                    if p.revision != 0 {
                        put(&mut o, "revision", json!(p.revision.to_string()));
                    }
                    put(&mut o, "kind", json!(p.kind));
                    Value::Object(o)
                })
                .collect(),
        )
    };
    put(
        &mut m,
        "egress_allowed_by",
        policies(&flow.egress_allowed_by),
    );
    put(
        &mut m,
        "ingress_allowed_by",
        policies(&flow.ingress_allowed_by),
    );
    put(&mut m, "egress_denied_by", policies(&flow.egress_denied_by));
    put(
        &mut m,
        "ingress_denied_by",
        policies(&flow.ingress_denied_by),
    );
    put(&mut m, "Summary", json!(flow.summary));
    put(
        &mut m,
        "weir_deciding_rules",
        json!(flow.weir_deciding_rules),
    );
    put(
        &mut m,
        "weir_policy_decision",
        json!(flow.weir_policy_decision),
    );
    Value::Object(m)
}

/// A `GetFlowsResponse` as protobuf JSON.
pub fn response_json(resp: &GetFlowsResponse) -> Value {
    let mut m = Map::new();
    match &resp.response_types {
        Some(get_flows_response::ResponseTypes::Flow(f)) => {
            m.insert("flow".into(), flow_json(f));
        }
        Some(get_flows_response::ResponseTypes::LostEvents(l)) => {
            let source = LostEventSource::try_from(l.source)
                .map_or("UNKNOWN_LOST_EVENT_SOURCE", |s| s.as_str_name());
            m.insert(
                "lost_events".into(),
                json!({"source": source, "num_events_lost": l.num_events_lost.to_string()}),
            );
        }
        None => {}
    }
    put(&mut m, "node_name", json!(resp.node_name));
    if let Some(t) = &resp.time {
        put(&mut m, "time", json!(rfc3339(t)));
    }
    Value::Object(m)
}

/// One response in `format` (without the table header).
pub fn render(resp: &GetFlowsResponse, format: Output) -> String {
    match (format, &resp.response_types) {
        (Output::JsonPb, _) => response_json(resp).to_string(),
        (Output::Json, Some(get_flows_response::ResponseTypes::Flow(f))) => {
            flow_json(f).to_string()
        }
        (Output::Json, _) => response_json(resp).to_string(),
        (Output::Compact, Some(get_flows_response::ResponseTypes::Flow(f))) => compact(f),
        (Output::Table, Some(get_flows_response::ResponseTypes::Flow(f))) => table_row(f),
        (_, Some(get_flows_response::ResponseTypes::LostEvents(l))) => compact_lost(l),
        (_, None) => String::new(),
    }
}

/// TCP flags as Hubble prints them (re-exported for callers).
pub fn flags_text(f: &crate::proto::flow::TcpFlags) -> String {
    tcp_flags_text(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::flow::{CiliumEventType, Ip, Layer4, Tcp, TcpFlags, Verdict};

    fn dropped() -> Flow {
        Flow {
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            }),
            verdict: Verdict::Dropped as i32,
            drop_reason: 133,
            drop_reason_desc: 133,
            r#type: FlowType::L3L4 as i32,
            ip: Some(Ip {
                source: "10.0.1.2".into(),
                destination: "10.0.2.2".into(),
                ip_version: IpVersion::IPv4 as i32,
                encrypted: false,
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: 8080,
                    flags: Some(TcpFlags {
                        syn: true,
                        ..TcpFlags::default()
                    }),
                })),
            }),
            source: Some(Endpoint {
                identity: 1001,
                namespace: "prod".into(),
                pod_name: "client".into(),
                ..Endpoint::default()
            }),
            destination: Some(Endpoint {
                identity: 2,
                labels: vec!["reserved:world".into()],
                ..Endpoint::default()
            }),
            event_type: Some(CiliumEventType {
                r#type: EVENT_DROP,
                sub_type: 133,
            }),
            traffic_direction: TrafficDirection::Egress as i32,
            is_reply: Some(false),
            summary: "TCP Flags: SYN".into(),
            weir_policy_decision: "denied (default deny); no rule allowed this".into(),
            ..Flow::default()
        }
    }

    #[test]
    fn compact_line_reads_like_hubble() {
        assert_eq!(
            compact(&dropped()),
            "Nov 14 22:13:20.123: prod/client:40000 (ID:1001) -> 10.0.2.2:8080 (world) \
             Policy denied DROPPED (TCP Flags: SYN) [denied (default deny); no rule allowed this]"
        );
    }

    #[test]
    fn json_uses_schema_names() {
        let v = flow_json(&dropped());
        assert_eq!(v["verdict"], "DROPPED");
        assert_eq!(v["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(v["IP"]["ipVersion"], "IPv4");
        assert_eq!(v["l4"]["TCP"]["flags"]["SYN"], true);
        assert_eq!(v["Type"], "L3_L4");
        assert_eq!(v["is_reply"], false);
        assert_eq!(v["time"], "2023-11-14T22:13:20.123456789Z");
        assert_eq!(v["traffic_direction"], "EGRESS");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(-1), (1969, 12, 31));
        let far = prost_types::Timestamp {
            seconds: i64::MIN,
            nanos: -5,
        };
        let _ = rfc3339(&far);
        let _ = compact_time(&far);
    }

    #[test]
    fn empty_things_render() {
        let r = GetFlowsResponse::default();
        for o in [Output::Compact, Output::Table, Output::Json, Output::JsonPb] {
            let _ = render(&r, o);
        }
        let _ = compact(&Flow::default());
        let _ = flow_json(&Flow::default());
    }
}
