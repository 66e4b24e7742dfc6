//! Measures the agent's DNS learner against the real eBPF datapath: from the moment the DNS
//! proxy hands over an allowed answer (the [`DnsLearner`] call) to the moment the future
//! completes, i.e. identities allocated, every endpoint's policy map and the ipcache updated
//! in the kernel, after which the proxy releases the answer (the agent's state file is
//! written later by its housekeeping, off this path).
//!
//! ```text
//! fqdn-learn-latency BPFFS_DIR HOST_IFNAME [ANSWERS]
//! ```
//!
//! Needs root, a bpffs mounted on `BPFFS_DIR` and a host-side interface `HOST_IFNAME` to
//! attach one endpoint to (`bench/fqdn-learn.sh` sets both up in a network and mount
//! namespace of its own). The endpoint's policy allows egress to `*.example.com` through
//! `toFQDNs`; each answer names a fresh address (a new identity, as a new answer does), then
//! each address is taught again (a repeated answer: nothing changes in the kernel). Prints
//! p50/p99/max for both. `NO_STATE=1` runs without a state directory.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_agent::manager::{EndpointSpec, Manager, ManagerConfig};
use weir_agent::proxies::{AgentLearner, proxy_endpoint_id};
use weir_dns_proxy::{DnsLearner, Learned, LearnedIp};
use weir_l7_match::DnsRule;
use weir_policy_model::parse_policies;

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-example, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  egress:
  - toFQDNs: [{matchPattern: '*.example.com'}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: '53', protocol: UDP}]
      rules: {dns: [{matchPattern: '*'}]}
";

fn main() {
    if let Err(e) = run() {
        eprintln!("fqdn-learn-latency: {e}");
        std::process::exit(1);
    }
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64) * q) as usize;
        v.get(i.min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    format!(
        "n {} p50 {} us p99 {} us max {} us",
        v.len(),
        at(0.5).as_micros(),
        at(0.99).as_micros(),
        v.last().copied().unwrap_or_default().as_micros()
    )
}

#[cfg(feature = "aya")]
use weir_datapath_aya::AyaDatapath as Kernel;
#[cfg(all(not(feature = "aya"), feature = "libbpf"))]
use weir_datapath_libbpf::LibbpfDatapath as Kernel;

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(bpffs), Some(ifname)) = (args.first(), args.get(1)) else {
        return Err("usage: fqdn-learn-latency BPFFS_DIR HOST_IFNAME [ANSWERS]".into());
    };
    let n: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let datapath = Kernel::load(&PathBuf::from(bpffs).join("weir")).map_err(|e| e.to_string())?;
    // `NO_STATE=1`: without a state directory, to see what saving the state costs.
    let persist = std::env::var_os("NO_STATE").is_none();
    let config = ManagerConfig {
        state_dir: persist.then(|| state.path().to_path_buf()),
        ..ManagerConfig::default()
    };
    let mut m = Manager::new(config, datapath).map_err(|e| e.to_string())?;
    m.load_policy_file(Path::new("p.yaml"), parse_policies("p.yaml", POLICY))
        .map_err(|e| e.to_string())?;
    let ep = m
        .create_endpoint(EndpointSpec {
            container_id: "c-backend".into(),
            netns_path: "/proc/self/ns/net".into(),
            ifname: "eth0".into(),
            host_ifname: ifname.clone(),
            addresses: vec![IpAddr::from([10, 77, 0, 2])],
            namespace: "prod".into(),
            pod_name: "backend".into(),
            labels: [("app".to_string(), "backend".to_string())].into(),
            named_ports: BTreeMap::new(),
        })
        .map_err(|e| e.to_string())?;
    let endpoint = proxy_endpoint_id(ep.id).ok_or("endpoint id out of range")?;
    let manager = Arc::new(tokio::sync::Mutex::new(m));
    let learner = AgentLearner::new(manager.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let answer = |i: u32| Learned {
        endpoint,
        name: format!("h{i}.example.com."),
        aliases: Vec::new(),
        ips: vec![LearnedIp {
            ip: IpAddr::V4(Ipv4Addr::from(0xcb00_0000_u32 + i)),
            ttl: 300,
        }],
        selectors: vec![DnsRule::MatchPattern("*.example.com".into())],
    };
    rt.block_on(async {
        let mut fresh = Vec::new();
        let mut again = Vec::new();
        for i in 0..n {
            let l = answer(i);
            let t = Instant::now();
            learner.learn(&l).await.map_err(|e| e.to_string())?;
            fresh.push(t.elapsed());
        }
        for i in 0..n {
            let l = answer(i);
            let t = Instant::now();
            learner.learn(&l).await.map_err(|e| e.to_string())?;
            again.push(t.elapsed());
        }
        println!(
            "new address (identity + policy map + ipcache): {}",
            percentiles(fresh)
        );
        println!("repeated answer (nothing changes): {}", percentiles(again));
        Ok::<_, String>(())
    })?;
    let m = manager.blocking_lock();
    println!("identities allocated: {}", m.identities().len());
    Ok(())
}
