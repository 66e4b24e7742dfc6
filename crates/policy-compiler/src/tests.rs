//! Semantics tests: the seed scenario and the cases of semantics.md §1–§5, with rules built
//! directly as values.

use std::collections::BTreeSet;

use weir_identity::{Identity, Label, LabelKey, LabelSet, Operator, Requirement, Selector};
use weir_l7_match::DnsRule;
use weir_policy_model::{
    Direction, Enforcement, Entity, Peer, Peers, PolicyKind, PolicyName, Port, PortProtocol,
    PortRule, Protocol,
};

use crate::testutil::*;
use crate::*;

const FRONTEND: Identity = Identity(256);
const BACKEND: Identity = Identity(257);
const API: Identity = Identity(258);
const KUBE_DNS: Identity = Identity(259);
const STAGING_FRONTEND: Identity = Identity(260);
const CIDR_ID: Identity = Identity((1 << 24) + 1);
const FQDN_ID: Identity = Identity((1 << 24) + 2);
const HOST: Identity = Identity(1);
const WORLD: Identity = Identity(2);

fn compiler() -> Compiler {
    compiler_with(CompilerConfig::default())
}

fn compiler_with(cfg: CompilerConfig) -> Compiler {
    let mut c = Compiler::new(cfg);
    let np = NamedPorts::new;
    c.upsert_identity(
        FRONTEND,
        pod_labels("production", &[("app", "frontend")]),
        np(),
    );
    c.upsert_identity(
        BACKEND,
        pod_labels("production", &[("app", "backend")]),
        np(),
    );
    c.upsert_identity(
        API,
        pod_labels("production", &[("app", "api-server")]),
        np(),
    );
    c.upsert_identity(
        KUBE_DNS,
        pod_labels("kube-system", &[("k8s-app", "kube-dns")]),
        np(),
    );
    c.upsert_identity(
        STAGING_FRONTEND,
        pod_labels("staging", &[("app", "frontend")]),
        np(),
    );
    c.upsert_identity(CIDR_ID, cidr_labels("1.2.3.0/24"), np());
    let mut fq = cidr_labels("52.1.1.1/32");
    fq.insert(fqdn_label(&DnsRule::MatchName("API.Stripe.com".into())));
    c.upsert_identity(FQDN_ID, fq, np());
    c
}

fn ep(c: &Compiler, id: Identity) -> EndpointInfo {
    let labels = c
        .identities()
        .get(id)
        .map(|i| LabelSet::clone(&i.labels))
        .unwrap_or_default();
    endpoint(id.0, labels)
}

fn flow(direction: Direction, remote: Identity, protocol: u8, port: u16) -> Flow {
    Flow {
        direction,
        remote,
        protocol,
        port,
    }
}

fn ing(p: &EndpointPolicy, remote: Identity, protocol: u8, port: u16) -> Verdict {
    p.decide(&flow(Direction::Ingress, remote, protocol, port))
        .verdict
}

fn egr(p: &EndpointPolicy, remote: Identity, protocol: u8, port: u16) -> Verdict {
    p.decide(&flow(Direction::Egress, remote, protocol, port))
        .verdict
}

const ALLOW: Verdict = Verdict::Allow;
const DEFAULT_DENY: Verdict = Verdict::Deny {
    reason: DROP_POLICY_DENIED,
};
const DENY: Verdict = Verdict::Deny {
    reason: DROP_POLICY_DENY,
};
/// Every HTTP rule in these tests is an ingress rule: the ingress proxy port.
const HTTP: Verdict = Verdict::Redirect { proxy_port: 15002 };
const DNS: Verdict = Verdict::Redirect { proxy_port: 15053 };

fn frontend() -> Selector {
    sel(&[
        ("app", "frontend"),
        ("k8s:io.kubernetes.pod.namespace", "production"),
    ])
}

#[test]
fn deny_all_ingress_idiom() {
    let mut c = compiler();
    let name = cnp("production", "deny-all-ingress");
    let mut r = ns_rule(&name, &[]);
    push_allow(&mut r.ingress, peer_rule(Peers::Any, vec![], vec![]));
    c.upsert_policy(policy(name.clone(), vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    assert!(p.ingress_enforced && !p.egress_enforced);
    let d = p.decide(&flow(Direction::Ingress, FRONTEND, proto::TCP, 8080));
    assert_eq!(d.verdict, DEFAULT_DENY);
    assert_eq!(d.selected_by, vec![name]);
    assert_eq!(
        d.to_string(),
        "denied (default deny): selected by production/deny-all-ingress; no rule allowed this"
    );
    assert_eq!(ing(&p, WORLD, proto::ICMP, 8), DEFAULT_DENY);
    // Host access stays, egress is untouched.
    assert_eq!(ing(&p, HOST, proto::TCP, 8080), ALLOW);
    assert_eq!(egr(&p, WORLD, proto::TCP, 443), ALLOW);
    // A pod in another namespace is not selected.
    let other = c.compile(&ep(&c, KUBE_DNS));
    assert!(!other.ingress_enforced);
    assert_eq!(ing(&other, FRONTEND, proto::TCP, 1), ALLOW);
}

fn frontend_to_backend(c: &mut Compiler) {
    let name = cnp("production", "allow-frontend-to-backend");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![tcp(8080)], vec![]),
    );
    c.upsert_policy(policy(name, vec![r]));
}

