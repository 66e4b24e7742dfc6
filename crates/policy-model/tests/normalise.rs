//! Normalisation rules (semantics.md §1-2).

use std::collections::BTreeSet;

use ipnet::IpNet;
use weir_identity::{Label, LabelKey, LabelSource, Operator, Requirement, Selector};
use weir_l7_match::{HeaderMatch, MismatchAction};
use weir_policy_model::{
    Enforcement, Entity, IcmpRule, IpFamily, L7Rules, Peer, Peers, Policy, Port, PortProtocol,
    Protocol, Rule, parse_policies,
};

fn parse(text: &str) -> Vec<Policy> {
    parse_policies("t.yaml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn cnp_rule(spec: &str) -> Rule {
    let p = parse(&format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n  namespace: prod\n{spec}"
    ));
    p[0].rules[0].clone()
}

fn ccnp_rule(spec: &str) -> Rule {
    let p = parse(&format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: p\n{spec}"
    ));
    p[0].rules[0].clone()
}

fn knp_rule(spec: &str) -> Rule {
    let p = parse(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: n\n  namespace: prod\n{spec}"
    ));
    p[0].rules[0].clone()
}

fn k8s(k: &str) -> LabelKey {
    LabelKey {
        source: LabelSource::K8s,
        key: k.into(),
    }
}

fn any(k: &str) -> LabelKey {
    LabelKey::parse_selector_key(k)
}

fn ns(n: &str) -> Requirement {
    Requirement::equals(k8s("io.kubernetes.pod.namespace"), n)
}

fn exists(k: LabelKey) -> Requirement {
    Requirement::new(k, Operator::Exists, BTreeSet::new()).unwrap()
}

