//! Shared fixtures for Weir's benchmarks (the benchmarks themselves are under `benches/`).
//!
//! Everything here is deterministic: a seeded xorshift generator drives the choices, so two
//! runs (and two machines) measure the same cluster.
//!
//! The synthetic cluster:
//! - **Identities**: pods spread over `max(n / 100, 1)` namespaces `ns0…`, each pod with
//!   `app` (20 per namespace), `tier` (fixed by the app), `team` and `version` labels, built
//!   with [`pod_identity_labels`] and numbered by an [`InMemoryAllocator`]. Every 20th identity
//!   is a CIDR identity (`10.a.b.0/24`) instead of a pod. The number of namespaces grows with
//!   the cluster, so a namespaced label selector selects about the same number of identities at
//!   1k and at 10k identities — as in real clusters, where `app=api` does not grow with the
//!   cluster.
//! - **Policies**: YAML text parsed with [`parse_policies`] (the real path). Most are
//!   `CiliumNetworkPolicy` objects in `ns0`; about 80 % select the benchmarked endpoint
//!   (`ns0`, `app0`, tier `backend`, team `team0`). The mix: `fromEndpoints` with namespace and
//!   app labels or `matchExpressions`, `toPorts` with single ports and `endPort` ranges, L7 HTTP
//!   rules, `ingressDeny`/`egressDeny`, entities, `fromCIDRSet` with `except`, `toCIDR`, and a few
//!   clusterwide policies selecting by team.

use std::fmt::Write as _;

use weir_identity::{
    Identity, IdentityAllocator, InMemoryAllocator, LabelFilter, LabelSet, cidr_labels,
    pod_identity_labels,
};
use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, NamedPorts};
use weir_policy_model::{ParseErrors, Policy, parse_policies};

/// The cluster name every fixture uses.
pub const CLUSTER: &str = "default";

/// Apps per namespace.
const APPS: usize = 20;
/// Tiers; app `k` has tier `TIERS[k % 4]`, so `app0` is a backend.
const TIERS: [&str; 4] = ["backend", "frontend", "db", "cache"];
/// Common TCP service ports.
const PORTS: [u16; 10] = [80, 443, 8080, 8443, 9090, 5432, 6379, 3306, 9200, 27017];

/// A tiny xorshift64* generator: deterministic, good enough for picking fixtures.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced, xorshift cannot leave it).
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// One element of a non-empty slice (the first one for an empty slice is impossible, so
    /// callers pass constants).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        items.get(self.below(items.len())).copied()
    }
}

/// The number of namespaces of a cluster with `identities` identities.
pub fn namespaces(identities: usize) -> usize {
    (identities / 100).max(1)
}

/// Whether identity index `i` is a CIDR identity rather than a pod.
fn is_cidr_index(i: usize) -> bool {
    i % 20 == 19
}

/// The CIDR of CIDR identity index `i`: `10.a.b.0/24` with `a.b` = `i` in base 256.
fn cidr_of(i: usize) -> ipnet::IpNet {
    let a = ((i >> 8) & 0xff) as u8;
    let b = (i & 0xff) as u8;
    ipnet::IpNet::V4(
        ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, a, b, 0), 24)
            .unwrap_or_else(|_| ipnet::Ipv4Net::default()),
    )
}

/// The identity labels of pod number `i` in a cluster of `n` identities (see the crate docs).
pub fn pod_labels(i: usize, n: usize) -> LabelSet {
    let ns = i % namespaces(n);
    let j = i / namespaces(n);
    let app = j % APPS;
    let tier = TIERS[app % TIERS.len()];
    let team = format!("team{}", app % 5);
    let pod = [
        ("app", format!("app{app}")),
        ("tier", tier.to_string()),
        ("team", team),
        ("version", format!("v{}", j / APPS)),
    ];
    let ns_labels = [("kubernetes.io/metadata.name", format!("ns{ns}"))];
    pod_identity_labels(
        &format!("ns{ns}"),
        pod,
        ns_labels,
        "default",
        CLUSTER,
        &LabelFilter::default(),
    )
}

/// The labels of identity index `i` of a cluster of `n`: a pod, or every 20th a CIDR.
pub fn identity_labels(i: usize, n: usize) -> LabelSet {
    if is_cidr_index(i) {
        cidr_labels(cidr_of(i))
    } else {
        pod_labels(i, n)
    }
}

