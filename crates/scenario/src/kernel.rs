//! What the kernel must see and answer for each flow of a scenario: addresses, the ipcache and
//! policy maps at that point of the scenario, and `decide`'s verdict for each local side. A
//! kernel backend replays these as packets (see `weir policy test --datapath aya`).
//!
//! The L7 part of a flow is the proxies' job: for the kernel, a flow that `decide` redirects is
//! answered by the redirect itself, whatever the proxy later does with the request.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use weir_identity::Identity;
use weir_policy_compiler::{Flow, MapState, Verdict, decide, proto};
use weir_policy_model::Direction;

use crate::format::{FlowProto, Peer, Scenario};
use crate::run::{ScenarioRun, World, describe, load_policies};

/// The address `host` has in kernel probes, IPv4.
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// The address `remote-node` has in kernel probes, IPv4.
pub const REMOTE_NODE_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// The address `host` has in kernel probes, IPv6.
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1);
/// The address `remote-node` has in kernel probes, IPv6.
pub const REMOTE_NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 2);

/// One flow of a scenario as packets: the first packet of a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelProbe {
    /// The flow's line in the scenario file.
    pub line: usize,
    /// The flow, as the offline runner describes it.
    pub flow: String,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol (ICMPv6 for ICMP over IPv6).
    pub protocol: u8,
    /// Destination port, or the ICMP type.
    pub port: u16,
    /// The ipcache at this point of the scenario (prefix → identity); unknown addresses are
    /// world.
    pub ipcache: Vec<(IpNet, Identity)>,
    /// Each local side that judges the packet: the source pod's egress, the destination pod's
    /// ingress.
    pub sides: Vec<ProbeSide>,
}

/// One endpoint's judgement of a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSide {
    /// The pod's name.
    pub endpoint: String,
    /// The pod's identity.
    pub identity: Identity,
    /// Egress for the source pod, ingress for the destination pod.
    pub direction: Direction,
    /// The identity of the other end, as the ipcache gives it.
    pub remote: Identity,
    /// The pod's policy map at this point of the scenario.
    pub map_state: MapState,
    /// What the kernel must do with the packet: `decide`'s verdict.
    pub expected: Verdict,
}

/// Why a scenario cannot be turned into kernel probes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelProbeError {
    /// The two ends of a flow are in different address families.
    #[error("{file}:{line}: flow between an IPv4 and an IPv6 address cannot be a packet")]
    MixedFamilies {
        /// The scenario file.
        file: String,
        /// The flow's line.
        line: usize,
    },
    /// A flow names a pod the scenario does not define.
    #[error("{file}:{line}: unknown pod {name}")]
    UnknownEndpoint {
        /// The scenario file.
        file: String,
        /// The flow's line.
        line: usize,
        /// The name.
        name: String,
    },
}

/// The kernel probes of every flow of `s`, in order. Replies are left out: they are
/// conntrack's business, not policy's, and are covered by the datapath's own tests.
pub fn kernel_probes(s: &Scenario) -> Result<Vec<KernelProbe>, KernelProbeError> {
    let mut scratch = ScenarioRun {
        file: s.file.clone(),
        name: s.name.clone(),
        errors: Vec::new(),
        rejected: Vec::new(),
        flows: Vec::new(),
    };
    let policies = load_policies(s, &mut scratch);
    let mut world = World::new(s, policies);
    let hosts = [IpAddr::V4(HOST_V4), IpAddr::V6(HOST_V6)];
    let remote_nodes = [IpAddr::V4(REMOTE_NODE_V4), IpAddr::V6(REMOTE_NODE_V6)];
    let mut out = Vec::new();
    for flow in &s.flows {
        if flow.reply {
            continue;
        }
        // The same steps, in the same order, as the offline runner: learning from DNS first,
        // then the connection (which may itself teach a DNS answer, for later flows).
        if let Some(name) = &flow.after_dns {
            world.resolve(&flow.from, name);
        }
        let v6 = world.is_ipv6(&flow.from) || world.is_ipv6(&flow.to);
        let addr = |p: &Peer| -> Result<IpAddr, KernelProbeError> {
            Ok(match p {
                Peer::Endpoint(n) => s
                    .endpoints
                    .iter()
                    .find(|e| &e.name == n)
                    .map(|e| e.ip)
                    .ok_or_else(|| KernelProbeError::UnknownEndpoint {
                        file: s.file.clone(),
                        line: flow.line,
                        name: n.clone(),
                    })?,
                Peer::Host if v6 => IpAddr::V6(HOST_V6),
                Peer::Host => IpAddr::V4(HOST_V4),
                Peer::RemoteNode if v6 => IpAddr::V6(REMOTE_NODE_V6),
                Peer::RemoteNode => IpAddr::V4(REMOTE_NODE_V4),
                Peer::World(ip) => *ip,
            })
        };
        let src = addr(&flow.from)?;
        let dst = addr(&flow.to)?;
        if src.is_ipv6() != dst.is_ipv6() {
            return Err(KernelProbeError::MixedFamilies {
                file: s.file.clone(),
                line: flow.line,
            });
        }
        let protocol = match flow.proto {
            FlowProto::Tcp => proto::TCP,
            FlowProto::Udp => proto::UDP,
            FlowProto::Sctp => proto::SCTP,
            FlowProto::Icmp if v6 => proto::ICMPV6,
            FlowProto::Icmp => proto::ICMP,
        };
        let src_id = world.peer_identity(&flow.from);
        let dst_id = world.peer_identity(&flow.to);
        let mut sides = Vec::new();
        for (direction, local, remote) in [
            (Direction::Egress, &flow.from, dst_id),
            (Direction::Ingress, &flow.to, src_id),
        ] {
            let Peer::Endpoint(name) = local else {
                continue;
            };
            let (Some(policy), Some(identity)) =
                (world.policy_of(name), world.endpoint_identity(name))
            else {
                continue;
            };
            let expected = decide(
                &policy.map_state,
                &Flow {
                    direction,
                    remote,
                    protocol,
                    port: flow.port,
                },
            )
            .verdict;
            sides.push(ProbeSide {
                endpoint: name.clone(),
                identity,
                direction,
                remote,
                map_state: policy.map_state,
                expected,
            });
        }
        out.push(KernelProbe {
            line: flow.line,
            flow: describe(flow),
            src,
            dst,
            protocol,
            port: flow.port,
            ipcache: world.ipcache(&hosts, &remote_nodes),
            sides,
        });
        world.connect(flow);
    }
    Ok(out)
}
