//! The flow pipeline on one thread: datapath events → enrichment → the observer's ring and
//! metrics, over a node of 100 endpoints and 1,000 identities.
//!
//! Baselines in the same run: copying the events into a `Vec` (the floor of touching each
//! event once), and enrichment alone. `scan` is the context the agent had before: the peer
//! endpoint found by a scan over all endpoints; `indexed` looks it up in a hash map.
//!
//! Run: `cargo bench -p weir-observe --bench pipeline -- --noplot`

#![allow(missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use weir_datapath::{DatapathEvent, EndpointId, EventKind};
use weir_identity::Identity;
use weir_observe::ContextSnapshot;
use weir_observe::{EndpointMeta, Enricher, FlowContext, Observer, ObserverConfig};
use weir_policy_compiler::{Decision, PolicyKey, Verdict};
use weir_policy_model::{Direction, PolicyKind, PolicyName, RuleRef, Section};

const ENDPOINTS: u32 = 100;
const IDENTITIES: u32 = 1_000;
/// One drain of the agent's event task at 50k events/s (5 ms).
const BATCH: usize = 256;

/// A node's view: endpoints with an IPv4 and an IPv6 address, identities with pod labels.
struct Node {
    endpoints: Vec<EndpointMeta>,
    addresses: Vec<(IpAddr, EndpointId)>,
    by_id: HashMap<EndpointId, EndpointMeta>,
    by_ip: HashMap<IpAddr, EndpointId>,
    labels: HashMap<Identity, Vec<String>>,
    allow: Decision,
    redirect: Decision,
    deny: Decision,
    /// Look peers up by scanning `addresses`, as the agent did.
    scan: bool,
}

fn v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

fn v6(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16))
}

fn policy(name: &str) -> PolicyName {
    PolicyName {
        kind: PolicyKind::CiliumNetworkPolicy,
        namespace: Some("ns-1".into()),
        name: name.into(),
    }
}

fn pod_labels(i: u32) -> Vec<String> {
    vec![
        format!("k8s:app=app-{}", i % 40),
        format!("k8s:io.kubernetes.pod.namespace=ns-{}", i % 10),
        format!("k8s:tier=tier-{}", i % 3),
        format!("k8s:team=team-{}", i % 7),
        format!("k8s:version=v{}", i % 4),
        "k8s:io.cilium.k8s.policy.cluster=default".to_string(),
        format!("k8s:io.cilium.k8s.policy.serviceaccount=sa-{}", i % 40),
    ]
}

impl Node {
    fn new(scan: bool) -> Self {
        let mut endpoints = Vec::new();
        let mut addresses = Vec::new();
        for i in 1..=ENDPOINTS {
            endpoints.push(EndpointMeta {
                id: i,
                identity: 10_000 + i,
                namespace: format!("ns-{}", i % 10),
                pod_name: format!("app-{}-7d9f8c-{i:05}", i % 40),
                labels: pod_labels(i),
            });
            addresses.push((v4(i), EndpointId(i)));
            addresses.push((v6(i), EndpointId(i)));
        }
        let labels = (0..IDENTITIES)
            .map(|i| (Identity(10_000 + i), pod_labels(i)))
            .collect();
        let rule = |index| {
            vec![Arc::new(RuleRef {
                policy: policy("allow-frontend"),
                spec: 0,
                multi_spec: false,
                section: Section::Ingress,
                index,
            })]
        };
        let key = |port| PolicyKey {
            identity: Identity(10_001),
            direction: Direction::Ingress,
            protocol: 6,
            port,
            prefix_len: 24,
        };
        Node {
            by_id: endpoints
                .iter()
                .map(|e| (EndpointId(e.id), e.clone()))
                .collect(),
            by_ip: addresses.iter().copied().collect(),
            endpoints,
            addresses,
            labels,
            allow: Decision {
                verdict: Verdict::Allow,
                key: Some(key(8080)),
                derived_from: rule(0),
                selected_by: Vec::new(),
            },
            redirect: Decision {
                verdict: Verdict::Redirect { proxy_port: 15001 },
                key: Some(key(80)),
                derived_from: rule(1),
                selected_by: Vec::new(),
            },
            deny: Decision {
                verdict: Verdict::Deny { reason: 133 },
                key: None,
                derived_from: Vec::new(),
                selected_by: vec![policy("allow-frontend"), policy("allow-monitoring")],
            },
            scan,
        }
    }
}

