//! Property tests: incremental = from scratch, order independence, deny wins, and the
//! pre-resolution invariant; verdicts checked against a naive reference evaluator.

use proptest::prelude::*;
use weir_identity::{Identity, LabelKey, LabelSet, Operator, Requirement, Selector};
use weir_policy_model::{
    Direction, Enforcement, Entity, Peer, PeerRule, Peers, Policy, Port, PortRule, Protocol, Rule,
};

use crate::peers::peer_selects;
use crate::testutil::*;
use crate::*;

fn selector(i: u8) -> Selector {
    match i % 6 {
        0 => Selector::all(),
        1 => sel(&[("app", "a")]),
        2 => sel(&[("app", "b")]),
        3 => sel(&[("k8s:io.kubernetes.pod.namespace", "x")]),
        4 => sel(&[("app", "a"), ("k8s:io.kubernetes.pod.namespace", "y")]),
        _ => Selector::new(vec![
            Requirement::new(
                LabelKey::parse_selector_key("app"),
                Operator::NotIn,
                ["a".to_string()].into(),
            )
            .unwrap_or_else(|_| Requirement::equals(LabelKey::parse_selector_key("app"), "a")),
        ]),
    }
}

fn labels(app: u8, ns: u8) -> LabelSet {
    let app = ["a", "b", "c"][usize::from(app % 3)];
    let ns = ["x", "y"][usize::from(ns % 2)];
    pod_labels(ns, &[("app", app)])
}

const CIDRS: [&str; 4] = ["10.2.0.0/16", "10.1.2.0/24", "11.0.0.0/8", "10.0.0.0/8"];

fn arb_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        (0u8..6).prop_map(|i| Peer::Endpoints(selector(i))),
        prop::sample::select(vec![
            Entity::World,
            Entity::Cluster,
            Entity::Host,
            Entity::All
        ])
        .prop_map(Peer::Entity),
        Just(Peer::Cidr {
            cidr: "10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!()),
            except: vec!["10.1.0.0/16".parse().unwrap_or_else(|_| unreachable!())],
        }),
    ]
}

fn arb_port_rule() -> impl Strategy<Value = PortRule> {
    prop_oneof![
        Just(tcp(80)),
        Just(ports(vec![pp(53, None, Protocol::Any)])),
        Just(ports(vec![pp(80, Some(83), Protocol::Tcp)])),
        Just(ports(vec![pp(0, None, Protocol::Udp)])),
        Just(ports(vec![])),
        Just(http(80, &[("GET", "/")])),
    ]
}

fn arb_peer_rule() -> impl Strategy<Value = PeerRule> {
    (
        prop_oneof![
            1 => Just(Peers::Any),
            4 => prop::collection::vec(arb_peer(), 0..3).prop_map(Peers::List),
        ],
        prop::collection::vec(arb_port_rule(), 0..3),
        prop::option::of(Just(icmp4(8))),
    )
        .prop_map(|(peers, ports, icmp)| peer_rule(peers, ports, icmp.into_iter().collect()))
}

#[derive(Debug, Clone)]
struct Side {
    soft: bool,
    allow: Vec<PeerRule>,
    deny: Vec<PeerRule>,
}

fn arb_side() -> impl Strategy<Value = Side> {
    (
        prop::bool::weighted(0.2),
        prop::collection::vec(arb_peer_rule(), 0..3),
        prop::collection::vec(arb_peer_rule(), 0..2),
    )
        .prop_map(|(soft, allow, deny)| Side { soft, allow, deny })
}

fn arb_rule() -> impl Strategy<Value = (u8, Side, Side)> {
    (0u8..6, arb_side(), arb_side())
}

fn build_policy(k: u8, rules: &[(u8, Side, Side)]) -> Policy {
    let name = cnp("p", &format!("pol{k}"));
    let rules = rules
        .iter()
        .enumerate()
        .map(|(i, (s, ing, egr))| {
            let mut r: Rule = rule(&name, selector(*s));
            r.spec = i;
            r.multi_spec = true;
            for (d, side) in [(&mut r.ingress, ing), (&mut r.egress, egr)] {
                for pr in &side.allow {
                    push_allow(d, pr.clone());
                }
                for pr in &side.deny {
                    push_deny(d, pr.clone());
                }
                if side.soft && d.enforcement != Enforcement::None {
                    d.enforcement = Enforcement::NoDefaultDeny;
                }
            }
            r
        })
        .collect();
    policy(name, rules)
}