fn endpoints(reqs: Vec<Requirement>) -> Peer {
    Peer::Endpoints(Selector::new(reqs))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn cnp_subject_namespace_is_forced() {
    let r = cnp_rule(
        "spec:\n  endpointSelector:\n    matchLabels:\n      k8s:io.kubernetes.pod.namespace: other\n      app: web\n",
    );
    assert_eq!(
        r.subject,
        Selector::new(vec![Requirement::equals(any("app"), "web"), ns("prod")])
    );
}

#[test]
fn cnp_peer_namespacing() {
    let r = cnp_rule(
        "spec:\n  endpointSelector: {}\n  ingress:\n    - fromEndpoints:\n        - {}\n        - matchLabels: {io.kubernetes.pod.namespace: other}\n        - matchLabels: {io.cilium.k8s.namespace.labels.team: a}\n        - matchLabels: {reserved:host: ''}\n",
    );
    assert_eq!(
        r.ingress.allow[0].peers,
        Peers::List(vec![
            endpoints(vec![ns("prod")]),
            endpoints(vec![Requirement::equals(
                any("io.kubernetes.pod.namespace"),
                "other"
            )]),
            endpoints(vec![Requirement::equals(
                any("io.cilium.k8s.namespace.labels.team"),
                "a"
            )]),
            endpoints(vec![Requirement::equals(
                LabelKey {
                    source: LabelSource::Reserved,
                    key: "host".into()
                },
                ""
            )]),
        ])
    );
}

#[test]
fn ccnp_peers_get_any_pod() {
    let r = ccnp_rule(
        "spec:\n  endpointSelector: {matchLabels: {app: x}}\n  egress:\n    - toEndpoints: [{}, {matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}}]\n",
    );
    assert_eq!(
        r.subject,
        Selector::new(vec![Requirement::equals(any("app"), "x")])
    );
    assert_eq!(
        r.egress.allow[0].peers,
        Peers::List(vec![
            endpoints(vec![exists(k8s("io.kubernetes.pod.namespace"))]),
            endpoints(vec![ns("kube-system")]),
        ])
    );
}

#[test]
fn enforcement_per_direction() {
    let r = cnp_rule("spec:\n  endpointSelector: {}\n  ingress: []\n  egress: ~\n");
    assert_eq!(r.ingress.enforcement, Enforcement::None);
    assert_eq!(r.egress.enforcement, Enforcement::None);
    let r = cnp_rule("spec:\n  endpointSelector: {}\n  egressDeny: [{toEntities: [world]}]\n");
    assert_eq!(r.egress.enforcement, Enforcement::DefaultDeny);
    assert!(r.egress.allow.is_empty());
    let r = cnp_rule(
        "spec:\n  endpointSelector: {}\n  enableDefaultDeny: {ingress: false}\n  ingress: [{fromEntities: [all]}]\n  egress: [{}]\n",
    );
    assert_eq!(r.ingress.enforcement, Enforcement::NoDefaultDeny);
    assert_eq!(r.egress.enforcement, Enforcement::DefaultDeny);
}

#[test]
fn peers_any_list_and_empty() {
    let r = cnp_rule(
        "spec:\n  endpointSelector: {}\n  ingress:\n    - toPorts: [{ports: [{port: '80'}]}]\n    - fromEntities: []\n    - fromEntities: [world, remote-node]\n      fromCIDR: [192.0.2.1, '2001:db8::/32']\n      fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]\n",
    );
    let a = &r.ingress.allow;
    assert_eq!(a[0].peers, Peers::Any);
    assert_eq!(
        a[0].ports[0].ports,
        vec![PortProtocol {
            port: Port::Number(80),
            end_port: None,
            protocol: Protocol::Any
        }]
    );
    assert_eq!(a[1].peers, Peers::List(vec![]));
    assert!(a[1].allows_nothing());
    assert_eq!(
        a[2].peers,
        Peers::List(vec![
            Peer::Entity(Entity::World),
            Peer::Entity(Entity::RemoteNode),
            Peer::Cidr {
                cidr: net("192.0.2.1/32"),
                except: vec![]
            },
            Peer::Cidr {
                cidr: net("2001:db8::/32"),
                except: vec![]
            },
            Peer::Cidr {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.1.0.0/16")]
            },
        ])
    );
    assert_eq!(a[2].index, 2);
}

#[test]
fn ports_ranges_names_icmp() {
    let r = cnp_rule(
        "spec:\n  endpointSelector: {}\n  ingress:\n    - toPorts:\n        - ports: [{port: 8000, endPort: 8080, protocol: udp}, {port: http-alt, protocol: SCTP}, {port: '0'}]\n        - {}\n      icmps:\n        - fields: [{type: 8}, {type: EchoRequest, family: IPv6}]\n",
    );
    let pr = &r.ingress.allow[0].ports;
    assert_eq!(
        pr[0].ports,
        vec![
            PortProtocol {
                port: Port::Number(8000),
                end_port: Some(8080),
                protocol: Protocol::Udp
            },
            PortProtocol {
                port: Port::Named("http-alt".into()),
                end_port: None,
                protocol: Protocol::Sctp
            },
            PortProtocol {
                port: Port::Number(0),
                end_port: None,
                protocol: Protocol::Any
            },
        ]
    );
    // `ports` absent: one all-ports entry.
    assert_eq!(
        pr[1].ports,
        vec![PortProtocol {
            port: Port::Number(0),
            end_port: None,
            protocol: Protocol::Any
        }]
    );
    assert_eq!(
        r.ingress.allow[0].icmps,
        vec![
            IcmpRule {
                family: IpFamily::V4,
                icmp_type: 8
            },
            IcmpRule {
                family: IpFamily::V6,
                icmp_type: 128
            },
        ]
    );
}

#[test]
fn http_headers() {
    let r = cnp_rule(
        "spec:\n  endpointSelector: {}\n  ingress:\n    - toPorts:\n        - ports: [{port: '80', protocol: TCP}]\n          rules:\n            http:\n              - headers: ['X-Foo', 'X-Bar: baz', 'X-Empty:']\n                headerMatches: [{name: X-Token, value: abc, mismatch: LOG}]\n",
    );
    let Some(L7Rules::Http(h)) = &r.ingress.allow[0].ports[0].l7 else {
        panic!("no http")
    };
    let hm = |name: &str, value: Option<&str>, mismatch| HeaderMatch {
        name: name.into(),
        value: value.map(String::from),
        mismatch,
    };
    assert_eq!(
        h[0].headers,
        vec![
            hm("X-Foo", None, MismatchAction::Fail),
            hm("X-Bar", Some("baz"), MismatchAction::Fail),
            hm("X-Empty", Some(""), MismatchAction::Fail),
            hm("X-Token", Some("abc"), MismatchAction::Log),
        ]
    );
}

#[test]
fn description_labels_specs_list_metadata() {
    let text = "\
apiVersion: v1
kind: List
items:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: multi
      uid: 1234
      resourceVersion: '5'
      labels: {a: b}
      annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}'}
    specs:
      - endpointSelector: {}
        description: first
        labels: [{key: team, value: net, source: k8s}, 'unspec:x=y']
        ingress: [{}]
      - endpointSelector: {}
        egress: [{}]
    status: {ok: true}
";
    let p = parse(text);
    assert_eq!(p[0].name.namespace.as_deref(), Some("default"));
    assert_eq!(p[0].rules.len(), 2);
    let r0 = &p[0].rules[0];
    assert_eq!(r0.description.as_deref(), Some("first"));
    assert!(r0.labels.contains(&Label::k8s("team", "net")));
    assert!(
        r0.labels
            .contains(&Label::new(LabelSource::Unspec, "x", "y"))
    );
    assert!(r0.multi_spec);
    assert_eq!(p[0].rules[1].spec, 1);
}

