//! Loopback harness: a real dnsmasq (or a fake upstream) behind the proxy, real UDP/TCP
//! clients.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use weir_dns_proxy::wire::{DnsMessage, build_query, parse_message};
use weir_dns_proxy::{
    CacheConfig, DnsChannelSink, DnsLearner, DnsPolicySnapshot, DnsPolicyStore, DnsProxy,
    DnsProxyConfig, DnsRecord, DnsUdpSocket, EndpointId, LearnError, LearnFuture, Learned,
    NameCache, StaticIdentities,
};
use weir_identity::{Identity, LabelFilter, pod_identity_labels};
use weir_l7_match::DnsRule;
use weir_l7_proxy::StaticDestination;
use weir_policy_compiler::{Compiler, CompilerConfig, EndpointInfo, L7Policy, NamedPorts};
use weir_policy_model::parse_policies;

pub const BACKEND: Identity = Identity(1000);
pub const KUBE_DNS: Identity = Identity(1002);
pub const ENDPOINT: EndpointId = EndpointId(9);

/// The seed's `allow-external-apis`, with the DNS port made a parameter (dnsmasq listens on a
/// high port).
pub fn seed_policy(port: u16) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-external-apis
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: backend
  egress:
    - toFQDNs:
        - matchName: 'api.stripe.com'
        - matchName: 'api.github.com'
        - matchPattern: '*.amazonaws.com'
      toPorts:
        - ports:
            - port: '443'
              protocol: TCP
    - toEndpoints:
        - matchLabels:
            k8s:io.kubernetes.pod.namespace: kube-system
            k8s-app: kube-dns
      toPorts:
        - ports:
            - port: '{port}'
              protocol: UDP
          rules:
            dns:
              - matchPattern: '*'
"#
    )
}

/// DNS rules that name what may be asked, on UDP and TCP (protocol ANY).
pub fn restricted_policy(port: u16) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: restricted-dns
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: backend
  egress:
    - toEndpoints:
        - matchLabels:
            k8s:io.kubernetes.pod.namespace: kube-system
            k8s-app: kube-dns
      toPorts:
        - ports:
            - port: '{port}'
          rules:
            dns:
              - matchName: 'api.stripe.com'
              - matchName: 'www.stripe.com'
              - matchName: 'short.example.com'
              - matchPattern: '*.amazonaws.com'
"#
    )
}

pub fn seed_selectors() -> Vec<DnsRule> {
    vec![
        DnsRule::MatchName("api.stripe.com".into()),
        DnsRule::MatchName("api.github.com".into()),
        DnsRule::MatchPattern("*.amazonaws.com".into()),
        DnsRule::MatchName("short.example.com".into()),
    ]
}

pub fn compile(yaml: &str) -> L7Policy {
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
    for p in parse_policies("test.yaml", yaml).expect("policy parses") {
        c.upsert_policy(p);
    }
    let ep = EndpointInfo {
        identity: BACKEND,
        labels: backend,
        named_ports: NamedPorts::new(),
    };
    c.compile(&ep).l7
}

pub fn snapshot(yaml: &str) -> DnsPolicySnapshot {
    DnsPolicySnapshot::empty()
        .with_endpoint(ENDPOINT, Arc::new(compile(yaml)))
        .with_fqdn_selectors(seed_selectors())
        .expect("selectors compile")
}

/// A learner that records each call with the time it finished, optionally after a delay,
/// optionally failing.
#[derive(Default)]
pub struct RecordingLearner {
    pub calls: Mutex<Vec<(Learned, Instant)>>,
    pub delay: Duration,
    pub fail: bool,
}

impl DnsLearner for RecordingLearner {
    fn learn<'a>(&'a self, learned: &'a Learned) -> LearnFuture<'a> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            if self.fail {
                return Err(LearnError("test learner fails".into()));
            }
            self.calls
                .lock()
                .expect("lock")
                .push((learned.clone(), Instant::now()));
            Ok(())
        })
    }
}

impl RecordingLearner {
    pub fn calls(&self) -> Vec<(Learned, Instant)> {
        self.calls.lock().expect("lock").clone()
    }
}

/// A dnsmasq child, killed (by its pid) on drop.
pub struct Dnsmasq {
    child: Child,
    _dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = u.local_addr().expect("addr").port();
    // The TCP side must be free as well.
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => port,
        Err(_) => free_port(),
    }
}

