//! Prometheus metrics with Hubble's names and labels, plus Weir's agent gauges, rendered in
//! the Prometheus text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};

use crate::model::{self, EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT};
use crate::proto::flow::{
    Flow, FlowType, IpVersion, L7FlowType, LostEventSource, TrafficDirection, layer4,
};

/// Upper bounds of the `hubble_http_request_duration_seconds` buckets (Prometheus' defaults).
const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Agent-level gauges, set by the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentStats {
    /// Endpoints managed.
    pub endpoints: u64,
    /// Identities known.
    pub identities: u64,
    /// The policy repository's revision.
    pub policy_revision: u64,
    /// Policy map entries over all endpoints.
    pub policy_map_entries: u64,
    /// How long the last policy change took to apply to every endpoint, in seconds.
    pub last_regeneration_seconds: f64,
    /// Policy changes applied since start.
    pub regenerations: u64,
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Inner {
    flows_processed: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    drops: BTreeMap<(i32, &'static str), u64>,
    tcp_flags: BTreeMap<(&'static str, &'static str), u64>,
    icmp: BTreeMap<(&'static str, String), u64>,
    ports: BTreeMap<(&'static str, u32), u64>,
    dns_queries: BTreeMap<(String, String, usize), u64>,
    dns_responses: BTreeMap<(String, String, usize), u64>,
    http_requests: BTreeMap<(String, String, u32, &'static str), u64>,
    http_duration: BTreeMap<(String, &'static str), Histogram>,
    lost: BTreeMap<&'static str, u64>,
    agent: AgentStats,
}

/// The metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn family(flow: &Flow) -> &'static str {
    match model::ip_version(flow) {
        IpVersion::IPv6 => "IPv6",
        _ => "IPv4",
    }
}

fn lost_source_label(source: LostEventSource) -> &'static str {
    match source {
        LostEventSource::PerfEventRingBuffer => "perf_event_ring_buffer",
        LostEventSource::ObserverEventsQueue => "observer_events_queue",
        LostEventSource::HubbleRingBuffer => "hubble_ring_buffer",
        LostEventSource::UnknownLostEventSource => "unknown",
    }
}

/// Escapes a label value for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Counters stay meaningful after a panic elsewhere: use them anyway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one flow in every Hubble metric it belongs to.
    pub fn record_flow(&self, flow: &Flow) {
        let verdict = model::verdict_name(flow.verdict);
        let event = flow.event_type.as_ref().map_or(0, |e| e.r#type);
        let (kind, subtype) = match (model::flow_type(flow), event) {
            (FlowType::L7, _) | (_, EVENT_L7) => (
                "L7",
                if model::dns(flow).is_some() {
                    "DNS"
                } else {
                    "HTTP"
                },
            ),
            (_, EVENT_DROP) => ("Drop", ""),
            (_, EVENT_POLICY_VERDICT) => ("PolicyVerdict", ""),
            _ => ("Trace", ""),
        };
        let protocol = model::l4_protocol_name(flow);
        let fam = family(flow);
        let mut m = self.inner();
        *m.flows_processed
            .entry((kind, subtype, verdict))
            .or_default() += 1;
        if event == EVENT_DROP {
            *m.drops
                .entry((flow.drop_reason_desc, protocol))
                .or_default() += 1;
        }
        if model::flow_type(flow) == FlowType::L3L4 {
            match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                Some(layer4::Protocol::Tcp(t)) => {
                    if let Some(f) = &t.flags {
                        let flag = if f.syn && f.ack {
                            Some("SYN-ACK")
                        } else if f.syn {
                            Some("SYN")
                        } else if f.fin {
                            Some("FIN")
                        } else if f.rst {
                            Some("RST")
                        } else {
                            None
                        };
                        if let Some(flag) = flag {
                            *m.tcp_flags.entry((flag, fam)).or_default() += 1;
                        }
                    }
                }
                Some(layer4::Protocol::IcmPv4(i)) => {
                    let t = crate::enrich::icmp_v4_name(i.r#type);
                    *m.icmp.entry(("IPv4", t)).or_default() += 1;
                }
                Some(layer4::Protocol::IcmPv6(i)) => {
                    let t = crate::enrich::icmp_v6_name(i.r#type);
                    *m.icmp.entry(("IPv6", t)).or_default() += 1;
                }
                _ => {}
            }
            if let Some((_, dport)) = model::ports(flow) {
                *m.ports.entry((protocol, dport)).or_default() += 1;
            }
        }
        if let Some(d) = model::dns(flow) {
            let qtypes = d.qtypes.join(",");
            if model::l7_type(flow) == L7FlowType::Response {
                let key = (
                    model::dns_rcode_name(d.rcode).to_string(),
                    qtypes,
                    d.ips.len(),
                );
                *m.dns_responses.entry(key).or_default() += 1;
            } else {
                *m.dns_queries.entry((String::new(), qtypes, 0)).or_default() += 1;
            }
        }
        if let Some(h) = model::http(flow) {
            let reporter = match TrafficDirection::try_from(flow.traffic_direction) {
                Ok(TrafficDirection::Ingress) => "server",
                Ok(TrafficDirection::Egress) => "client",
                _ => "unknown",
            };
            let l7_type = model::l7_type(flow);
            // A request counts once: at its response, or at the request the proxy denied.
            let counted =
                l7_type == L7FlowType::Response || (l7_type == L7FlowType::Request && h.code != 0);
            if counted {
                let key = (h.method.clone(), h.protocol.clone(), h.code, reporter);
                *m.http_requests.entry(key).or_default() += 1;
            }
            if l7_type == L7FlowType::Response {
                let secs = flow.l7.as_ref().map_or(0, |l| l.latency_ns) as f64 / 1e9;
                let hist = m
                    .http_duration
                    .entry((h.method.clone(), reporter))
                    .or_default();
                hist.count += 1;
                hist.sum += secs;
                for (i, b) in DURATION_BUCKETS.iter().enumerate() {
                    if secs <= *b
                        && let Some(slot) = hist.buckets.get_mut(i)
                    {
                        *slot += 1;
                    }
                }
            }
        }
    }

    /// Counts events lost at `source`.
    pub fn record_lost(&self, source: LostEventSource, count: u64) {
        *self
            .inner()
            .lost
            .entry(lost_source_label(source))
            .or_default() += count;
    }

    /// Replaces the agent gauges.
    pub fn set_agent_stats(&self, stats: AgentStats) {
        self.inner().agent = stats;
    }

    /// The total of `hubble_lost_events_total` over sources.
    pub fn lost_total(&self) -> u64 {
        self.inner().lost.values().sum()
    }

    /// Everything in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let m = self.inner();
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            "hubble_flows_processed_total",
            "Total number of flows processed",
            "counter",
        );
        let mut lines = String::new();
        for ((t, s, v), n) in &m.flows_processed {
            let _ = writeln!(
                lines,
                "hubble_flows_processed_total{{type=\"{t}\",subtype=\"{s}\",verdict=\"{v}\"}} {n}"
            );
        }
        out.push_str(&lines);
        let section = |out: &mut String, name: &str, help: &str, kind: &str, body: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            out.push_str(&body);
        };
        let mut b = String::new();
        for ((reason, proto), n) in &m.drops {
            let _ = writeln!(
                b,
                "hubble_drop_total{{reason=\"{}\",protocol=\"{proto}\"}} {n}",
                model::drop_reason_name(*reason)
            );
        }
        section(
            &mut out,
            "hubble_drop_total",
            "Number of drops",
            "counter",
            b,
        );
        let mut b = String::new();
        for ((flag, fam), n) in &m.tcp_flags {
            let _ = writeln!(
                b,
                "hubble_tcp_flags_total{{flag=\"{flag}\",family=\"{fam}\"}} {n}"
            );
        }
        section(
            &mut out,
            "hubble_tcp_flags_total",
            "TCP flag occurrences",
            "counter",
            b,
        );
        let mut b = String::new();
        for ((fam, t), n) in &m.icmp {
            let _ = writeln!(
                b,
                "hubble_icmp_total{{family=\"{fam}\",type=\"{}\"}} {n}",
                esc(t)
            );
        }
        section(
            &mut out,
            "hubble_icmp_total",
            "Number of ICMP messages",
            "counter",
            b,
        );
        let mut b = String::new();
        for ((proto, port), n) in &m.ports {
            let _ = writeln!(
                b,
                "hubble_port_distribution_total{{protocol=\"{proto}\",port=\"{port}\"}} {n}"
            );
        }
        section(
            &mut out,
            "hubble_port_distribution_total",
            "Numbers of packets distributed by destination port",
            "counter",
            b,
        );
        let mut b = String::new();
        for ((rcode, q, ips), n) in &m.dns_queries {
            let _ = writeln!(
                b,
                "hubble_dns_queries_total{{rcode=\"{}\",qtypes=\"{}\",ips_returned=\"{ips}\"}} {n}",
                esc(rcode),
                esc(q)
            );
        }
        section(
            &mut out,
            "hubble_dns_queries_total",
            "Number of DNS queries observed",
            "counter",
            b,
        );
        let mut b = String::new();
        for ((rcode, q, ips), n) in &m.dns_responses {
            let _ = writeln!(
                b,
                "hubble_dns_responses_total{{rcode=\"{}\",qtypes=\"{}\",ips_returned=\"{ips}\"}} {n}",
                esc(rcode),
                esc(q)
            );
        }
        section(
            &mut out,
            "hubble_dns_responses_total",
            "Number of DNS responses observed",
            "counter",
            b,
        );
        let mut b = String::new();
        for ((method, proto, status, reporter), n) in &m.http_requests {
            let _ = writeln!(
                b,
                "hubble_http_requests_total{{method=\"{}\",protocol=\"{}\",status=\"{status}\",reporter=\"{reporter}\"}} {n}",
                esc(method),
                esc(proto)
            );
        }
        section(
            &mut out,
            "hubble_http_requests_total",
            "Count of HTTP requests",
            "counter",
            b,
        );
        let mut b = String::new();
        for ((method, reporter), h) in &m.http_duration {
            let labels = format!("method=\"{}\",reporter=\"{reporter}\"", esc(method));
            for (i, le) in DURATION_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    b,
                    "hubble_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    h.buckets.get(i).copied().unwrap_or(0)
                );
            }
            let _ = writeln!(
                b,
                "hubble_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                b,
                "hubble_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                b,
                "hubble_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        section(
            &mut out,
            "hubble_http_request_duration_seconds",
            "Quantiles of HTTP request duration in seconds",
            "histogram",
            b,
        );
        let mut b = String::new();
        for (source, n) in &m.lost {
            let _ = writeln!(b, "hubble_lost_events_total{{source=\"{source}\"}} {n}");
        }
        section(
            &mut out,
            "hubble_lost_events_total",
            "Number of lost events",
            "counter",
            b,
        );
        let a = m.agent;
        for (name, help, kind, value) in [
            (
                "weir_endpoints",
                "Endpoints managed by the agent",
                "gauge",
                a.endpoints as f64,
            ),
            (
                "weir_identities",
                "Security identities known to the agent",
                "gauge",
                a.identities as f64,
            ),
            (
                "weir_policy_revision",
                "Revision of the policy repository",
                "gauge",
                a.policy_revision as f64,
            ),
            (
                "weir_policy_map_entries",
                "Policy map entries over all endpoints",
                "gauge",
                a.policy_map_entries as f64,
            ),
            (
                "weir_endpoint_regeneration_seconds",
                "Time the last policy change took to reach every endpoint",
                "gauge",
                a.last_regeneration_seconds,
            ),
            (
                "weir_endpoint_regenerations_total",
                "Policy changes applied to endpoints",
                "counter",
                a.regenerations as f64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::flow::{CiliumEventType, Layer4, Tcp, TcpFlags, Verdict};

    fn drop_flow() -> Flow {
        Flow {
            verdict: Verdict::Dropped as i32,
            drop_reason_desc: 133,
            r#type: FlowType::L3L4 as i32,
            event_type: Some(CiliumEventType {
                r#type: EVENT_DROP,
                sub_type: 133,
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 1,
                    destination_port: 80,
                    flags: Some(TcpFlags {
                        syn: true,
                        ..TcpFlags::default()
                    }),
                })),
            }),
            ..Flow::default()
        }
    }

    #[test]
    fn renders_hubble_names_and_labels() {
        let m = Metrics::default();
        m.record_flow(&drop_flow());
        m.record_flow(&drop_flow());
        m.record_lost(LostEventSource::PerfEventRingBuffer, 7);
        let text = m.render();
        assert!(text.contains(
            "hubble_flows_processed_total{type=\"Drop\",subtype=\"\",verdict=\"DROPPED\"} 2"
        ));
        assert!(text.contains("hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"TCP\"} 2"));
        assert!(text.contains("hubble_tcp_flags_total{flag=\"SYN\",family=\"IPv4\"} 2"));
        assert!(text.contains("hubble_port_distribution_total{protocol=\"TCP\",port=\"80\"} 2"));
        assert!(text.contains("hubble_lost_events_total{source=\"perf_event_ring_buffer\"} 7"));
        assert!(text.contains("# TYPE weir_endpoints gauge"));
        assert_eq!(m.lost_total(), 7);
    }

    #[test]
    fn an_empty_flow_counts_without_panicking() {
        let m = Metrics::default();
        m.record_flow(&Flow::default());
        assert!(m.render().contains("type=\"Trace\""));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