#[test]
fn frontend_to_backend_l4() {
    let mut c = compiler();
    frontend_to_backend(&mut c);
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8080), ALLOW);
    let d = p.decide(&flow(Direction::Ingress, FRONTEND, proto::TCP, 8080));
    assert_eq!(d.derived_from.len(), 1);
    assert_eq!(
        d.derived_from[0].to_string(),
        "production/allow-frontend-to-backend ingress[0]"
    );
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8081), DEFAULT_DENY);
    assert_eq!(ing(&p, FRONTEND, proto::UDP, 8080), DEFAULT_DENY);
    assert_eq!(ing(&p, STAGING_FRONTEND, proto::TCP, 8080), DEFAULT_DENY);
    // toPorts does not allow ICMP.
    assert_eq!(ing(&p, FRONTEND, proto::ICMP, 8), DEFAULT_DENY);
    assert_eq!(p.map_state.deny_violations(), vec![]);
}

fn api_l7(c: &mut Compiler) -> PolicyName {
    let name = cnp("production", "api-l7-policy");
    let mut r = ns_rule(&name, &[("app", "api-server")]);
    push_allow(
        &mut r.ingress,
        peer_rule(
            eps(frontend()),
            vec![http(
                8080,
                &[
                    ("GET", "/api/products"),
                    ("POST", "/api/orders"),
                    ("GET", "/api/users/[0-9]+"),
                ],
            )],
            vec![],
        ),
    );
    c.upsert_policy(policy(name.clone(), vec![r]));
    name
}

#[test]
fn l7_http_policy_redirects_and_lists_rules() {
    let mut c = compiler();
    api_l7(&mut c);
    let p = c.compile(&ep(&c, API));
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8080), HTTP);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 80), DEFAULT_DENY);
    assert_eq!(ing(&p, BACKEND, proto::TCP, 8080), DEFAULT_DENY);
    match p.l7_verdict(Direction::Ingress, FRONTEND, proto::TCP, 8080) {
        L7Verdict::Rules(set) => {
            assert_eq!(set.http.len(), 3);
            assert!(set.dns.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.l7_verdict(Direction::Ingress, BACKEND, proto::TCP, 8080),
        L7Verdict::Denied
    );
    assert_eq!(
        p.l7_verdict(Direction::Ingress, FRONTEND, proto::TCP, 9),
        L7Verdict::NotRedirected
    );
    // Host access shadows L7 (it is an L3 allow for the host).
    assert!(matches!(
        p.l7_verdict(Direction::Ingress, HOST, proto::TCP, 8080),
        L7Verdict::AllowAll { .. }
    ));
}

#[test]
fn l4_allow_shadows_l7_but_traffic_is_still_proxied() {
    for shadow in [
        // Same peer, same port, no L7.
        peer_rule(eps(frontend()), vec![tcp(8080)], vec![]),
        // L3-only for the same peer.
        peer_rule(eps(frontend()), vec![], vec![]),
        // Port for every peer.
        peer_rule(Peers::Any, vec![tcp(8080)], vec![]),
        // A range covering the port.
        peer_rule(
            eps(frontend()),
            vec![ports(vec![pp(8000, Some(8100), Protocol::Tcp)])],
            vec![],
        ),
    ] {
        let mut c = compiler();
        api_l7(&mut c);
        let name = cnp("production", "l4");
        let mut r = ns_rule(&name, &[("app", "api-server")]);
        push_allow(&mut r.ingress, shadow.clone());
        c.upsert_policy(policy(name, vec![r]));
        let p = c.compile(&ep(&c, API));
        assert_eq!(ing(&p, FRONTEND, proto::TCP, 8080), HTTP, "{shadow:?}");
        assert!(
            matches!(
                p.l7_verdict(Direction::Ingress, FRONTEND, proto::TCP, 8080),
                L7Verdict::AllowAll { ref derived_from } if derived_from.len() == 1
            ),
            "{shadow:?}"
        );
    }
    // A shadowing allow for another peer does not shadow.
    let mut c = compiler();
    api_l7(&mut c);
    let name = cnp("production", "l4");
    let mut r = ns_rule(&name, &[("app", "api-server")]);
    let be = sel(&[("app", "backend")]);
    push_allow(&mut r.ingress, peer_rule(eps(be), vec![tcp(8080)], vec![]));
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, API));
    assert!(matches!(
        p.l7_verdict(Direction::Ingress, FRONTEND, proto::TCP, 8080),
        L7Verdict::Rules(_)
    ));
    assert!(matches!(
        p.l7_verdict(Direction::Ingress, BACKEND, proto::TCP, 8080),
        L7Verdict::AllowAll { .. }
    ));
}