#[derive(Debug, Clone)]
enum Op {
    AddIdentity(u8, u8, u8),
    AddCidr(u8, u8),
    RemoveIdentity(u8),
    /// Upsert a policy; `true`: through `update_policy`, else `recompile`.
    Upsert(u8, Vec<(u8, Side, Side)>, bool),
    Remove(u8, bool),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0u8..3, 0u8..2).prop_map(|(i, a, n)| Op::AddIdentity(i, a, n)),
        (0u8..3, 0u8..4).prop_map(|(i, c)| Op::AddCidr(i, c)),
        (0u8..9).prop_map(Op::RemoveIdentity),
        (
            0u8..3,
            prop::collection::vec(arb_rule(), 1..3),
            any::<bool>()
        )
            .prop_map(|(k, r, inc)| Op::Upsert(k, r, inc)),
        (0u8..3, any::<bool>()).prop_map(|(k, inc)| Op::Remove(k, inc)),
    ]
}

fn op_identity(i: u8) -> Identity {
    if i < 6 {
        Identity(256 + u32::from(i))
    } else {
        Identity((1 << 24) + u32::from(i))
    }
}

const PORTS: [(u8, u16); 8] = [
    (proto::TCP, 80),
    (proto::TCP, 82),
    (proto::TCP, 53),
    (proto::UDP, 53),
    (proto::SCTP, 53),
    (proto::UDP, 9),
    (proto::ICMP, 8),
    (proto::ICMP, 0),
];

fn l4_matches(pr: &PeerRule, protocol: u8, port: u16) -> bool {
    if pr.is_l3_only() {
        return true;
    }
    let in_ports = pr.ports.iter().any(|r| {
        if r.ports.is_empty() {
            return Protocol::Any.numbers().contains(&protocol);
        }
        r.ports.iter().any(|p| {
            p.protocol.numbers().contains(&protocol)
                && match p.port {
                    Port::Number(0) => true,
                    Port::Number(lo) => {
                        let hi = p.end_port.filter(|h| *h > lo).unwrap_or(lo);
                        (lo..=hi).contains(&port)
                    }
                    Port::Named(_) => false,
                }
        })
    });
    in_ports
        || pr
            .icmps
            .iter()
            .any(|i| protocol == proto::ICMP && u16::from(i.icmp_type) == port)
}

/// The naive meaning of the rules for one flow: `Some(true)` deny rule, `Some(false)` allowed,
/// `None` default deny.
fn reference(c: &Compiler, ep: &EndpointInfo, f: &Flow) -> Option<bool> {
    let info = c.identities().get(f.remote)?;
    let matches = |pr: &PeerRule| {
        !pr.allows_nothing()
            && match &pr.peers {
                Peers::Any => true,
                Peers::List(l) => l.iter().any(|p| {
                    matches!(p, Peer::Entity(Entity::All))
                        || peer_selects(p, f.remote, info, &c.config().cluster_name)
                }),
            }
            && l4_matches(pr, f.protocol, f.port)
    };
    let mut enforced = false;
    let mut allowed = false;
    for p in c.repository().iter() {
        for r in p.rules.iter().filter(|r| r.subject.matches(&ep.labels)) {
            let d = match f.direction {
                Direction::Ingress => &r.ingress,
                Direction::Egress => &r.egress,
            };
            if d.deny.iter().any(matches) {
                return Some(true);
            }
            enforced |= d.enforcement == Enforcement::DefaultDeny;
            allowed |= d.allow.iter().any(matches);
        }
    }
    let host = f.direction == Direction::Ingress && f.remote == Identity(1);
    (allowed || !enforced || host).then_some(false)
}

fn check_against_reference(
    c: &Compiler,
    ep: &EndpointInfo,
    p: &EndpointPolicy,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(p.map_state.deny_violations(), vec![]);
    let ids: Vec<Identity> = c.identities().iter().map(|(i, _)| i).collect();
    for id in ids {
        for dir in [Direction::Ingress, Direction::Egress] {
            for (protocol, port) in PORTS {
                let f = Flow {
                    direction: dir,
                    remote: id,
                    protocol,
                    port,
                };
                let got = p.decide(&f).verdict;
                let want = reference(c, ep, &f);
                let got_class = match got {
                    Verdict::Deny { reason } if reason == DROP_POLICY_DENY => Some(true),
                    Verdict::Deny { .. } => None,
                    _ => Some(false),
                };
                prop_assert_eq!(got_class, want, "flow {:?} got {:?}", f, got);
            }
        }
    }
    Ok(())
}

