//! Table tests: Hubble filters over a recorded set of flows select exactly the expected ones.

use std::net::{IpAddr, Ipv4Addr};

use weir_datapath::{DatapathEvent, EndpointId, EventKind};
use weir_identity::Identity;
use weir_observe::proto::flow::{EventTypeFilter, Flow, FlowFilter, TcpFlags, Verdict};
use weir_observe::{EndpointMeta, Enricher, FilterSet, FlowContext};
use weir_policy_compiler::Decision;
use weir_policy_model::Direction;

struct Pods;

/// (name, kind, drop reason, direction, local endpoint, remote last octet (0 = world), dport, TCP flags)
type Row = (&'static str, EventKind, u8, Direction, u32, u8, u16, u8);
/// (name, whitelist, blacklist, expected flow names)
type Case = (
    &'static str,
    Vec<FlowFilter>,
    Vec<FlowFilter>,
    &'static [&'static str],
);

fn pod(id: u32, name: &str) -> EndpointMeta {
    EndpointMeta {
        id,
        identity: 1000 + id,
        namespace: if name == "db" { "data" } else { "prod" }.into(),
        pod_name: name.into(),
        labels: vec![format!("k8s:app={name}")],
    }
}

impl FlowContext for Pods {
    fn local_endpoint(&self, id: EndpointId) -> Option<EndpointMeta> {
        ["", "client", "server", "db"]
            .get(id.0 as usize)
            .filter(|n| !n.is_empty())
            .map(|n| pod(id.0, n))
    }
    fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointMeta> {
        match ip {
            IpAddr::V4(v) if v.octets()[0] == 10 => {
                self.local_endpoint(EndpointId(u32::from(v.octets()[3])))
            }
            _ => None,
        }
    }
    fn identity_labels(&self, i: Identity) -> Vec<String> {
        if i == Identity(2) {
            vec!["reserved:world".into()]
        } else {
            Vec::new()
        }
    }
    fn decide(&self, _: EndpointId, _: &weir_policy_compiler::Flow) -> Option<Decision> {
        None
    }
}

/// (name, kind, direction, local endpoint, remote last octet (0 = world 1.1.1.1), dport, flags)
fn recorded() -> Vec<(&'static str, Flow)> {
    let e = Enricher::new("node-a");
    let rows: [Row; 5] = [
        (
            "client->server:80 allowed",
            EventKind::AllowNew,
            0,
            Direction::Ingress,
            2,
            1,
            80,
            0x02,
        ),
        (
            "client->server:22 dropped",
            EventKind::Drop,
            133,
            Direction::Ingress,
            2,
            1,
            22,
            0x02,
        ),
        (
            "server->db:5432 allowed",
            EventKind::AllowNew,
            0,
            Direction::Egress,
            2,
            3,
            5432,
            0x02,
        ),
        (
            "client->world:443 denied",
            EventKind::Drop,
            181,
            Direction::Egress,
            1,
            0,
            443,
            0x02,
        ),
        (
            "client->server:53 udp redirected",
            EventKind::RedirectNew,
            0,
            Direction::Ingress,
            2,
            1,
            53,
            0,
        ),
    ];
    rows.iter()
        .map(|&(name, kind, reason, dir, local, remote, dport, flags)| {
            let local_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, local as u8));
            let remote_ip = if remote == 0 {
                IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1))
            } else {
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, remote))
            };
            let remote_id = if remote == 0 {
                Identity(2)
            } else {
                Identity(1000 + u32::from(remote))
            };
            let local_id = Identity(1000 + local);
            let (src, dst, sid, did) = match dir {
                Direction::Ingress => (remote_ip, local_ip, remote_id, local_id),
                Direction::Egress => (local_ip, remote_ip, local_id, remote_id),
            };
            let ev = DatapathEvent {
                timestamp_ns: 1,
                kind,
                drop_reason: reason,
                direction: dir,
                protocol: if name.contains("udp") { 17 } else { 6 },
                src: Some(src),
                dst: Some(dst),
                sport: 40000,
                dport,
                tcp_flags: flags,
                src_identity: sid,
                dst_identity: did,
                endpoint_id: EndpointId(local),
                ifindex: 1,
                proxy_port: 0,
            };
            (name, e.datapath_flow(&Pods, &ev))
        })
        .collect()
}