#[test]
fn dns_policy_with_fqdns_and_kube_dns() {
    let mut c = compiler();
    let name = cnp("production", "allow-external-apis");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.egress,
        peer_rule(
            Peers::List(vec![
                Peer::Fqdn(DnsRule::MatchName("api.stripe.com".into())),
                Peer::Fqdn(DnsRule::MatchName("api.github.com".into())),
                Peer::Fqdn(DnsRule::MatchPattern("*.amazonaws.com".into())),
            ]),
            vec![tcp(443)],
            vec![],
        ),
    );
    push_allow(
        &mut r.egress,
        peer_rule(
            eps(sel(&[
                ("k8s:io.kubernetes.pod.namespace", "kube-system"),
                ("k8s-app", "kube-dns"),
            ])),
            vec![PortRule {
                ports: vec![pp(53, None, Protocol::Udp)],
                l7: Some(weir_policy_model::L7Rules::Dns(vec![
                    DnsRule::MatchPattern("*".into()),
                ])),
            }],
            vec![],
        ),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    assert!(p.egress_enforced && !p.ingress_enforced);
    assert_eq!(egr(&p, KUBE_DNS, proto::UDP, 53), DNS);
    assert_eq!(egr(&p, KUBE_DNS, proto::TCP, 53), DEFAULT_DENY);
    match p.l7_verdict(Direction::Egress, KUBE_DNS, proto::UDP, 53) {
        L7Verdict::Rules(set) => assert_eq!(
            set.dns.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
            vec![DnsRule::MatchPattern("*".into())]
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(egr(&p, FQDN_ID, proto::TCP, 443), ALLOW);
    assert_eq!(egr(&p, FQDN_ID, proto::TCP, 80), DEFAULT_DENY);
    assert_eq!(egr(&p, CIDR_ID, proto::TCP, 443), DEFAULT_DENY);
    assert_eq!(egr(&p, WORLD, proto::TCP, 443), DEFAULT_DENY);
    assert_eq!(
        fqdn_label(&DnsRule::MatchName("API.Stripe.com".into())).to_string(),
        "fqdn:api.stripe.com."
    );
    assert_eq!(
        fqdn_label(&DnsRule::MatchPattern("*.AmazonAWS.com".into())).to_string(),
        "fqdn:*.amazonaws.com"
    );
    // A new FQDN identity for the pattern: incremental update allows it.
    let mut p = p;
    let aws = Identity((1 << 24) + 9);
    let mut l = cidr_labels("3.3.3.3/32");
    l.insert(fqdn_label(&DnsRule::MatchPattern("*.amazonaws.com".into())));
    c.upsert_identity(aws, l, NamedPorts::new());
    let diff = c.update_identity(&ep(&c, BACKEND), &mut p, aws);
    assert_eq!(diff.upserts.len(), 1);
    assert_eq!(egr(&p, aws, proto::TCP, 443), ALLOW);
    assert_eq!(p, c.compile(&ep(&c, BACKEND)));
}

#[test]
fn ccnp_deny_external_with_cluster_entity() {
    let mut c = compiler();
    let name = PolicyName {
        kind: PolicyKind::CiliumClusterwideNetworkPolicy,
        namespace: None,
        name: "deny-external-by-default".into(),
    };
    let subject = Selector::new(vec![
        Requirement::new(
            LabelKey::parse_selector_key(NS),
            Operator::NotIn,
            ["kube-system".to_string(), "ingress-nginx".to_string()].into(),
        )
        .unwrap(),
    ]);
    let mut r = rule(&name, subject);
    push_allow(
        &mut r.egress,
        peer_rule(
            Peers::List(vec![Peer::Entity(Entity::Cluster)]),
            vec![],
            vec![],
        ),
    );
    push_allow(
        &mut r.egress,
        peer_rule(
            eps(sel(&[("k8s:io.kubernetes.pod.namespace", "kube-system")])),
            vec![ports(vec![pp(53, None, Protocol::Udp)])],
            vec![],
        ),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(egr(&p, FRONTEND, proto::TCP, 8080), ALLOW);
    assert_eq!(egr(&p, KUBE_DNS, proto::UDP, 53), ALLOW);
    assert_eq!(egr(&p, HOST, proto::TCP, 10250), ALLOW);
    assert_eq!(egr(&p, Identity(6), proto::ICMP, 8), ALLOW);
    assert_eq!(egr(&p, Identity(7), proto::TCP, 443), ALLOW);
    assert_eq!(egr(&p, WORLD, proto::TCP, 443), DEFAULT_DENY);
    assert_eq!(egr(&p, CIDR_ID, proto::TCP, 443), DEFAULT_DENY);
    assert_eq!(egr(&p, Identity(8), proto::TCP, 443), DEFAULT_DENY);
    // A pod of another cluster is not in `cluster`.
    let mut c2 = c.clone();
    let mut other = pod_labels("production", &[("app", "x")]);
    other.insert(Label::k8s("io.cilium.k8s.policy.cluster", "east"));
    c2.upsert_identity(Identity(70000), other, NamedPorts::new());
    assert_eq!(
        egr(&c2.compile(&ep(&c, BACKEND)), Identity(70000), 6, 1),
        DEFAULT_DENY
    );
    // kube-system is not selected.
    assert!(!c.compile(&ep(&c, KUBE_DNS)).egress_enforced);
}

/// deny.rst: allows = L7 HTTP on 80, L4 80/TCP, L4 81/TCP, L3 from client.
fn deny_rst_allows(c: &mut Compiler) {
    let name = cnp("production", "allows");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![http(80, &[("GET", "/")])], vec![]),
    );
    push_allow(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![tcp(80)], vec![]),
    );
    push_allow(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![tcp(81)], vec![]),
    );
    push_allow(&mut r.ingress, peer_rule(eps(frontend()), vec![], vec![]));
    c.upsert_policy(policy(name, vec![r]));
}