fn base_compiler() -> Compiler {
    let mut c = Compiler::new(CompilerConfig::default());
    for i in 0..4u8 {
        c.upsert_identity(op_identity(i), labels(i, i / 2), NamedPorts::new());
    }
    c.upsert_identity(op_identity(7), cidr_labels(CIDRS[0]), NamedPorts::new());
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// (a) incremental updates equal a fresh compile, and their diffs rebuild the map;
    /// (c)+(d) every state agrees with the reference and keeps the deny invariant.
    #[test]
    fn incremental_equals_scratch(
        app in 0u8..3, ns in 0u8..2,
        init in prop::collection::vec(arb_rule(), 0..3),
        ops in prop::collection::vec(arb_op(), 1..8),
    ) {
        let mut c = base_compiler();
        c.upsert_policy(build_policy(0, &init));
        let ep = endpoint(999, labels(app, ns));
        let mut p = c.compile(&ep);
        let mut shadow = p.map_state.clone();
        check_against_reference(&c, &ep, &p)?;
        for op in ops {
            let diff = match op {
                Op::AddIdentity(i, a, n) => {
                    let id = op_identity(i);
                    c.upsert_identity(id, labels(a, n), NamedPorts::new());
                    c.update_identity(&ep, &mut p, id)
                }
                Op::AddCidr(i, k) => {
                    let id = op_identity(6 + i);
                    c.upsert_identity(id, cidr_labels(CIDRS[usize::from(k % 4)]), NamedPorts::new());
                    c.update_identity(&ep, &mut p, id)
                }
                Op::RemoveIdentity(i) => {
                    let id = op_identity(i);
                    c.remove_identity(id);
                    c.update_identity(&ep, &mut p, id)
                }
                Op::Upsert(k, rules, inc) => {
                    let name = cnp("p", &format!("pol{k}"));
                    c.upsert_policy(build_policy(k, &rules));
                    if inc { c.update_policy(&ep, &mut p, &name) } else { c.recompile(&ep, &mut p) }
                }
                Op::Remove(k, inc) => {
                    let name = cnp("p", &format!("pol{k}"));
                    c.remove_policy(&name);
                    if inc { c.update_policy(&ep, &mut p, &name) } else { c.recompile(&ep, &mut p) }
                }
            };
            shadow.apply(&diff);
            let fresh = c.compile(&ep);
            prop_assert_eq!(&p, &fresh);
            prop_assert_eq!(&shadow, &fresh.map_state);
            check_against_reference(&c, &ep, &p)?;
        }
    }

    /// (b) the map does not depend on the order of rules or peer rules.
    #[test]
    fn order_independent(
        app in 0u8..3, ns in 0u8..2,
        rules in prop::collection::vec(arb_rule(), 1..4),
    ) {
        let mut c = base_compiler();
        c.upsert_identity(op_identity(8), cidr_labels(CIDRS[1]), NamedPorts::new());
        let ep = endpoint(999, labels(app, ns));
        c.upsert_policy(build_policy(0, &rules));
        let a = c.compile(&ep);
        let mut reversed = build_policy(0, &rules);
        reversed.rules.reverse();
        for r in &mut reversed.rules {
            for d in [&mut r.ingress, &mut r.egress] {
                d.allow.reverse();
                d.deny.reverse();
            }
        }
        c.upsert_policy(reversed);
        let b = c.compile(&ep);
        prop_assert_eq!(&a.map_state, &b.map_state);
        prop_assert_eq!(a.ingress_enforced, b.ingress_enforced);
        prop_assert_eq!(a.egress_enforced, b.egress_enforced);
    }

    /// `update_policy` equals a fresh compile (and its diff rebuilds the map) when a base
    /// policy keeps both directions enforced, so the incremental path is the one taken.
    #[test]
    fn policy_updates_equal_scratch(
        app in 0u8..3, ns in 0u8..2,
        ops in prop::collection::vec(arb_op(), 1..10),
    ) {
        let mut c = base_compiler();
        let enforce = Side {
            soft: false,
            allow: vec![peer_rule(Peers::List(vec![]), vec![], vec![])],
            deny: vec![],
        };
        c.upsert_policy(build_policy(9, &[(0, enforce.clone(), enforce)]));
        let ep = endpoint(999, labels(app, ns));
        let mut p = c.compile(&ep);
        let mut shadow = p.map_state.clone();
        for op in ops {
            let diff = match op {
                Op::AddIdentity(i, a, n) => {
                    let id = op_identity(i);
                    c.upsert_identity(id, labels(a, n), NamedPorts::new());
                    c.update_identity(&ep, &mut p, id)
                }
                Op::AddCidr(i, k) => {
                    let id = op_identity(6 + i);
                    c.upsert_identity(id, cidr_labels(CIDRS[usize::from(k % 4)]), NamedPorts::new());
                    c.update_identity(&ep, &mut p, id)
                }
                Op::RemoveIdentity(i) => {
                    let id = op_identity(i);
                    c.remove_identity(id);
                    c.update_identity(&ep, &mut p, id)
                }
                Op::Upsert(k, rules, _) => {
                    let name = cnp("p", &format!("pol{k}"));
                    c.upsert_policy(build_policy(k, &rules));
                    c.update_policy(&ep, &mut p, &name)
                }
                Op::Remove(k, _) => {
                    let name = cnp("p", &format!("pol{k}"));
                    c.remove_policy(&name);
                    c.update_policy(&ep, &mut p, &name)
                }
            };
            shadow.apply(&diff);
            let fresh = c.compile(&ep);
            prop_assert_eq!(&p, &fresh);
            prop_assert_eq!(&shadow, &fresh.map_state);
            prop_assert_eq!(p.map_state.deny_violations(), vec![]);
        }
    }
}
