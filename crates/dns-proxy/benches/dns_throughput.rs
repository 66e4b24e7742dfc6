//! Loopback throughput: queries per second from N concurrent UDP clients, directly to dnsmasq
//! and through the proxy (with the seed's DNS policy and a no-op learner), in one run, with
//! the ratio. Run with `cargo bench -p weir-dns-proxy --bench dns_throughput`; skipped if
//! dnsmasq is not installed. Env: `CLIENTS` (default 16), `SECS` (default 3).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use weir_dns_proxy::wire::build_query;
use weir_dns_proxy::{
    CacheConfig, DnsNullSink, DnsPolicySnapshot, DnsPolicyStore, DnsProxy, DnsProxyConfig,
    DnsUdpSocket, EndpointId, NameCache, NoLearning, StaticIdentities,
};
use weir_identity::{Identity, LabelFilter, pod_identity_labels};
use weir_l7_match::DnsRule;
use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, NamedPorts};
use weir_policy_model::parse_policies;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends queries in lock-step from `clients` sockets for `secs`; returns answers per second.
async fn run(target: SocketAddr, clients: u64, secs: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                return;
            };
            if s.connect(target).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 4096];
            let mut id = (c as u16).wrapping_mul(4099);
            while !stop.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                let Some(q) = build_query(id, "api.stripe.com.", 1) else {
                    return;
                };
                if s.send(&q).await.is_err() {
                    continue;
                }
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf)).await
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / elapsed
}

fn policy(port: u16) -> weir_policy_compiler::L7Policy {
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: dns, namespace: production}}\nspec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  egress:\n  - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}}}]\n    toPorts:\n    - ports: [{{port: '{port}', protocol: UDP}}]\n      rules: {{dns: [{{matchPattern: '*'}}]}}\n"
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
    c.upsert_identity(Identity(1000), backend.clone(), NamedPorts::new());
    c.upsert_identity(Identity(1002), dns, NamedPorts::new());
    for p in parse_policies("bench.yaml", &yaml).unwrap_or_default() {
        c.upsert_policy(p);
    }
    c.compile(&EndpointInfo {
        identity: Identity(1000),
        labels: backend,
        named_ports: NamedPorts::new(),
    })
    .l7
}

fn main() {
    let clients = env("CLIENTS", 16);
    let secs = env("SECS", 3);
    let dir = std::env::temp_dir().join(format!("weir-dns-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(25353);
    let child = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--local-ttl=300",
            "--user=root",
            "--group=root",
            "--host-record=api.stripe.com,203.0.113.10",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--pid-file={}", dir.join("pid").display()))
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED: cannot start dnsmasq ({e})");
            return;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("no runtime: {e}");
            let _ = child.kill();
            return;
        }
    };
    let upstream = SocketAddr::from(([127, 0, 0, 1], port));
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let snapshot = DnsPolicySnapshot::empty()
            .with_endpoint(EndpointId(9), Arc::new(policy(port)))
            .with_fqdn_selectors(vec![DnsRule::MatchName("api.stripe.com".into())])
            .unwrap_or_default();
        let identities = StaticIdentities {
            identities: HashMap::from([(upstream.ip(), Identity(1002))]),
            endpoints: HashMap::from([(IpAddr::from([127, 0, 0, 1]), EndpointId(9))]),
        };
        let proxy = DnsProxy::new(
            DnsProxyConfig::default(),
            Arc::new(DnsPolicyStore::new(snapshot)),
            Arc::new(identities),
            Arc::new(NoLearning),
            Arc::new(NameCache::new(CacheConfig::default())),
            Arc::new(DnsNullSink),
        );
        let Ok(sock) =
            DnsUdpSocket::bind_fixed(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
        else {
            eprintln!("cannot bind the proxy");
            return;
        };
        let proxy_addr = sock.local_addr();
        let p = proxy.clone();
        tokio::spawn(async move { p.serve_udp(sock).await });
        // Warm up both paths.
        let _ = run(upstream, clients, 1).await;
        let _ = run(proxy_addr, clients, 1).await;
        let direct = run(upstream, clients, secs).await;
        let proxied = run(proxy_addr, clients, secs).await;
        println!("dns_throughput clients={clients} secs={secs}");
        println!("  direct to dnsmasq : {direct:>10.0} q/s");
        println!("  through weir proxy: {proxied:>10.0} q/s");
        println!("  ratio proxy/direct: {:>10.2}", proxied / direct.max(1.0));
        let st = proxy.stats();
        println!(
            "  proxy stats: forwarded={} learned={} timeouts={} mismatched={}",
            st.forwarded, st.learned, st.upstream_timeouts, st.mismatched_answers
        );
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
