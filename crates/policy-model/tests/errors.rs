//! Exact error messages, with line and column, for bad inputs.

use weir_policy_model::parse_policies;

/// A CNP header followed by `spec` lines (which start at line 6).
fn cnp(spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n  namespace: ns\n{spec}"
    )
}

fn err(text: &str) -> String {
    match parse_policies("api.yaml", text) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e.to_string(),
    }
}

fn ingress_port(port: &str) -> String {
    cnp(&format!(
        "spec:\n  endpointSelector: {{}}\n  ingress:\n    - toPorts:\n        - ports:\n            - port: {port}\n"
    ))
}

#[test]
fn bad_port_number() {
    assert_eq!(
        err(&ingress_port("'80800'")),
        "api.yaml:11:21: spec.ingress[0].toPorts[0].ports[0].port: \"80800\" is not a port number or name"
    );
    assert_eq!(
        err(&ingress_port("-1")),
        "api.yaml:11:21: spec.ingress[0].toPorts[0].ports[0].port: \"-1\" is not a port number or name"
    );
    assert_eq!(
        err(&ingress_port("Http_2")),
        "api.yaml:11:21: spec.ingress[0].toPorts[0].ports[0].port: \"Http_2\" is not a port number or name"
    );
}

#[test]
fn unknown_and_unsupported_fields() {
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  egress:\n    - toServices:\n        - k8sService: {serviceName: x}\n      toPort: []\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:9:7: spec.egress[0].toServices: is not supported by Weir\n\
         api.yaml:11:7: spec.egress[0].toPort: unknown field"
    );
    let text = cnp("spec:\n  nodeSelector: {}\n");
    assert_eq!(
        err(&text),
        "api.yaml:7:3: spec.nodeSelector: is not supported by Weir (host policies)"
    );
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n    - toPorts:\n        - ports: [{port: '80', protocol: TCP}]\n          rules:\n            kafka: []\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:12:13: spec.ingress[0].toPorts[0].rules.kafka: is not supported by Weir"
    );
}

#[test]
fn wrong_types() {
    let text = cnp("spec:\n  endpointSelector: {}\n  ingress: everything\n");
    assert_eq!(
        err(&text),
        "api.yaml:8:12: spec.ingress: expected a list, found a string"
    );
    let text = cnp("spec:\n  endpointSelector:\n    matchLabels:\n      version: 2\n");
    assert_eq!(
        err(&text),
        "api.yaml:9:16: spec.endpointSelector.matchLabels.version: expected a string, found a number"
    );
}

#[test]
fn port_ranges_and_protocols() {
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n    - toPorts:\n        - ports:\n            - {port: '8080', endPort: 80, protocol: tcpp}\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:11:39: spec.ingress[0].toPorts[0].ports[0].endPort: endPort 80 is less than port 8080\n\
         api.yaml:11:53: spec.ingress[0].toPorts[0].ports[0].protocol: \"tcpp\" is not a protocol (expected TCP, UDP, SCTP or ANY)"
    );
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n    - toPorts:\n        - ports:\n            - {port: http, endPort: 90}\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:11:37: spec.ingress[0].toPorts[0].ports[0].endPort: endPort cannot be used with a named port"
    );
}

#[test]
fn cidrs() {
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  egress:\n    - toCIDR: [10.0.0.0/33]\n    - toCIDRSet:\n        - cidr: 10.0.0.0/16\n          except: [10.1.0.0/24]\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:9:16: spec.egress[0].toCIDR[0]: \"10.0.0.0/33\" is not a CIDR prefix or IP address\n\
         api.yaml:12:20: spec.egress[1].toCIDRSet[0].except[0]: except 10.1.0.0/24 is not inside cidr 10.0.0.0/16"
    );
}