#[test]
fn filters_select_exactly_the_expected_flows() {
    let flows = recorded();
    let f = FlowFilter::default;
    let cases: Vec<Case> = vec![
        (
            "no filter",
            vec![],
            vec![],
            &[
                "client->server:80 allowed",
                "client->server:22 dropped",
                "server->db:5432 allowed",
                "client->world:443 denied",
                "client->server:53 udp redirected",
            ],
        ),
        (
            "verdict DROPPED",
            vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..f()
            }],
            vec![],
            &["client->server:22 dropped", "client->world:443 denied"],
        ),
        (
            "AND within a filter",
            vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                destination_port: vec!["22".into()],
                ..f()
            }],
            vec![],
            &["client->server:22 dropped"],
        ),
        (
            "OR across filters",
            vec![
                FlowFilter {
                    destination_port: vec!["22".into()],
                    ..f()
                },
                FlowFilter {
                    destination_pod: vec!["data/".into()],
                    ..f()
                },
            ],
            vec![],
            &["client->server:22 dropped", "server->db:5432 allowed"],
        ),
        (
            "blacklist removes",
            vec![],
            vec![FlowFilter {
                source_pod: vec!["prod/client".into()],
                ..f()
            }],
            &["server->db:5432 allowed"],
        ),
        (
            "whitelist minus blacklist",
            vec![FlowFilter {
                verdict: vec![Verdict::Forwarded as i32],
                ..f()
            }],
            vec![FlowFilter {
                destination_label: vec!["app=db".into()],
                ..f()
            }],
            &["client->server:80 allowed"],
        ),
        (
            "reserved world label",
            vec![FlowFilter {
                destination_label: vec!["reserved:world".into()],
                ..f()
            }],
            vec![],
            &["client->world:443 denied"],
        ),
        (
            "CIDR",
            vec![FlowFilter {
                destination_ip: vec!["1.0.0.0/8".into()],
                ..f()
            }],
            vec![],
            &["client->world:443 denied"],
        ),
        (
            "protocol udp",
            vec![FlowFilter {
                protocol: vec!["udp".into()],
                ..f()
            }],
            vec![],
            &["client->server:53 udp redirected"],
        ),
        (
            "drop events only",
            vec![FlowFilter {
                event_type: vec![EventTypeFilter {
                    r#type: 1,
                    match_sub_type: true,
                    sub_type: 181,
                }],
                ..f()
            }],
            vec![],
            &["client->world:443 denied"],
        ),
        (
            "identity",
            vec![FlowFilter {
                source_identity: vec![1002],
                ..f()
            }],
            vec![],
            &["server->db:5432 allowed"],
        ),
        (
            "SYN flag",
            vec![FlowFilter {
                tcp_flags: vec![TcpFlags {
                    syn: true,
                    ..TcpFlags::default()
                }],
                protocol: vec!["tcp".into()],
                destination_pod: vec!["server".into()],
                ..f()
            }],
            vec![],
            &["client->server:80 allowed", "client->server:22 dropped"],
        ),
        (
            "node name glob",
            vec![FlowFilter {
                node_name: vec!["node-*".into()],
                reply: vec![false],
                ..f()
            }],
            vec![],
            &[
                "client->server:80 allowed",
                "client->server:22 dropped",
                "server->db:5432 allowed",
                "client->world:443 denied",
                "client->server:53 udp redirected",
            ],
        ),
        (
            "http only matches nothing here",
            vec![FlowFilter {
                protocol: vec!["http".into()],
                ..f()
            }],
            vec![],
            &[],
        ),
    ];
    for (name, wl, bl, want) in cases {
        let set = FilterSet::new(&wl, &bl);
        assert!(set.is_ok(), "{name}");
        let set = set.unwrap_or_default();
        let got: Vec<&str> = flows
            .iter()
            .filter(|(_, fl)| set.matches(fl))
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(got, want, "{name}");
    }
}