/// A synthetic cluster: allocated identities and the benchmarked endpoint.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The allocator that numbered the identities.
    pub allocator: InMemoryAllocator,
    /// Every identity with its labels, in generation order.
    pub identities: Vec<(Identity, LabelSet)>,
    /// The endpoint whose policy is compiled (pod 0: `ns0`, `app0`, `backend`, `team0`).
    pub endpoint: EndpointInfo,
}

/// Allocates `n` identities (see the crate docs).
pub fn cluster(n: usize) -> Cluster {
    let mut allocator = InMemoryAllocator::new();
    let mut identities = Vec::with_capacity(n);
    for i in 0..n {
        let labels = identity_labels(i, n);
        if let Ok(a) = allocator.allocate(&labels) {
            identities.push((a.identity, labels));
        }
    }
    let (identity, labels) = identities
        .first()
        .cloned()
        .unwrap_or((Identity::ANY, LabelSet::new()));
    Cluster {
        allocator,
        identities,
        endpoint: EndpointInfo {
            identity,
            labels,
            named_ports: NamedPorts::new(),
        },
    }
}

/// A namespaced app peer: `matchLabels` with the namespace and an app.
fn app_peer(out: &mut String, indent: &str, rng: &mut Rng, n_ns: usize) {
    let _ = write!(
        out,
        "{indent}- matchLabels:\n{indent}    k8s:io.kubernetes.pod.namespace: ns{}\n{indent}    app: app{}\n",
        rng.below(n_ns),
        rng.below(APPS)
    );
}

fn tcp_ports(out: &mut String, rng: &mut Rng, count: usize) {
    out.push_str("    toPorts:\n    - ports:\n");
    for _ in 0..count {
        let p = rng.pick(&PORTS).unwrap_or(80);
        let _ = writeln!(out, "      - port: \"{p}\"\n        protocol: TCP");
    }
}

/// One policy object's YAML (without the `---` separator).
fn policy_doc(out: &mut String, r: usize, rng: &mut Rng, n_ns: usize, octets: usize) {
    // Subject: ~80 % select the benchmarked endpoint (ns0/app0/backend/team0).
    let clusterwide = rng.below(100) < 5;
    if clusterwide {
        let _ = write!(
            out,
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: ccnp-{r}\nspec:\n  endpointSelector:\n    matchLabels:\n      team: team{}\n",
            rng.below(2) * 3
        );
    } else {
        let _ = write!(
            out,
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: cnp-{r}\n  namespace: ns0\nspec:\n  endpointSelector:\n"
        );
        match rng.below(10) {
            0..=2 => out.push_str("    {}\n"),
            3..=5 => out.push_str("    matchLabels:\n      app: app0\n"),
            6 | 7 => out.push_str("    matchLabels:\n      tier: backend\n"),
            _ => {
                let _ = writeln!(
                    out,
                    "    matchLabels:\n      app: app{}",
                    1 + rng.below(APPS - 1)
                );
            }
        }
    }
    let octet = rng.below(octets);
    match rng.below(100) {
        0..=34 => {
            out.push_str("  ingress:\n  - fromEndpoints:\n");
            for _ in 0..1 + rng.below(2) {
                app_peer(out, "    ", rng, n_ns);
            }
            let count = 1 + rng.below(2);
            tcp_ports(out, rng, count);
        }
        35..=44 => {
            let lo = 8000 + 100 * rng.below(10);
            let _ = write!(
                out,
                "  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        k8s:io.kubernetes.pod.namespace: ns{}\n      matchExpressions:\n      - key: app\n        operator: In\n        values: [app{}, app{}]\n      - key: tier\n        operator: NotIn\n        values: [db]\n    toPorts:\n    - ports:\n      - port: \"{lo}\"\n        endPort: {}\n        protocol: TCP\n",
                rng.below(n_ns),
                rng.below(APPS),
                rng.below(APPS),
                lo + 1 + rng.below(63)
            );
        }
        45..=54 => {
            out.push_str("  ingress:\n  - fromEndpoints:\n");
            app_peer(out, "    ", rng, n_ns);
            let v = rng.below(5);
            let _ = write!(
                out,
                "    toPorts:\n    - ports:\n      - port: \"{}\"\n        protocol: TCP\n      rules:\n        http:\n        - method: GET\n          path: /api/v{v}/.*\n        - method: POST\n          path: /api/v{v}/items\n          headers: [\"X-Team: team{}\"]\n",
                rng.pick(&[80u16, 8080]).unwrap_or(80),
                rng.below(5)
            );
        }
        55..=59 => {
            out.push_str("  ingressDeny:\n  - fromEndpoints:\n");
            app_peer(out, "    ", rng, n_ns);
            tcp_ports(out, rng, 1);
        }
        60..=64 => {
            let entities = rng
                .pick(&[
                    "[host, remote-node]",
                    "[world]",
                    "[cluster]",
                    "[kube-apiserver]",
                ])
                .unwrap_or("[host]");
            let _ = write!(
                out,
                "  ingress:\n  - fromEntities: {entities}\n    toPorts:\n    - ports:\n      - port: \"{}\"\n        protocol: TCP\n",
                rng.pick(&[9090u16, 10250]).unwrap_or(9090)
            );
        }
        65..=72 => {
            let _ = write!(
                out,
                "  ingress:\n  - fromCIDRSet:\n    - cidr: 10.{octet}.0.0/16\n      except: [10.{octet}.{}.0/24]\n    toPorts:\n    - ports:\n      - port: \"443\"\n        protocol: TCP\n",
                rng.below(256)
            );
        }
        73..=87 => {
            out.push_str("  egress:\n  - toEndpoints:\n");
            app_peer(out, "    ", rng, n_ns);
            tcp_ports(out, rng, 1);
        }
        88..=94 => {
            let _ = write!(
                out,
                "  egress:\n  - toCIDR: [10.{octet}.{}.0/24]\n    toPorts:\n    - ports:\n      - port: \"443\"\n        protocol: TCP\n",
                rng.below(256)
            );
        }
        _ => {
            let _ = write!(
                out,
                "  egressDeny:\n  - toCIDR: [10.{octet}.0.0/16]\n    toPorts:\n    - ports:\n      - port: \"22\"\n        protocol: TCP\n"
            );
        }
    }
}

