//! Every policy of the seed article parses (or is rejected exactly as Cilium rejects it).

use std::collections::BTreeSet;

use weir_identity::{LabelKey, LabelSource, Operator, Requirement, Selector};
use weir_l7_match::{DnsRule, HttpRule};
use weir_policy_model::{
    Enforcement, Entity, L7Rules, Peer, Peers, Policy, PolicyKind, Port, PortProtocol, Protocol,
    load_paths, parse_policies,
};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/seed");

fn load(name: &str) -> Vec<Policy> {
    let path = format!("{DIR}/{name}");
    let text = std::fs::read_to_string(&path).expect("fixture");
    parse_policies(name, &text).unwrap_or_else(|e| panic!("{e}"))
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

fn tcp(port: u16) -> PortProtocol {
    PortProtocol {
        port: Port::Number(port),
        end_port: None,
        protocol: Protocol::Tcp,
    }
}

#[test]
fn deny_all_ingress() {
    let p = load("deny-all.yaml");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].name.to_string(), "production/deny-all-ingress");
    let r = &p[0].rules[0];
    assert_eq!(r.subject, Selector::new(vec![ns("production")]));
    assert_eq!(r.ingress.enforcement, Enforcement::DefaultDeny);
    assert_eq!(r.egress.enforcement, Enforcement::None);
    assert_eq!(r.ingress.allow.len(), 1);
    assert_eq!(r.ingress.allow[0].peers, Peers::Any);
    assert!(r.ingress.allow[0].allows_nothing());
}

#[test]
fn frontend_to_backend() {
    let p = load("allow-frontend-to-backend.yaml");
    let r = &p[0].rules[0];
    assert_eq!(
        r.subject,
        Selector::new(vec![
            Requirement::equals(any("app"), "backend"),
            ns("production")
        ])
    );
    let a = &r.ingress.allow[0];
    assert_eq!(
        a.peers,
        Peers::List(vec![Peer::Endpoints(Selector::new(vec![
            Requirement::equals(any("app"), "frontend"),
            ns("production"),
        ]))])
    );
    assert_eq!(a.ports[0].ports, vec![tcp(8080)]);
    assert!(a.ports[0].l7.is_none());
}

#[test]
fn l7_http_and_grpc() {
    let p = load("l7-http-policy.yaml");
    let port = &p[0].rules[0].ingress.allow[0].ports[0];
    let Some(L7Rules::Http(rules)) = &port.l7 else {
        panic!("no http rules")
    };
    assert_eq!(rules.len(), 3);
    assert_eq!(
        rules[2],
        HttpRule {
            method: Some("GET".into()),
            path: Some("/api/users/[0-9]+".into()),
            ..HttpRule::default()
        }
    );
    let g = load("l7-grpc-policy.yaml");
    let port = &g[0].rules[0].ingress.allow[0].ports[0];
    assert_eq!(port.ports, vec![tcp(50051)]);
    let Some(L7Rules::Http(rules)) = &port.l7 else {
        panic!("no http rules")
    };
    assert_eq!(
        rules[1].path.as_deref(),
        Some("/mypackage.MyService/CreateItem")
    );
}

#[test]
fn dns_policy() {
    let p = load("dns-policy.yaml");
    let r = &p[0].rules[0];
    assert_eq!(r.ingress.enforcement, Enforcement::None);
    assert_eq!(r.egress.enforcement, Enforcement::DefaultDeny);
    assert_eq!(
        r.egress.allow[0].peers,
        Peers::List(vec![
            Peer::Fqdn(DnsRule::MatchName("api.stripe.com".into())),
            Peer::Fqdn(DnsRule::MatchName("api.github.com".into())),
            Peer::Fqdn(DnsRule::MatchPattern("*.amazonaws.com".into())),
        ])
    );
    // The peer names kube-system itself, so the policy namespace is not added.
    assert_eq!(
        r.egress.allow[1].peers,
        Peers::List(vec![Peer::Endpoints(Selector::new(vec![
            Requirement::equals(any("k8s-app"), "kube-dns"),
            ns("kube-system"),
        ]))])
    );
    let port = &r.egress.allow[1].ports[0];
    assert_eq!(port.ports[0].protocol, Protocol::Udp);
    assert_eq!(
        port.l7,
        Some(L7Rules::Dns(vec![DnsRule::MatchPattern("*".into())]))
    );
}

#[test]
fn microservices_rejects_http_on_any_like_cilium() {
    let text = std::fs::read_to_string(format!("{DIR}/microservice-policies.yaml")).unwrap();
    let e = parse_policies("microservice-policies.yaml", &text).unwrap_err();
    assert_eq!(
        e.to_string(),
        "microservice-policies.yaml:38:15: spec.egress[0].toPorts[0].ports[0]: \
         HTTP rules need protocol TCP, not ANY (an omitted protocol means ANY)\n\
         microservice-policies.yaml:51:15: spec.egress[1].toPorts[0].ports[0]: \
         HTTP rules need protocol TCP, not ANY (an omitted protocol means ANY)"
    );
    // With the protocol written out, all three documents parse.
    let fixed = text.replace(
        "            - port: '8081'\n",
        "            - port: '8081'\n              protocol: TCP\n",
    );
    let fixed = fixed.replace(
        "            - port: '8082'\n",
        "            - port: '8082'\n              protocol: TCP\n",
    );
    let p = parse_policies("m.yaml", &fixed).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = p.iter().map(|p| p.name.to_string()).collect();
    assert_eq!(
        names,
        [
            "production/frontend-egress",
            "production/api-gateway-egress",
            "production/backend-to-db"
        ]
    );
    // Omitted protocol is ANY on an L4-only rule.
    let fe = &p[0].rules[0].egress.allow[0].ports[0].ports[0];
    assert_eq!(fe.protocol, Protocol::Any);
    assert_eq!(p[0].location.line, 4);
    assert_eq!(p[1].rules[0].egress.allow[1].index, 1);
}

#[test]
fn cluster_wide() {
    let p = load("cluster-wide-deny-external.yaml");
    assert_eq!(p[0].name.kind, PolicyKind::CiliumClusterwideNetworkPolicy);
    assert_eq!(p[0].name.namespace, None);
    let r = &p[0].rules[0];
    // Not namespaced: the subject is taken literally.
    assert_eq!(
        r.subject,
        Selector::new(vec![
            Requirement::new(
                any("io.kubernetes.pod.namespace"),
                Operator::NotIn,
                BTreeSet::from(["kube-system".into(), "ingress-nginx".into()]),
            )
            .unwrap()
        ])
    );
    assert_eq!(
        r.egress.allow[0].peers,
        Peers::List(vec![Peer::Entity(Entity::Cluster)])
    );
    assert_eq!(
        r.egress.allow[1].peers,
        Peers::List(vec![Peer::Endpoints(Selector::new(vec![ns(
            "kube-system"
        )]))])
    );
}

#[test]
fn load_directory_collects_errors_from_every_file() {
    let e = load_paths(&[DIR]).unwrap_err();
    assert_eq!(e.0.len(), 2, "{e}");
    assert!(e.0[0].location.file.ends_with("microservice-policies.yaml"));
    let missing = load_paths(&["/nonexistent/weir.yaml"]).unwrap_err();
    assert!(
        missing.to_string().starts_with("/nonexistent/weir.yaml: "),
        "{missing}"
    );
}