impl FlowContext for Node {
    fn local_endpoint(&self, id: EndpointId) -> Option<EndpointMeta> {
        if self.scan {
            return self.endpoints.iter().find(|e| e.id == id.0).cloned();
        }
        self.by_id.get(&id).cloned()
    }
    fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointMeta> {
        let id = if self.scan {
            self.addresses
                .iter()
                .find(|(a, _)| *a == ip)
                .map(|(_, id)| *id)
        } else {
            self.by_ip.get(&ip).copied()
        };
        id.and_then(|id| self.by_id.get(&id).cloned())
    }
    fn identity_labels(&self, identity: Identity) -> Vec<String> {
        self.labels.get(&identity).cloned().unwrap_or_default()
    }
    fn decide(&self, _e: EndpointId, flow: &weir_policy_compiler::Flow) -> Option<Decision> {
        Some(match flow.port {
            8080 => self.allow.clone(),
            80 => self.redirect.clone(),
            _ => self.deny.clone(),
        })
    }
}

/// A deterministic mix: 50 % default-deny drops from remote identities, 35 % allowed new
/// connections between local endpoints, 15 % redirects to the proxy; a third IPv6.
fn events(n: usize) -> Vec<DatapathEvent> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let r = next();
            let local = 1 + (r % u64::from(ENDPOINTS)) as u32;
            let peer = 1 + ((r >> 8) % u64::from(ENDPOINTS)) as u32;
            let ipv6 = (r >> 16).is_multiple_of(3);
            let addr = |n| if ipv6 { v6(n) } else { v4(n) };
            let roll = (r >> 20) % 100;
            let (kind, reason, dport, proxy_port, src) = if roll < 50 {
                // A remote pod not on this node: its address is not a local endpoint.
                let remote = 1_000 + ((r >> 28) % 50_000) as u32;
                (
                    EventKind::Drop,
                    133,
                    1 + ((r >> 40) % 1024) as u16,
                    0,
                    addr(remote),
                )
            } else if roll < 85 {
                (EventKind::AllowNew, 0, 8080, 0, addr(peer))
            } else {
                (EventKind::RedirectNew, 0, 80, 15001, addr(peer))
            };
            let remote_identity = Identity(10_000 + ((r >> 44) % u64::from(IDENTITIES)) as u32);
            DatapathEvent {
                timestamp_ns: 1_000_000 * i as u64,
                kind,
                drop_reason: reason,
                direction: Direction::Ingress,
                protocol: 6,
                src: Some(src),
                dst: Some(addr(local)),
                sport: 32_768 + (r >> 48) as u16 % 28_000,
                dport,
                tcp_flags: 0x02,
                src_identity: remote_identity,
                dst_identity: Identity(10_000 + local),
                endpoint_id: EndpointId(local),
                ifindex: 10 + local,
                proxy_port,
            }
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let evs = events(BATCH * 16);
    let batches: Vec<&[DatapathEvent]> = evs.chunks(BATCH).collect();
    let enricher = Enricher::new("bench-node");
    let indexed = Node::new(false);
    let scan = Node::new(true);
    let observer = Observer::new(ObserverConfig::default());

    let mut g = c.benchmark_group("flow_pipeline");
    g.throughput(Throughput::Elements(evs.len() as u64));
    g.bench_function("baseline_copy_events", |b| {
        b.iter(|| {
            for batch in &batches {
                black_box(batch.to_vec());
            }
        })
    });
    g.bench_function("enrich_only_indexed", |b| {
        b.iter(|| {
            for batch in &batches {
                let flows: Vec<_> = batch
                    .iter()
                    .map(|e| enricher.datapath_flow(&indexed, e))
                    .collect();
                black_box(flows);
            }
        })
    });
    g.bench_function("pipeline_scan", |b| {
        b.iter(|| {
            for batch in &batches {
                observer.publish_all(batch.iter().map(|e| enricher.datapath_flow(&scan, e)));
            }
        })
    });
    g.bench_function("pipeline_indexed", |b| {
        b.iter(|| {
            for batch in &batches {
                observer.publish_all(batch.iter().map(|e| enricher.datapath_flow(&indexed, e)));
            }
        })
    });
    g.bench_function("pipeline_snapshot", |b| {
        b.iter(|| {
            for batch in &batches {
                let snap = ContextSnapshot::capture(&indexed, batch);
                observer.publish_all(enricher.datapath_flows(&snap, batch));
            }
        })
    });
    g.bench_function("capture_only", |b| {
        b.iter(|| {
            for batch in &batches {
                black_box(ContextSnapshot::capture(&indexed, batch));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