#[test]
fn deny_rst_truth_table() {
    // Deny L4 80 (from everyone): 81 allowed, 80 denied, ping allowed.
    let mut c = compiler();
    deny_rst_allows(&mut c);
    let name = cnp("production", "deny-80");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_deny(&mut r.ingress, peer_rule(Peers::Any, vec![tcp(80)], vec![]));
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 80), DENY);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 81), ALLOW);
    assert_eq!(ing(&p, FRONTEND, proto::ICMP, 8), ALLOW);
    assert_eq!(ing(&p, HOST, proto::TCP, 80), DENY);
    assert_eq!(p.map_state.deny_violations(), vec![]);
    // The identity-specific redirect on 80 was pre-resolved to a deny.
    let k = PolicyKey::new(FRONTEND, Direction::Ingress, proto::TCP, 80, 24);
    assert_eq!(
        p.map_state.get(&k).map(|e| e.action),
        Some(EntryAction::Deny)
    );

    // Deny L3 from client: everything denied.
    let mut c = compiler();
    deny_rst_allows(&mut c);
    let name = cnp("production", "deny-client");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_deny(&mut r.ingress, peer_rule(eps(frontend()), vec![], vec![]));
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    for (pr, port) in [
        (proto::TCP, 80),
        (proto::TCP, 81),
        (proto::ICMP, 8),
        (proto::UDP, 5),
    ] {
        assert_eq!(ing(&p, FRONTEND, pr, port), DENY);
    }
    assert_eq!(p.map_state.deny_violations(), vec![]);
}

#[test]
fn icmp_rules_and_l3_only() {
    let mut c = compiler();
    let name = cnp("production", "icmp");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![], vec![icmp4(8)]),
    );
    push_allow(
        &mut r.ingress,
        peer_rule(eps(sel(&[("app", "api-server")])), vec![], vec![]),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(ing(&p, FRONTEND, proto::ICMP, 8), ALLOW);
    assert_eq!(ing(&p, FRONTEND, proto::ICMP, 0), DEFAULT_DENY);
    assert_eq!(ing(&p, FRONTEND, proto::ICMPV6, 8), DEFAULT_DENY);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8), DEFAULT_DENY);
    // L3-only: every protocol, ICMP included.
    for (pr, port) in [
        (proto::ICMP, 8),
        (proto::TCP, 1),
        (proto::UDP, 65535),
        (47, 0),
    ] {
        assert_eq!(ing(&p, API, pr, port), ALLOW);
    }
}