#[test]
fn json_and_empty_documents() {
    let json = r#"{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"j","namespace":"x"},"spec":{"endpointSelector":{},"egress":[{"toEntities":["world-ipv4"]}]}}"#;
    let p = parse(json);
    assert_eq!(
        p[0].rules[0].egress.allow[0].peers,
        Peers::List(vec![Peer::Entity(Entity::WorldIpv4)])
    );
    assert!(parse("---\n# nothing\n---\n...\n").is_empty());
}

#[test]
fn knp_translation() {
    let r = knp_rule(
        "spec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from:\n        - podSelector: {matchLabels: {app: api}}\n        - namespaceSelector: {matchLabels: {team: a}}\n        - namespaceSelector: {}\n          podSelector: {matchLabels: {app: x}}\n        - namespaceSelector: {matchLabels: {team: b}}\n          podSelector: {}\n        - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.8/29]}\n      ports: [{port: 5432}, {port: metrics, protocol: UDP}, {port: 9000, endPort: 9100}]\n    - {}\n",
    );
    assert_eq!(
        r.subject,
        Selector::new(vec![Requirement::equals(any("app"), "db"), ns("prod")])
    );
    assert_eq!(r.ingress.enforcement, Enforcement::DefaultDeny);
    assert_eq!(r.egress.enforcement, Enforcement::None);
    let nsl = |k: &str| k8s(&format!("io.cilium.k8s.namespace.labels.{k}"));
    let a = &r.ingress.allow;
    assert_eq!(
        a[0].peers,
        Peers::List(vec![
            endpoints(vec![Requirement::equals(any("app"), "api"), ns("prod")]),
            endpoints(vec![Requirement::equals(nsl("team"), "a")]),
            endpoints(vec![
                Requirement::equals(any("app"), "x"),
                exists(k8s("io.kubernetes.pod.namespace"))
            ]),
            endpoints(vec![Requirement::equals(nsl("team"), "b")]),
            Peer::Cidr {
                cidr: net("203.0.113.0/24"),
                except: vec![net("203.0.113.8/29")]
            },
        ])
    );
    assert_eq!(
        a[0].ports[0].ports,
        vec![
            PortProtocol {
                port: Port::Number(5432),
                end_port: None,
                protocol: Protocol::Tcp
            },
            PortProtocol {
                port: Port::Named("metrics".into()),
                end_port: None,
                protocol: Protocol::Udp
            },
            PortProtocol {
                port: Port::Number(9000),
                end_port: Some(9100),
                protocol: Protocol::Tcp
            },
        ]
    );
    // An empty entry allows everything, world included.
    assert_eq!(a[1].peers, Peers::List(vec![Peer::Entity(Entity::All)]));
    assert!(a[1].is_l3_only());
}

#[test]
fn knp_policy_types() {
    let r = knp_rule("spec:\n  podSelector: {}\n  policyTypes: [Egress]\n");
    assert_eq!(r.ingress.enforcement, Enforcement::None);
    assert_eq!(r.egress.enforcement, Enforcement::DefaultDeny);
    assert!(r.egress.allow.is_empty());
    let r =
        knp_rule("spec:\n  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}]}]\n");
    assert_eq!(r.ingress.enforcement, Enforcement::DefaultDeny);
    assert_eq!(r.egress.enforcement, Enforcement::DefaultDeny);
    assert_eq!(r.egress.allow.len(), 1);
}
