//! Embedding Weir's policy core in another CNI: parse a `CiliumNetworkPolicy`, allocate
//! identities for two pods, compile the server's policy map and ask it about two flows.
//!
//! Run with `cargo run -p weir-policy-compiler --example embed`.

use weir_identity::{IdentityAllocator, InMemoryAllocator, LabelFilter, pod_identity_labels};
use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, Flow, NamedPorts, proto};
use weir_policy_model::{Direction, parse_policies};

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api-from-web
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      app: api
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: web
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Policies: the same YAML users give Cilium; errors name file, line, column and field.
    let policies = parse_policies("api-from-web.yaml", POLICY)?;

    // 2. Identities: a pod's identity is its (filtered) labels plus namespace and cluster.
    let mut allocator = InMemoryAllocator::new();
    let labels = |app: &str| {
        pod_identity_labels(
            "shop",
            [("app", app)],
            [("kubernetes.io/metadata.name", "shop")],
            "default",
            "default",
            &LabelFilter::default(),
        )
    };
    let (web_labels, api_labels) = (labels("web"), labels("api"));
    let web = allocator.allocate(&web_labels)?.identity;
    let api = allocator.allocate(&api_labels)?.identity;

    // 3. The compiler knows every policy and every identity in the cluster.
    let mut compiler = Compiler::new(CompilerConfig::default());
    for p in policies {
        compiler.upsert_policy(p);
    }
    compiler.upsert_identity(web, web_labels, NamedPorts::new());
    compiler.upsert_identity(api, api_labels.clone(), NamedPorts::new());

    // 4. Compile the server's map: these are the entries to write into its BPF policy map.
    let server = EndpointInfo {
        identity: api,
        labels: api_labels,
        named_ports: NamedPorts::new(),
    };
    let policy = compiler.compile(&server);
    println!(
        "policy map of api (identity {api}): {} entries",
        policy.map_state.len()
    );
    for (key, entry) in policy.map_state.iter() {
        // Identity 0 is the wildcard; prefix 0 means any protocol and port, 24 one port.
        println!(
            "  {:?} remote={} proto={} port={}/{} -> {:?}",
            key.direction, key.identity, key.protocol, key.port, key.prefix_len, entry.action
        );
    }

    // 5. Decide flows exactly as the datapath would, with the rules behind each verdict.
    for (what, port) in [("web -> api:8080/TCP", 8080), ("web -> api:22/TCP", 22)] {
        let flow = Flow {
            direction: Direction::Ingress,
            remote: web,
            protocol: proto::TCP,
            port,
        };
        println!("{what}: {}", policy.decide(&flow));
    }
    Ok(())
}