#[test]
fn any_protocol_expands_to_tcp_udp_sctp_and_ranges_to_blocks() {
    let mut c = compiler();
    let name = cnp("production", "any");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.ingress,
        peer_rule(
            Peers::Any,
            vec![ports(vec![pp(53, None, Protocol::Any)])],
            vec![],
        ),
    );
    push_allow(
        &mut r.ingress,
        peer_rule(
            Peers::Any,
            vec![ports(vec![
                pp(8080, Some(8083), Protocol::Tcp),
                pp(0, None, Protocol::Sctp),
            ])],
            vec![],
        ),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    for pr in [proto::TCP, proto::UDP, proto::SCTP] {
        assert_eq!(ing(&p, WORLD, pr, 53), ALLOW);
    }
    assert_eq!(ing(&p, WORLD, proto::ICMP, 53), DEFAULT_DENY);
    for port in 8080..=8083 {
        assert_eq!(ing(&p, FRONTEND, proto::TCP, port), ALLOW);
    }
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8084), DEFAULT_DENY);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8079), DEFAULT_DENY);
    assert_eq!(ing(&p, FRONTEND, proto::SCTP, 9999), ALLOW);
    let range_key = PolicyKey::new(Identity::ANY, Direction::Ingress, proto::TCP, 8080, 22);
    assert!(p.map_state.get(&range_key).is_some());
    // 3 (ANY 53) + 1 (range) + 1 (SCTP all) + host + egress allow-all.
    assert_eq!(p.map_state.len(), 7);
}

#[test]
fn named_ports_resolve_per_side() {
    let mut c = compiler();
    let mut np = NamedPorts::new();
    np.insert("http".into(), (proto::TCP, 8080));
    np.insert("dns".into(), (proto::UDP, 53));
    c.upsert_identity(
        KUBE_DNS,
        LabelSet::clone(&c.identities().get(KUBE_DNS).unwrap().labels),
        np.clone(),
    );
    let named = |n: &str, protocol| PortRule {
        ports: vec![PortProtocol {
            port: Port::Named(n.into()),
            end_port: None,
            protocol,
        }],
        l7: None,
    };
    let name = cnp("production", "named");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![named("http", Protocol::Any)], vec![]),
    );
    push_allow(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![named("nope", Protocol::Any)], vec![]),
    );
    push_allow(
        &mut r.egress,
        peer_rule(Peers::Any, vec![named("dns", Protocol::Any)], vec![]),
    );
    push_allow(
        &mut r.egress,
        peer_rule(Peers::Any, vec![named("http", Protocol::Udp)], vec![]),
    );
    c.upsert_policy(policy(name, vec![r]));
    let mut e = ep(&c, BACKEND);
    e.named_ports.insert("http".into(), (proto::TCP, 9090));
    let p = c.compile(&e);
    // Ingress: the endpoint's own port.
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 9090), ALLOW);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8080), DEFAULT_DENY);
    // Egress: the peer's port (wildcard peer: any identity's).
    assert_eq!(egr(&p, KUBE_DNS, proto::UDP, 53), ALLOW);
    assert_eq!(egr(&p, KUBE_DNS, proto::TCP, 53), DEFAULT_DENY);
    // Protocol mismatch yields nothing; so does an unknown name.
    assert_eq!(egr(&p, KUBE_DNS, proto::UDP, 8080), DEFAULT_DENY);
    // Egress named ports towards a selected peer.
    let name = cnp("production", "named2");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.egress,
        peer_rule(
            eps(sel(&[("k8s-app", "kube-dns")])),
            vec![named("http", Protocol::Tcp)],
            vec![],
        ),
    );
    c.upsert_policy(policy(name, vec![r]));
    let mut p = c.compile(&e);
    assert_eq!(egr(&p, KUBE_DNS, proto::TCP, 8080), ALLOW);
    let k = PolicyKey::new(KUBE_DNS, Direction::Egress, proto::TCP, 8080, 24);
    assert!(p.map_state.get(&k).is_some());
    // Incremental falls back to a recompile here and still matches.
    c.upsert_identity(
        KUBE_DNS,
        LabelSet::clone(&c.identities().get(KUBE_DNS).unwrap().labels),
        NamedPorts::new(),
    );
    c.update_identity(&e, &mut p, KUBE_DNS);
    assert_eq!(p, c.compile(&e));
    assert_eq!(egr(&p, KUBE_DNS, proto::TCP, 8080), DEFAULT_DENY);
}