/// The YAML text of `rules` policy objects (one rule each) for a cluster of `identities`
/// identities, seeded by `seed`.
pub fn policy_yaml(rules: usize, identities: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let n_ns = namespaces(identities);
    // CIDR identities use second octets 0..=(identities >> 8); rules aim at the same range.
    let octets = (identities >> 8) + 1;
    let mut out = String::with_capacity(rules * 400);
    for r in 0..rules {
        out.push_str("---\n");
        policy_doc(&mut out, r, &mut rng, n_ns, octets);
    }
    out
}

/// The policies of [`policy_yaml`], parsed.
pub fn policies(rules: usize, identities: usize, seed: u64) -> Result<Vec<Policy>, ParseErrors> {
    parse_policies("bench.yaml", &policy_yaml(rules, identities, seed))
}

/// A compiler loaded with `rules` policies and the identities of a cluster of `identities`.
pub fn loaded_compiler(
    rules: usize,
    identities: usize,
    seed: u64,
) -> Result<(Compiler, Cluster), ParseErrors> {
    let mut compiler = Compiler::new(CompilerConfig {
        cluster_name: CLUSTER.to_string(),
        ..CompilerConfig::default()
    });
    for p in policies(rules, identities, seed)? {
        compiler.upsert_policy(p);
    }
    let c = cluster(identities);
    for (id, labels) in &c.identities {
        compiler.upsert_identity(*id, labels.clone(), NamedPorts::new());
    }
    Ok((compiler, c))
}

/// The value at percentile `p` (0–100) of sorted samples, nearest rank; 0 when empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or_default()
}

/// The median of unsorted samples (sorts them).
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    percentile(samples, 50.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_policies_parse() {
        let p = match policies(300, 1000, 1) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(p.len(), 300);
    }

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(policy_yaml(50, 1000, 7), policy_yaml(50, 1000, 7));
        assert_ne!(policy_yaml(50, 1000, 7), policy_yaml(50, 1000, 8));
    }

    #[test]
    fn identities_are_distinct_and_endpoint_is_selected() {
        let c = cluster(1000);
        assert_eq!(c.identities.len(), 1000);
        let (compiler, c) = match loaded_compiler(300, 1000, 1) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        let policy = compiler.compile(&c.endpoint);
        assert!(policy.ingress_enforced);
        assert!(policy.map_state.len() > 100, "{}", policy.map_state.len());
    }

    #[test]
    fn percentiles() {
        let v = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(percentile(&v, 50.0), 5);
        assert_eq!(percentile(&v, 99.0), 10);
        assert_eq!(percentile(&v, 0.0), 1);
        let e: [u32; 0] = [];
        assert_eq!(percentile(&e, 99.0), 0);
    }
}