#[test]
fn l7_placement() {
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  ingressDeny:\n    - toPorts:\n        - ports: [{port: '80', protocol: TCP}]\n          rules:\n            http: [{}]\n  egressDeny:\n    - toFQDNs: [{matchName: a.com}]\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:12:13: spec.ingressDeny[0].toPorts[0].rules: L7 rules are not allowed in a deny rule\n\
         api.yaml:14:16: spec.egressDeny[0].toFQDNs: toFQDNs is not allowed in a deny rule"
    );
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n    - toPorts:\n        - ports: [{port: '53', protocol: UDP}]\n          rules:\n            dns: [{matchPattern: '*'}]\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:12:13: spec.ingress[0].toPorts[0].rules: DNS rules are not allowed on ingress"
    );
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  egress:\n    - toPorts:\n        - ports: [{port: '53'}]\n          rules:\n            dns: [{matchPattern: '*'}]\n            http: [{}]\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:12:13: spec.egress[0].toPorts[0].rules: only one kind of L7 rule (http or dns) is allowed per port rule"
    );
    let text = cnp(
        "spec:\n  endpointSelector: {}\n  egress:\n    - toEndpoints: [{}]\n      toFQDNs: [{matchName: a.com}]\n    - toPorts:\n        - rules:\n            http: [{path: '/a('}]\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:10:16: spec.egress[0].toFQDNs: toFQDNs cannot be combined with toEndpoints in the same rule\n\
         api.yaml:13:13: spec.egress[1].toPorts[0].rules: L7 rules need at least one port in `ports`\n\
         api.yaml:13:27: spec.egress[1].toPorts[0].rules.http[0].path: \"/a(\": invalid regex: unclosed group"
    );
}

#[test]
fn dns_names_and_selectors() {
    let text = cnp(
        "spec:\n  endpointSelector:\n    matchExpressions:\n      - {key: app, operator: In}\n      - {key: x, operator: Exists, values: [a]}\n      - {key: y, operator: Has}\n  egress:\n    - toFQDNs: [{matchName: 'bad name.com'}]\n",
    );
    assert_eq!(
        err(&text),
        "api.yaml:9:9: spec.endpointSelector.matchExpressions[0]: operator In needs at least one value\n\
         api.yaml:10:9: spec.endpointSelector.matchExpressions[1]: operator Exists takes no values\n\
         api.yaml:11:28: spec.endpointSelector.matchExpressions[2].operator: \"Has\" is not a selector operator (expected In, NotIn, Exists or DoesNotExist)\n\
         api.yaml:13:29: spec.egress[0].toFQDNs[0].matchName: \"bad name.com\": invalid character ' ' in DNS name"
    );
}

#[test]
fn too_many_ports() {
    let ports: Vec<String> = (1..=41).map(|p| format!("{{port: '{p}'}}")).collect();
    let text = cnp(&format!(
        "spec:\n  endpointSelector: {{}}\n  ingress:\n    - toPorts:\n        - ports: [{}]\n",
        ports.join(", ")
    ));
    assert_eq!(
        err(&text),
        "api.yaml:10:18: spec.ingress[0].toPorts[0].ports: 41 ports in one port rule; at most 40 are allowed"
    );
}

#[test]
fn document_level() {
    assert_eq!(
        err("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"),
        "api.yaml:2:7: kind: unsupported kind \"ConfigMap\" (expected CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy or List)"
    );
    assert_eq!(
        err(
            "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {namespace: x}\nspec: {endpointSelector: {}}\n"
        ),
        "api.yaml:1:13: apiVersion: apiVersion \"cilium.io/v1\" is not supported for CiliumNetworkPolicy (expected \"cilium.io/v2\")\n\
         api.yaml:3:11: metadata.name: required field is missing"
    );
    assert_eq!(
        err(&cnp(
            "spec:\n  endpointSelector: {}\n  endpointSelector: {}\n"
        )),
        "api.yaml:8:3: spec.endpointSelector: duplicate key \"endpointSelector\""
    );
    assert_eq!(
        err(&cnp("spec:\n  ingress: [{}]\n")),
        "api.yaml:7:3: spec: one of endpointSelector or nodeSelector is required"
    );
    assert_eq!(
        err("a: [1\n"),
        "api.yaml:2:1: while parsing a flow sequence, expected ',' or ']'"
    );
}

#[test]
fn network_policy_errors() {
    let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Sideways]\n  ingress:\n    - from:\n        - ipBlock: {cidr: 10.0.0.0/8}\n          podSelector: {}\n        - {}\n      ports:\n        - {port: 99999, protocol: ICMP}\n";
    assert_eq!(
        err(text),
        "api.yaml:6:26: spec.policyTypes[1]: \"Sideways\" is not a policy type (expected Ingress or Egress)\n\
         api.yaml:9:20: spec.ingress[0].from[0].ipBlock: ipBlock cannot be combined with podSelector or namespaceSelector\n\
         api.yaml:11:11: spec.ingress[0].from[1]: a peer needs podSelector, namespaceSelector or ipBlock\n\
         api.yaml:13:18: spec.ingress[0].ports[0].port: \"99999\" is not a port number or name\n\
         api.yaml:13:35: spec.ingress[0].ports[0].protocol: \"ICMP\" is not a protocol (expected TCP, UDP or SCTP)"
    );
}
