//! A compiled L7 policy for the L7 proxy's fuzz targets: the seed's `api-l7-policy` plus rules
//! with hosts, required headers and every `headerMatches` mismatch action, so the fuzzer
//! reaches each part of the decision.
#![allow(dead_code)]

use std::sync::Arc;

use weir_identity::{Identity, LabelFilter, pod_identity_labels};
use weir_l7_proxy::{EndpointId, PolicySnapshot};
use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, NamedPorts};

pub const FRONTEND: Identity = Identity(1000);
pub const API: Identity = Identity(1001);
pub const ENDPOINT: EndpointId = EndpointId(7);

/// The policy's rules on `port`, as YAML.
pub fn policy_yaml(port: u16) -> String {
    format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fuzz-l7, namespace: production}}
spec:
  endpointSelector: {{matchLabels: {{app: api-server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: frontend}}}}]
    toPorts:
    - ports: [{{port: '{port}', protocol: TCP}}]
      rules:
        http:
        - method: GET
          path: '/api/products'
        - method: POST
          path: '/api/orders'
        - method: GET
          path: '/api/users/[0-9]+'
        - method: 'PUT|PATCH'
          path: '/v[12]/.*'
          host: '(www\\.)?example\\.com(:[0-9]+)?'
        - path: '/h'
          headers: ['X-Token: a', 'X-Present']
        - path: '/m.*'
          headerMatches:
          - {{name: X-Add, value: added, mismatch: ADD}}
          - {{name: X-Replace, value: replaced, mismatch: REPLACE}}
          - {{name: X-Delete, value: kept, mismatch: DELETE}}
          - {{name: X-Log, value: logged, mismatch: LOG}}
          - {{name: X-Fail, value: needed}}
"
    )
}

/// A snapshot with the fuzz policy for [`ENDPOINT`] on `port`; `None` if it does not compile
/// (which would be a bug in the target, reported by the caller).
pub fn snapshot(port: u16) -> Option<PolicySnapshot> {
    let filter = LabelFilter::default();
    let labels = |app: &str| {
        pod_identity_labels(
            "production",
            [("app", app)],
            [("env", "prod")],
            "default",
            "default",
            &filter,
        )
    };
    let mut c = Compiler::new(CompilerConfig::default());
    c.upsert_identity(FRONTEND, labels("frontend"), NamedPorts::new());
    c.upsert_identity(API, labels("api-server"), NamedPorts::new());
    for p in weir_policy_model::parse_policies("fuzz.yaml", &policy_yaml(port)).ok()? {
        c.upsert_policy(p);
    }
    let l7 = c
        .compile(&EndpointInfo {
            identity: API,
            labels: labels("api-server"),
            named_ports: NamedPorts::new(),
        })
        .l7;
    Some(PolicySnapshot::empty().with_endpoint(ENDPOINT, Arc::new(l7)))
}