/// Starts dnsmasq answering the test names, or `None` (with a message) if it is not installed.
pub async fn dnsmasq() -> Option<Dnsmasq> {
    let dir = tempfile::tempdir().expect("tempdir");
    for _ in 0..5 {
        let port = free_port();
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--local-ttl=300",
                "--host-record=api.stripe.com,203.0.113.10",
                "--host-record=api.github.com,203.0.113.20,2001:db8::20",
                "--host-record=s3.amazonaws.com,203.0.113.30",
                "--host-record=a.b.amazonaws.com,203.0.113.31",
                "--host-record=evil-site.com,198.51.100.66",
                "--host-record=short.example.com,203.0.113.50,1",
                "--cname=www.stripe.com,api.stripe.com",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!(
                "--dhcp-leasefile={}",
                dir.path().join("leases").display()
            ))
            .args(user_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "SKIPPED: the dnsmasq binary is not installed (apt-get install dnsmasq-base)"
                );
                return None;
            }
            Err(e) => panic!("spawning dnsmasq: {e}"),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut d = Dnsmasq {
            child,
            _dir: tempfile::tempdir().expect("tempdir"),
            addr,
        };
        // Ready when it answers.
        for _ in 0..50 {
            if let Some((m, _)) =
                udp_query(addr, 1, "api.stripe.com.", 1, Duration::from_millis(100)).await
                && m.rcode == 0
            {
                d._dir = dir;
                return Some(d);
            }
            if let Ok(Some(_)) = d.child.try_wait() {
                break;
            }
        }
    }
    panic!("dnsmasq did not start");
}

fn user_args() -> Vec<String> {
    // As root, dnsmasq would drop to `nobody`; stay as we are instead.
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
    if root {
        vec!["--user=root".into(), "--group=root".into()]
    } else {
        Vec::new()
    }
}

/// Sends a raw datagram and waits for one reply.
pub async fn udp_raw(to: SocketAddr, bytes: &[u8], wait: Duration) -> Option<(Vec<u8>, Instant)> {
    let s = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    s.send_to(bytes, to).await.ok()?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(wait, s.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let at = Instant::now();
    buf.truncate(n);
    Some((buf, at))
}

pub async fn udp_query(
    to: SocketAddr,
    id: u16,
    name: &str,
    qtype: u16,
    wait: Duration,
) -> Option<(DnsMessage, Instant)> {
    let q = build_query(id, name, qtype)?;
    let (r, at) = udp_raw(to, &q, wait).await?;
    parse_message(&r).ok().map(|m| (m, at))
}

pub async fn tcp_query(to: SocketAddr, id: u16, name: &str, qtype: u16) -> Option<DnsMessage> {
    let q = build_query(id, name, qtype)?;
    let mut s = TcpStream::connect(to).await.ok()?;
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    s.write_all(&out).await.ok()?;
    let len = tokio::time::timeout(Duration::from_secs(3), s.read_u16())
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.ok()?;
    parse_message(&buf).ok()
}

pub fn ips(m: &DnsMessage) -> Vec<IpAddr> {
    use weir_dns_proxy::wire::AnswerData;
    m.answers
        .iter()
        .filter_map(|a| match a.data {
            AnswerData::A(ip) => Some(IpAddr::V4(ip)),
            AnswerData::Aaaa(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        })
        .collect()
}

pub struct Harness {
    pub proxy: DnsProxy,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub store: Arc<DnsPolicyStore>,
    pub learner: Arc<RecordingLearner>,
    pub cache: Arc<NameCache>,
    pub records: tokio::sync::mpsc::Receiver<DnsRecord>,
}

/// The proxy on 127.0.0.1 (UDP and TCP, fixed mode) in front of `upstream`. The client
/// (127.0.0.1) is the backend endpoint; the upstream's address has kube-dns's identity.
pub async fn start(
    upstream: SocketAddr,
    snapshot: DnsPolicySnapshot,
    config: DnsProxyConfig,
    cache: CacheConfig,
    learner: RecordingLearner,
) -> Harness {
    let store = Arc::new(DnsPolicyStore::new(snapshot));
    let (sink, records) = DnsChannelSink::new(10_000);
    let identities = StaticIdentities {
        identities: HashMap::from([(upstream.ip(), KUBE_DNS)]),
        endpoints: HashMap::from([(IpAddr::from([127, 0, 0, 1]), ENDPOINT)]),
    };
    let learner = Arc::new(learner);
    let cache = Arc::new(NameCache::new(cache));
    let proxy = DnsProxy::new(
        config,
        store.clone(),
        Arc::new(identities),
        learner.clone(),
        cache.clone(),
        Arc::new(sink),
    );
    let udp_sock = DnsUdpSocket::bind_fixed("127.0.0.1:0".parse().expect("addr"), upstream)
        .await
        .expect("bind udp");
    let udp = udp_sock.local_addr();
    let p = proxy.clone();
    tokio::spawn(async move { p.serve_udp(udp_sock).await });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    let tcp = listener.local_addr().expect("addr");
    let p = proxy.clone();
    tokio::spawn(async move {
        p.serve_tcp(listener, Arc::new(StaticDestination::always(upstream)))
            .await
    });
    Harness {
        proxy,
        udp,
        tcp,
        store,
        learner,
        cache,
        records,
    }
}