#[test]
fn cidr_with_except_never_selects_pods() {
    let mut c = compiler();
    let ids = [
        (Identity((1 << 24) + 10), "10.2.0.0/16", true),
        (Identity((1 << 24) + 11), "10.1.2.0/24", false),
        (Identity((1 << 24) + 12), "10.0.0.0/8", true),
        (Identity((1 << 24) + 13), "11.0.0.0/8", false),
        (Identity((1 << 24) + 14), "2001-db8--/32", false),
    ];
    for (id, prefix, _) in ids {
        c.upsert_identity(id, cidr_labels(prefix), NamedPorts::new());
    }
    // A pod whose IP would be in the prefix is still not selected (it has no cidr label).
    let name = cnp("production", "cidr");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.egress,
        peer_rule(
            Peers::List(vec![Peer::Cidr {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap()],
            }]),
            vec![],
            vec![],
        ),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    for (id, prefix, want) in ids {
        let v = egr(&p, id, proto::TCP, 1);
        assert_eq!(v == ALLOW, want, "{prefix}");
    }
    for pod in [FRONTEND, HOST, WORLD, Identity(9)] {
        assert_eq!(egr(&p, pod, proto::TCP, 1), DEFAULT_DENY, "{pod}");
    }
    // A /0 selects the world identities of its family.
    let name = cnp("production", "all-v4");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.egress,
        peer_rule(
            Peers::List(vec![Peer::Cidr {
                cidr: "0.0.0.0/0".parse().unwrap(),
                except: vec![],
            }]),
            vec![tcp(443)],
            vec![],
        ),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(egr(&p, WORLD, proto::TCP, 443), ALLOW);
    assert_eq!(egr(&p, Identity(9), proto::TCP, 443), ALLOW);
    assert_eq!(egr(&p, Identity(10), proto::TCP, 443), DEFAULT_DENY);
    assert_eq!(egr(&p, Identity((1 << 24) + 13), proto::TCP, 443), ALLOW);
    assert_eq!(
        egr(&p, Identity((1 << 24) + 14), proto::TCP, 443),
        DEFAULT_DENY
    );
    assert_eq!(egr(&p, FRONTEND, proto::TCP, 443), DEFAULT_DENY);
}

fn entity_selects(c: &Compiler, e: Entity) -> BTreeSet<Identity> {
    let mut c = c.clone();
    let name = cnp("production", "entity");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.egress,
        peer_rule(Peers::List(vec![Peer::Entity(e)]), vec![], vec![]),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    p.map_state
        .iter()
        .filter(|(k, _)| k.direction == Direction::Egress)
        .map(|(k, _)| k.identity)
        .collect()
}

#[test]
fn entities() {
    let mut c = compiler();
    let v6 = Identity((1 << 24) + 20);
    c.upsert_identity(v6, cidr_labels("2001-db8--/32"), NamedPorts::new());
    let ids = |v: &[u32]| v.iter().map(|&i| Identity(i)).collect::<BTreeSet<_>>();
    let fq = FQDN_ID.0;
    let ci = CIDR_ID.0;
    assert_eq!(entity_selects(&c, Entity::Host), ids(&[1]));
    assert_eq!(entity_selects(&c, Entity::RemoteNode), ids(&[6]));
    assert_eq!(entity_selects(&c, Entity::KubeApiserver), ids(&[7]));
    assert_eq!(entity_selects(&c, Entity::Ingress), ids(&[8]));
    assert_eq!(entity_selects(&c, Entity::Init), ids(&[5]));
    assert_eq!(entity_selects(&c, Entity::Health), ids(&[4]));
    assert_eq!(entity_selects(&c, Entity::Unmanaged), ids(&[3]));
    assert_eq!(
        entity_selects(&c, Entity::World),
        ids(&[2, 9, 10, ci, fq, v6.0])
    );
    assert_eq!(entity_selects(&c, Entity::WorldIpv4), ids(&[2, 9, ci, fq]));
    assert_eq!(entity_selects(&c, Entity::WorldIpv6), ids(&[2, 10, v6.0]));
    assert_eq!(
        entity_selects(&c, Entity::Cluster),
        ids(&[1, 3, 4, 5, 6, 7, 256, 257, 258, 259, 260])
    );
    assert_eq!(entity_selects(&c, Entity::All), ids(&[0]));
    assert_eq!(entity_selects(&c, Entity::None), ids(&[]));
}

#[test]
fn enable_default_deny_false_keeps_l7_filtering() {
    let mut c = compiler();
    let name = cnp("production", "soft");
    let mut r = ns_rule(&name, &[("app", "api-server")]);
    push_allow(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![http(8080, &[("GET", "/")])], vec![]),
    );
    r.ingress.enforcement = Enforcement::NoDefaultDeny;
    c.upsert_policy(policy(name.clone(), vec![r]));
    let p = c.compile(&ep(&c, API));
    assert!(!p.ingress_enforced);
    assert_eq!(p.selected_by_ingress, vec![name]);
    assert_eq!(ing(&p, BACKEND, proto::TCP, 8080), ALLOW);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 9), ALLOW);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8080), HTTP);
    assert!(matches!(
        p.l7_verdict(Direction::Ingress, FRONTEND, proto::TCP, 8080),
        L7Verdict::Rules(_)
    ));
    // Together with a default-deny rule, the direction becomes enforced.
    let name = cnp("production", "hard");
    let mut r = ns_rule(&name, &[("app", "api-server")]);
    push_allow(
        &mut r.ingress,
        peer_rule(eps(sel(&[("app", "backend")])), vec![tcp(1)], vec![]),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, API));
    assert!(p.ingress_enforced);
    assert_eq!(ing(&p, BACKEND, proto::TCP, 8080), DEFAULT_DENY);
}

