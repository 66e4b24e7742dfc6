//! Runs the DNS proxy in front of one upstream server, with the seed's DNS policy and
//! `toFQDNs` selectors, for benchmarks (`bench/dns-proxy.sh`) and manual checks.
//!
//! ```text
//! dns-forward LISTEN UPSTREAM [CLIENT_NET_IP ...]
//! ```
//!
//! Every query from a listed client address (default 127.0.0.1) is decided as if it came from
//! the seed's `backend` pod and was addressed to kube-dns at `UPSTREAM`; allowed answers whose
//! names the selectors select are learned into an in-memory table standing in for the
//! datapath, then recorded in the name cache, as in the agent. Env `WORKERS` sets the tokio
//! worker threads (default 1, a current-thread runtime: dnsmasq is single-threaded too;
//! `RUNTIME=multi` takes a one-worker multi-thread runtime instead). Prints the proxy's
//! counters on SIGINT/SIGTERM.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use weir_dns_proxy::{
    CacheConfig, DnsLearner, DnsNullSink, DnsPolicySnapshot, DnsPolicyStore, DnsProxy,
    DnsProxyConfig, DnsUdpSocket, EndpointId, LearnFuture, Learned, NameCache, StaticIdentities,
};
use weir_identity::{Identity, LabelFilter, pod_identity_labels};
use weir_l7_match::DnsRule;
use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, L7Policy, NamedPorts};
use weir_policy_model::parse_policies;

const BACKEND: Identity = Identity(1000);
const KUBE_DNS: Identity = Identity(1002);

/// Stands in for the agent's learner: one locked map update per learned IP.
#[derive(Default)]
struct TableLearner {
    table: Mutex<HashMap<IpAddr, HashSet<DnsRule>>>,
}

impl DnsLearner for TableLearner {
    fn learn<'a>(&'a self, learned: &'a Learned) -> LearnFuture<'a> {
        if let Ok(mut t) = self.table.lock() {
            for ip in &learned.ips {
                let known = t.entry(ip.ip).or_default();
                for sel in &learned.selectors {
                    if !known.contains(sel) {
                        known.insert(sel.clone());
                    }
                }
            }
        }
        Box::pin(async { Ok(()) })
    }
}

/// The seed's `allow-external-apis` DNS part: UDP 53 to kube-dns with name rules, and the
/// `toFQDNs` selectors.
fn seed_policy(port: u16) -> Result<L7Policy, String> {
    let yaml = format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: allow-external-apis, namespace: production}}
spec:
  endpointSelector: {{matchLabels: {{app: backend}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}}}]
    toPorts:
    - ports: [{{port: '{port}', protocol: UDP}}]
      rules:
        dns:
        - matchName: api.stripe.com
        - matchName: api.github.com
        - matchPattern: '*.amazonaws.com'
        - matchPattern: '*.local'
"
    );
    let filter = LabelFilter::default();
    let backend = pod_identity_labels(
        "production",
        [("app", "backend")],
        [("k", "v")],
        "default",
        "default",
        &filter,
    );
    let dns = pod_identity_labels(
        "kube-system",
        [("k8s-app", "kube-dns")],
        [("k", "v")],
        "default",
        "default",
        &filter,
    );
    let mut c = Compiler::new(CompilerConfig::default());
    c.upsert_identity(BACKEND, backend.clone(), NamedPorts::new());
    c.upsert_identity(KUBE_DNS, dns, NamedPorts::new());
    for p in parse_policies("seed.yaml", &yaml).map_err(|e| format!("{e:?}"))? {
        c.upsert_policy(p);
    }
    Ok(c.compile(&EndpointInfo {
        identity: BACKEND,
        labels: backend,
        named_ports: NamedPorts::new(),
    })
    .l7)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("dns-forward: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        return Err("usage: dns-forward LISTEN UPSTREAM [CLIENT_IP ...]".into());
    };
    let listen: SocketAddr = listen.parse().map_err(|e| format!("{listen}: {e}"))?;
    let upstream: SocketAddr = upstream.parse().map_err(|e| format!("{upstream}: {e}"))?;
    let mut clients: Vec<IpAddr> = args
        .iter()
        .skip(2)
        .map(|a| a.parse().map_err(|e| format!("{a}: {e}")))
        .collect::<Result<_, _>>()?;
    if clients.is_empty() {
        clients.push(IpAddr::from([127, 0, 0, 1]));
    }
    let workers = std::env::var("WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1usize);
    let snapshot = DnsPolicySnapshot::empty()
        .with_endpoint(EndpointId(9), Arc::new(seed_policy(upstream.port())?))
        .with_fqdn_selectors(vec![
            DnsRule::MatchName("api.stripe.com".into()),
            DnsRule::MatchName("api.github.com".into()),
            DnsRule::MatchPattern("*.amazonaws.com".into()),
        ])
        .map_err(|e| e.to_string())?;
    let identities = StaticIdentities {
        identities: HashMap::from([(upstream.ip(), KUBE_DNS)]),
        endpoints: clients.iter().map(|c| (*c, EndpointId(9))).collect(),
    };
    // One worker: a current-thread runtime, everything on one thread as in dnsmasq (no
    // cross-thread wake-ups); more: a multi-thread runtime.
    let rt = if workers <= 1 && std::env::var("RUNTIME").as_deref() != Ok("multi") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .enable_all()
            .build()
    }
    .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let proxy = DnsProxy::new(
            DnsProxyConfig::default(),
            Arc::new(DnsPolicyStore::new(snapshot)),
            Arc::new(identities),
            Arc::new(TableLearner::default()),
            Arc::new(NameCache::new(CacheConfig::default())),
            Arc::new(DnsNullSink),
        );
        let sock = DnsUdpSocket::bind_fixed(listen, upstream)
            .await
            .map_err(|e| format!("bind {listen}: {e}"))?;
        let p = proxy.clone();
        let server = tokio::spawn(async move { p.serve_udp(sock).await });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            r = server => return Err(format!("server ended: {r:?}")),
        }
        println!("{:?}", proxy.stats());
        Ok(())
    })
}
