//! Runs the L7 proxy in front of one backend with a real `rules.http` policy, for benchmarks
//! (`bench/l7-proxy.sh`) and manual checks.
//!
//! ```text
//! http-forward LISTEN BACKEND RULES [CLIENT_IP ...]
//! ```
//!
//! Every connection accepted on `LISTEN` is treated as an ingress connection from the
//! `client` pod (any listed client address, default 127.0.0.1) to the `backend` pod at
//! `BACKEND`, whose policy has `RULES` HTTP rules on `BACKEND`'s port: `RULES - 1` rules that
//! do not match `GET /` (mixed methods, path regexes, hosts and headers) and last the rule
//! that allows `GET /`, so every allowed request is decided against all of them. The
//! original destination is fixed (`StaticDestination`): this measures the proxy itself; the
//! datapath's redirect, which only changes how the connection reaches the listener, is not
//! involved. Records go to a bounded channel drained by a task, as `observe` would read
//! them. Env `WORKERS` sets the tokio worker threads (default 1: one thread running tokio's
//! single-threaded scheduler, like one nginx worker).
//! Prints the number of records on SIGINT/SIGTERM.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;
use weir_identity::{Identity, LabelFilter, pod_identity_labels};
use weir_l7_proxy::{
    ChannelSink, EndpointId, L7Proxy, PolicySnapshot, PolicyStore, ProxyConfig, StaticDestination,
    StaticIdentities,
};
use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, L7Policy, NamedPorts};
use weir_policy_model::{Direction, parse_policies};

const CLIENT: Identity = Identity(1000);
const BACKEND: Identity = Identity(1001);
const ENDPOINT: EndpointId = EndpointId(7);

/// Rule `i` of the filler rules: none of them admits `GET /`.
fn filler_rule(i: usize) -> String {
    match i % 4 {
        0 => format!("        - method: GET\n          path: '/api/v1/items-{i}/[0-9]+'\n"),
        1 => format!("        - method: 'POST|PUT'\n          path: '/api/v1/orders-{i}(/.*)?'\n"),
        2 => format!(
            "        - method: GET\n          path: '/'\n          host: 'svc-{i}\\.example\\.com'\n"
        ),
        _ => format!(
            "        - path: '/'\n          headers: ['X-Tenant-{i}: t{i}']\n          method: GET\n"
        ),
    }
}

/// A policy for the backend pod with `rules` HTTP rules on `port`, the last allowing `GET /`.
fn policy(port: u16, rules: usize) -> Result<L7Policy, String> {
    let mut yaml = format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-l7, namespace: production}}
spec:
  endpointSelector: {{matchLabels: {{app: backend}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: '{port}', protocol: TCP}}]
      rules:
        http:
"
    );
    for i in 0..rules.saturating_sub(1) {
        yaml.push_str(&filler_rule(i));
    }
    let _ = writeln!(yaml, "        - method: GET\n          path: '/'");
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
    c.upsert_identity(CLIENT, labels("client"), NamedPorts::new());
    c.upsert_identity(BACKEND, labels("backend"), NamedPorts::new());
    for p in parse_policies("bench.yaml", &yaml).map_err(|e| format!("{e:?}"))? {
        c.upsert_policy(p);
    }
    Ok(c.compile(&EndpointInfo {
        identity: BACKEND,
        labels: labels("backend"),
        named_ports: NamedPorts::new(),
    })
    .l7)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("http-forward: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(backend), Some(rules)) = (args.first(), args.get(1), args.get(2))
    else {
        return Err("usage: http-forward LISTEN BACKEND RULES [CLIENT_IP ...]".into());
    };
    let listen: SocketAddr = listen.parse().map_err(|e| format!("{listen}: {e}"))?;
    let backend: SocketAddr = backend.parse().map_err(|e| format!("{backend}: {e}"))?;
    let rules: usize = rules.parse().map_err(|e| format!("{rules}: {e}"))?;
    let mut clients: Vec<IpAddr> = args
        .iter()
        .skip(3)
        .map(|a| a.parse().map_err(|e| format!("{a}: {e}")))
        .collect::<Result<_, _>>()?;
    if clients.is_empty() {
        clients.push(IpAddr::from([127, 0, 0, 1]));
    }
    let workers = std::env::var("WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1usize);
    let snapshot = PolicySnapshot::empty()
        .with_endpoint(ENDPOINT, Arc::new(policy(backend.port(), rules.max(1))?));
    let identities = StaticIdentities {
        identities: clients.iter().map(|c| (*c, CLIENT)).collect(),
        endpoints: HashMap::from([(backend.ip(), ENDPOINT)]),
    };
    // One worker: tokio's single-threaded scheduler, one event loop like an nginx worker.
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let rt = builder.enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let (sink, mut records) = ChannelSink::new(4096);
        let sink = Arc::new(sink);
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(256);
            while records.recv_many(&mut batch, 256).await > 0 {
                counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
            }
        });
        let proxy = Arc::new(L7Proxy::new(
            ProxyConfig::default(),
            Arc::new(PolicyStore::new(snapshot)),
            Arc::new(StaticDestination::always(backend)),
            Arc::new(identities),
            sink.clone(),
        ));
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("bind {listen}: {e}"))?;
        let server = tokio::spawn(proxy.serve(listener, Direction::Ingress));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            r = server => return Err(format!("server ended: {r:?}")),
        }
        println!(
            "records {} dropped {}",
            seen.load(Ordering::Relaxed),
            sink.dropped()
        );
        Ok(())
    })
}