#[test]
fn host_access() {
    let deny_all = |c: &mut Compiler| {
        let name = cnp("production", "deny-all");
        let mut r = ns_rule(&name, &[]);
        push_allow(&mut r.ingress, peer_rule(Peers::Any, vec![], vec![]));
        c.upsert_policy(policy(name, vec![r]));
    };
    let mut c = compiler();
    deny_all(&mut c);
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(ing(&p, HOST, proto::TCP, 1), ALLOW);
    let d = p.decide(&flow(Direction::Ingress, HOST, proto::TCP, 1));
    assert!(d.derived_from.is_empty());
    // Egress to the host is not covered by allow-localhost.
    let name = cnp("production", "egress");
    let mut r = ns_rule(&name, &[]);
    push_allow(&mut r.egress, peer_rule(Peers::Any, vec![], vec![]));
    push_deny(
        &mut r.ingress,
        peer_rule(
            Peers::List(vec![Peer::Entity(Entity::Host)]),
            vec![tcp(22)],
            vec![],
        ),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(egr(&p, HOST, proto::TCP, 1), DEFAULT_DENY);
    assert_eq!(ing(&p, HOST, proto::TCP, 22), DENY);
    assert_eq!(ing(&p, HOST, proto::TCP, 23), ALLOW);

    let mut c = compiler_with(CompilerConfig {
        allow_localhost: false,
        ..CompilerConfig::default()
    });
    deny_all(&mut c);
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(ing(&p, HOST, proto::TCP, 1), DEFAULT_DENY);
}

#[test]
fn merging_on_one_key() {
    let mut c = compiler();
    let a = cnp("production", "a");
    let b = cnp("production", "b");
    for (n, l7) in [(&a, false), (&b, true)] {
        let mut r = ns_rule(n, &[("app", "backend")]);
        let pr = if l7 {
            http(80, &[("GET", "/")])
        } else {
            tcp(80)
        };
        push_allow(&mut r.ingress, peer_rule(eps(frontend()), vec![pr], vec![]));
        c.upsert_policy(policy(n.clone(), vec![r]));
    }
    let p = c.compile(&ep(&c, BACKEND));
    let d = p.decide(&flow(Direction::Ingress, FRONTEND, proto::TCP, 80));
    assert_eq!(d.verdict, HTTP);
    assert_eq!(d.derived_from.len(), 2);
    let dn = cnp("production", "d");
    let mut r = ns_rule(&dn, &[("app", "backend")]);
    push_deny(
        &mut r.ingress,
        peer_rule(eps(frontend()), vec![tcp(80)], vec![]),
    );
    c.upsert_policy(policy(dn, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    let d = p.decide(&flow(Direction::Ingress, FRONTEND, proto::TCP, 80));
    assert_eq!(d.verdict, DENY);
    assert_eq!(d.derived_from.len(), 1);
    assert_eq!(d.derived_from[0].policy.name, "d");
}

#[test]
fn enforcement_modes() {
    let mut c = compiler_with(CompilerConfig {
        enforcement: EnforcementMode::Always,
        ..CompilerConfig::default()
    });
    let p = c.compile(&ep(&c, BACKEND));
    assert!(p.ingress_enforced && p.egress_enforced);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 1), DEFAULT_DENY);
    assert_eq!(egr(&p, FRONTEND, proto::TCP, 1), DEFAULT_DENY);
    assert_eq!(ing(&p, HOST, proto::TCP, 1), ALLOW);
    frontend_to_backend(&mut c);
    let p = c.compile(&ep(&c, BACKEND));
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 8080), ALLOW);

    let mut c = compiler_with(CompilerConfig {
        enforcement: EnforcementMode::Never,
        ..CompilerConfig::default()
    });
    frontend_to_backend(&mut c);
    let p = c.compile(&ep(&c, BACKEND));
    assert!(!p.ingress_enforced);
    assert_eq!(ing(&p, STAGING_FRONTEND, proto::TCP, 1), ALLOW);
    assert_eq!(p.map_state.len(), 2);
}

#[test]
fn incremental_identity_and_policy_diffs() {
    let mut c = compiler();
    frontend_to_backend(&mut c);
    api_l7(&mut c);
    let e = ep(&c, API);
    let mut p = c.compile(&e);
    // A second frontend pod identity appears.
    let f2 = Identity(300);
    c.upsert_identity(
        f2,
        pod_labels("production", &[("app", "frontend"), ("v", "2")]),
        NamedPorts::new(),
    );
    let d = c.update_identity(&e, &mut p, f2);
    assert_eq!(d.upserts.len(), 1);
    assert!(d.removals.is_empty());
    assert_eq!(p, c.compile(&e));
    assert!(matches!(
        p.l7_verdict(Direction::Ingress, f2, proto::TCP, 8080),
        L7Verdict::Rules(_)
    ));
    c.remove_identity(f2);
    let d = c.update_identity(&e, &mut p, f2);
    assert_eq!(d.removals.len(), 1);
    assert_eq!(p, c.compile(&e));
    // Removing the policy: recompile and diff.
    let d = c.recompile(&e, &mut p);
    assert!(d.is_empty());
    c.remove_policy(&cnp("production", "api-l7-policy"));
    let before = p.map_state.clone();
    let d = c.recompile(&e, &mut p);
    let mut applied = before;
    applied.apply(&d);
    assert_eq!(applied, p.map_state);
    assert!(!p.ingress_enforced);
}

#[test]
fn empty_peer_list_selects_nothing_but_enforces() {
    let mut c = compiler();
    let name = cnp("production", "empty");
    let mut r = ns_rule(&name, &[("app", "backend")]);
    push_allow(
        &mut r.ingress,
        peer_rule(Peers::List(vec![]), vec![tcp(80)], vec![]),
    );
    c.upsert_policy(policy(name, vec![r]));
    let p = c.compile(&ep(&c, BACKEND));
    assert!(p.ingress_enforced);
    assert_eq!(ing(&p, FRONTEND, proto::TCP, 80), DEFAULT_DENY);
    let _ = LabelSet::new();
}

/// Timing check for the goal "3k rules × 1k identities, one endpoint, ≤ 20 ms in release":
/// `cargo test --release -p weir-policy-compiler -- --ignored --nocapture timing`. Prints, never
/// asserts on time.
#[test]
#[ignore]
fn timing_3k_rules_1k_identities() {
    let mut c = Compiler::new(CompilerConfig::default());
    for i in 0..1000u32 {
        let app = format!("app{}", i % 100);
        let ns = format!("ns{}", i % 10);
        c.upsert_identity(
            Identity(1000 + i),
            pod_labels(&ns, &[("app", &app), ("pod", &i.to_string())]),
            NamedPorts::new(),
        );
    }
    for p in 0..30u32 {
        let name = cnp("ns0", &format!("pol{p}"));
        let rules = (0..100u32)
            .map(|j| {
                let k = p * 100 + j;
                let mut r = ns_rule(&name, &[]);
                r.spec = j as usize;
                let peer = sel(&[
                    ("app", &format!("app{}", k % 100)),
                    ("k8s:io.kubernetes.pod.namespace", &format!("ns{}", k % 10)),
                ]);
                let port = 8000 + (k % 50) as u16;
                let pr = if k % 7 == 0 {
                    http(port, &[("GET", "/x")])
                } else {
                    tcp(port)
                };
                push_allow(&mut r.ingress, peer_rule(eps(peer), vec![pr], vec![]));
                if k % 13 == 0 {
                    push_deny(
                        &mut r.egress,
                        peer_rule(Peers::Any, vec![tcp(port)], vec![]),
                    );
                }
                r
            })
            .collect();
        c.upsert_policy(policy(name, rules));
    }
    let e = endpoint(5000, pod_labels("ns0", &[("app", "me")]));
    let t = std::time::Instant::now();
    let _plan = c.compile(&endpoint(5001, pod_labels("other", &[])));
    let unselected = t.elapsed();
    let t = std::time::Instant::now();
    let p = c.compile(&e);
    let compile = t.elapsed();
    println!("unselected endpoint: {unselected:?}");
    let t = std::time::Instant::now();
    let mut n = 0;
    for id in 1000..2000u32 {
        for port in 8000..8064u16 {
            n += usize::from(ing(&p, Identity(id), proto::TCP, port) != DEFAULT_DENY);
        }
    }
    let per = t.elapsed() / 64_000;
    println!(
        "compile: {compile:?}, entries: {}, l7 ports: {}, decide: {per:?} each ({n} allowed)",
        p.map_state.len(),
        p.l7.ports.len()
    );
}
