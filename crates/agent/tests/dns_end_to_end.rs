//! Root-only: DNS-aware policy through the real `weir-agent`, its eBPF datapath and DNS proxy,
//! with dnsmasq as the cluster's DNS server and real TCP connections to a "world" namespace.
//!
//! One lab, three checks (issue 8):
//! 1. No first-packet drop: 250 times (200 queries over UDP, 50 over TCP), a pod asks a name
//!    never asked before and opens a TCP connection to the answer the moment the answer
//!    arrives. Every connection must open without a single SYN retransmission, and the
//!    observer must show no drop toward those addresses (and have lost no event).
//! 2. TTL expiry closes access: an address reachable after its query stops being reachable
//!    once its answer has expired and no connection to it is left.
//! 3. A changed answer moves access: dnsmasq reloads a changed hosts file; the name's new
//!    address is reachable after the next query, the old one until it expires, then not.
//!
//! Checks 2 and 3 wait for expiry, which is bounded below by the datapath's conntrack: a
//! closed TCP connection stays live there for 10 s (Cilium's `tcp-fin` timeout), and expiry
//! never cuts a live connection. So they start first and check 1 runs while they wait.
//!
//! The test can fail: with the agent's learner changed to learn in a spawned task instead of
//! before the answer is released, 91 of 200 connections needed a SYN retransmission.
//!
//! The pod's client runs in this process, on a thread moved into the pod's namespace with
//! `setns(2)`, not as `dig` + `curl` processes: the connect follows the answer's arrival by
//! microseconds instead of a process start, and the socket's `TCP_INFO` tells whether its SYN
//! had to be retransmitted (a dropped first packet that a retry hid).
//!
//! Safety: as in l7_end_to_end.rs. Every namespace is `weirdns-<pid>-*`, removed by a Drop
//! guard even when an assertion fails; the agent runs inside the node namespace (`ip netns
//! exec`, which gives it a private mount namespace, so its bpffs mount on a temporary
//! directory is private and goes with it), and its state, policies and sockets live in a
//! temporary directory. Threads of this process enter the lab's namespaces, never change
//! the root namespace, and end with the test.

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weir_agent_api::v1::inspect_service_client::InspectServiceClient;
use weir_agent_api::v1::{BpfIpcacheListRequest, FqdnCacheEntry, FqdnCacheListRequest};
use weir_dns_proxy::wire::{AnswerData, build_query, parse_message};
use weir_observe::proto::flow::{Flow, FlowFilter, Verdict};
use weir_observe::proto::observer::observer_client::ObserverClient;
use weir_observe::proto::observer::{GetFlowsRequest, get_flows_response};

/// Fresh names for check 1: `n<i>.fqdn.test` answers `10.215.64.<i>`; the first
/// `REPETITIONS` are asked over UDP, the next `TCP_REPETITIONS` over TCP (the proxy's other
/// path).
const REPETITIONS: u8 = 200;
const TCP_REPETITIONS: u8 = 50;
/// The TTL dnsmasq gives every answer, in seconds.
const TTL: u32 = 1;
/// The agent's `--tofqdns-min-ttl`: access lasts this long, longer than the answers' TTL.
const MIN_TTL: u64 = 2;
const DNS_SERVER: &str = "10.215.2.2";
/// Every address of the world namespace (an AnyIP route: one listener serves them all).
const WORLD_RANGE: &str = "10.215.64.0/18";
const SHORT: (&str, &str) = ("short.fqdn.test", "10.215.100.1");
const MOVING: &str = "moving.fqdn.test";
const MOVING_OLD: &str = "10.215.100.2";
const MOVING_NEW: &str = "10.215.100.3";
const PORT: u16 = 8080;
/// How long a connection that must open may take (it opens in microseconds; this only
/// bounds a failure).
const OPEN: Duration = Duration::from_secs(3);
/// How long a connection that must be denied is tried: below the kernel's 1 s initial SYN
/// retransmission timeout, so each denied attempt sends exactly one SYN (one drop).
const DENIED: Duration = Duration::from_millis(600);

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-fqdn, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints: [{matchLabels: {app: dns}}]
      toPorts:
        - ports: [{port: '53', protocol: ANY}]
          rules:
            dns: [{matchPattern: '*.fqdn.test'}]
    - toFQDNs: [{matchPattern: '*.fqdn.test'}]
      toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
";

type Error = Box<dyn std::error::Error>;

fn fresh(i: u8) -> (String, Ipv4Addr) {
    (format!("n{i}.fqdn.test"), Ipv4Addr::new(10, 215, 64, i))
}

fn hosts_file(moving_to: &str) -> String {
    let mut s = String::new();
    for i in 1..=REPETITIONS + TCP_REPETITIONS {
        let (name, ip) = fresh(i);
        s.push_str(&format!("{ip} {name}\n"));
    }
    s.push_str(&format!("{} {}\n{moving_to} {MOVING}\n", SHORT.1, SHORT.0));
    s
}

/// Moves the calling thread into the network namespace `ns` (only this thread: network
/// namespaces are per task).
fn enter(ns: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("{ns}: {e}"))?;
    // SAFETY: the descriptor is open for the call's duration; CLONE_NEWNET only changes the
    // calling thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs `f` on a new thread inside `ns`.
fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> JoinHandle<Result<T, String>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        f()
    })
}

/// Runs `f` inside `ns` and waits for it.
fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Error> {
    match spawn_in(ns, f).join() {
        Ok(r) => Ok(r?),
        Err(_) => Err("thread in the namespace panicked".into()),
    }
}

/// Asks `server` for the A records of `name` over TCP (one connection per query, as `dig
/// +tcp`); returns them as soon as the answer is read.
fn resolve_tcp(server: &str, name: &str, id: u16) -> Result<Vec<Ipv4Addr>, String> {
    let query = build_query(id, name, 1).ok_or_else(|| format!("cannot encode {name}"))?;
    let err = |e: std::io::Error| format!("{name} over TCP: {e}");
    let addr = SocketAddr::new(server.parse().map_err(|_| "bad server")?, 53);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(err)?;
    let len = u16::try_from(query.len()).map_err(|_| "query too long")?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    s.write_all(&framed).map_err(err)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(err)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut answer).map_err(err)?;
    a_records(name, id, &answer)
}

/// The A records of an answer to query `id`.
fn a_records(name: &str, id: u16, answer: &[u8]) -> Result<Vec<Ipv4Addr>, String> {
    let m = parse_message(answer).map_err(|e| format!("{name}: {e}"))?;
    if m.id != id || m.rcode != 0 {
        return Err(format!("{name}: id {} rcode {}", m.id, m.rcode));
    }
    Ok(m.answers
        .iter()
        .filter_map(|a| match a.data {
            AnswerData::A(ip) => Some(ip),
            _ => None,
        })
        .collect())
}

/// Asks `server` for the A records of `name` over UDP; returns them as soon as the answer is
/// read.
fn resolve(server: &str, name: &str, id: u16) -> Result<Vec<Ipv4Addr>, String> {
    let query = build_query(id, name, 1).ok_or_else(|| format!("cannot encode {name}"))?;
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect((server, 53)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.send(&query).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    loop {
        let n = s.recv(&mut buf).map_err(|e| format!("{name}: {e}"))?;
        let answer = buf.get(..n).unwrap_or_default();
        // Anything else arriving on the socket is not the answer.
        if parse_message(answer).is_ok_and(|m| m.id == id) {
            return a_records(name, id, answer);
        }
    }
}

/// How one connection attempt went.
#[derive(Debug, PartialEq, Eq)]
enum Connect {
    /// Opened; the SYN was retransmitted this many times.
    Open { retransmits: u32 },
    /// Did not open within the timeout (or was refused).
    Failed(String),
}

/// Opens a TCP connection to `ip:PORT` and reads how many SYNs it took.
fn connect(ip: Ipv4Addr, timeout: Duration) -> Connect {
    let addr = SocketAddr::from((ip, PORT));
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => Connect::Open {
            retransmits: total_retransmits(&s).unwrap_or(u32::MAX),
        },
        Err(e) => Connect::Failed(e.to_string()),
    }
}

/// The socket's `tcpi_total_retrans`: a SYN dropped and sent again counts.
fn total_retransmits(s: &TcpStream) -> Option<u32> {
    // SAFETY: tcp_info is plain data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: `info` and `len` are valid out pointers of the size given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info.tcpi_total_retrans)
}

/// The world namespace's server: accepts connections on every address and closes them.
struct WorldServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl WorldServer {
    fn start(ns: &str) -> Result<Self, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = spawn_in(ns, move || {
            let l = TcpListener::bind(("0.0.0.0", PORT)).map_err(|e| e.to_string())?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            let _ = ready_tx.send(());
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            Ok(())
        });
        if ready_rx.recv_timeout(Duration::from_secs(5)).is_err() {
            let why = thread
                .join()
                .map_err(|_| "panicked".to_string())
                .and_then(|r| r)
                .err();
            return Err(format!("world server did not start: {why:?}").into());
        }
        Ok(WorldServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for WorldServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `GET /metrics` from the agent's metrics endpoint in the node namespace, as (series, value).
fn metrics(node: &str) -> Result<HashMap<String, f64>, Error> {
    let text = run_in(node, || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 9965)),
            Duration::from_secs(3),
        )
        .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut body = String::new();
        s.read_to_string(&mut body).map_err(|e| e.to_string())?;
        Ok(body)
    })?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// The sum of the series named `name` whose labels contain `label` (may be empty).
fn sum_of(m: &HashMap<String, f64>, name: &str, label: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(label))
        .map(|(_, v)| v)
        .sum()
}

struct Lab {
    node: String,
    client: String,
    dns: String,
    log: PathBuf,
    socket: PathBuf,
    hubble: PathBuf,
    hosts: PathBuf,
    dnsmasq_pid: u32,
    rt: tokio::runtime::Runtime,
}

impl Lab {
    fn log(&self) -> String {
        agent_log(&self.log)
    }

    fn fqdn_cache(&self) -> Result<Vec<FqdnCacheEntry>, Error> {
        let channel = self
            .rt
            .block_on(weir_agent_api::connect_unix(&self.socket))?;
        Ok(self
            .rt
            .block_on(InspectServiceClient::new(channel).fqdn_cache_list(FqdnCacheListRequest {}))?
            .into_inner()
            .entries)
    }

    fn ipcache(&self) -> Result<BTreeMap<String, u32>, Error> {
        let channel = self
            .rt
            .block_on(weir_agent_api::connect_unix(&self.socket))?;
        Ok(self
            .rt
            .block_on(
                InspectServiceClient::new(channel).bpf_ipcache_list(BpfIpcacheListRequest {}),
            )?
            .into_inner()
            .entries
            .into_iter()
            .map(|e| (e.prefix, e.identity))
            .collect())
    }

    /// Flows the observer keeps that match `filter`.
    fn flows(&self, filter: FlowFilter) -> Result<Vec<Flow>, Error> {
        self.rt.block_on(async {
            let mut observer =
                ObserverClient::new(weir_observe::server::connect_unix(&self.hubble).await?);
            let req = GetFlowsRequest {
                number: 1 << 16,
                whitelist: vec![filter],
                ..Default::default()
            };
            let mut s = observer.get_flows(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(r) = s.message().await? {
                if let Some(get_flows_response::ResponseTypes::Flow(f)) = r.response_types {
                    out.push(f);
                }
            }
            Ok(out)
        })
    }

    /// Policy drops from the client toward `ip` (a prefix) the observer has seen.
    fn drops_toward(&self, prefix: &str) -> Result<Vec<Flow>, Error> {
        self.flows(FlowFilter {
            verdict: vec![Verdict::Dropped as i32],
            destination_ip: vec![prefix.to_string()],
            ..Default::default()
        })
    }

    /// Waits until the observer shows at least `n` policy drops from the client toward `ip`;
    /// returns how many it shows.
    fn wait_for_policy_drops(&self, ip: &str, n: usize) -> Result<usize, Error> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let drops = self.drops_toward(&format!("{ip}/32"))?;
            let policy = drops
                .iter()
                .filter(|f| {
                    f.drop_reason_desc == 133
                        && f.source.as_ref().is_some_and(|s| s.pod_name == "client")
                })
                .count();
            if policy >= n {
                return Ok(policy);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{policy} policy drops toward {ip}, expected {n}: {drops:?}\n{}",
                    self.log()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Resolves `name` through the DNS proxy from the client pod.
    fn resolve(&self, name: &'static str, id: u16) -> Result<Vec<Ipv4Addr>, Error> {
        run_in(&self.client, move || resolve(DNS_SERVER, name, id))
    }

    /// A TCP connection from the client pod to `ip`.
    fn connect(&self, ip: &str, timeout: Duration) -> Result<Connect, Error> {
        let ip: Ipv4Addr = ip.parse()?;
        run_in(&self.client, move || Ok(connect(ip, timeout)))
    }

    /// Makes dnsmasq answer `MOVING` with `to`, and waits until it does (asked directly, in
    /// its own namespace, so the proxy learns nothing from it).
    fn move_name(&self, to: &'static str) -> Result<(), Error> {
        std::fs::write(&self.hosts, hosts_file(to))?;
        // SAFETY: signalling our own child process.
        if unsafe { libc::kill(self.dnsmasq_pid as libc::pid_t, libc::SIGHUP) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let want: Ipv4Addr = to.parse()?;
        loop {
            let got = run_in(&self.dns, || resolve(DNS_SERVER, MOVING, 7));
            if matches!(&got, Ok(ips) if ips == &[want]) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("dnsmasq still answers {got:?} after SIGHUP").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn start_lab(g: &mut Guard, tmp: &Path, prefix: &str) -> Result<Lab, Error> {
    let node = g.netns(format!("{prefix}-node"))?;
    let client = g.netns(format!("{prefix}-client"))?;
    let dns = g.netns(format!("{prefix}-dns"))?;
    let world = g.netns(format!("{prefix}-world"))?;
    let pods = [
        Pod {
            ns: &client,
            host_if: "lxcc",
            net: "10.215.1",
            app: "client",
        },
        Pod {
            ns: &dns,
            host_if: "lxcd",
            net: "10.215.2",
            app: "dns",
        },
    ];
    wire_pods(&node, &pods)?;
    // The world: no endpoint, reached through the node. Every address of WORLD_RANGE is
    // local there.
    ip(&[
        "-n", &node, "link", "add", "wld", "type", "veth", "peer", "name", "eth0", "netns", &world,
    ])?;
    ip(&["-n", &node, "addr", "add", "10.215.3.1/24", "dev", "wld"])?;
    ip(&["-n", &node, "link", "set", "wld", "up"])?;
    ip(&[
        "-n",
        &node,
        "route",
        "add",
        WORLD_RANGE,
        "via",
        "10.215.3.2",
    ])?;
    ip(&["-n", &world, "addr", "add", "10.215.3.2/24", "dev", "eth0"])?;
    ip(&["-n", &world, "link", "set", "eth0", "up"])?;
    ip(&["-n", &world, "route", "add", "default", "via", "10.215.3.1"])?;
    ip(&[
        "-n",
        &world,
        "route",
        "add",
        "local",
        WORLD_RANGE,
        "dev",
        "lo",
    ])?;

    // dnsmasq as the cluster DNS, in the dns pod, answering from a hosts file.
    let hosts = tmp.join("hosts");
    std::fs::write(&hosts, hosts_file(MOVING_OLD))?;
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            &dns,
            "dnsmasq",
            "-k",
            "--no-resolv",
            "--no-hosts",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .args([
            &format!("--listen-address={DNS_SERVER}"),
            "--bind-interfaces",
            "--port=53",
            &format!("--local-ttl={TTL}"),
            "--pid-file=",
            "--user=root",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let dnsmasq_pid = dnsmasq.id();
    g.children.push(dnsmasq);

    let policies = tmp.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("fqdn.yaml"), POLICY)?;
    let socket = tmp.join("agent.sock");
    let hubble = tmp.join("hubble.sock");
    let log = tmp.join("agent.log");
    let agent = Command::new("ip")
        .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_weir-agent")])
        .arg("--state-dir")
        .arg(tmp.join("state"))
        .arg("--bpffs")
        .arg(tmp.join("bpf"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--policy-dir")
        .arg(&policies)
        // Room for every flow of the run: the drop checks read them all back.
        .args(["--hubble-ring-size", "65535"])
        .args(["--tofqdns-min-ttl", &MIN_TTL.to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    g.children.push(agent);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    register_pods(&rt, &socket, &log, prefix, &pods)?;
    let lab = Lab {
        node,
        client,
        dns,
        log,
        socket,
        hubble,
        hosts,
        dnsmasq_pid,
        rt,
    };
    // dnsmasq is up when it answers in its own namespace.
    let deadline = Instant::now() + Duration::from_secs(10);
    while run_in(&lab.dns, || resolve(DNS_SERVER, SHORT.0, 1)).is_err() {
        if Instant::now() > deadline {
            return Err("dnsmasq did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(lab)
}

/// Check 1, in the client pod: `REPETITIONS` + `TCP_REPETITIONS` fresh names, each asked
/// and connected to at once. Returns every repetition that did not open on its first SYN.
fn ask_and_connect_at_once() -> Result<Vec<String>, String> {
    let mut failures = Vec::new();
    for i in 1..=REPETITIONS + TCP_REPETITIONS {
        let (name, want) = fresh(i);
        let id = 1000 + u16::from(i);
        let asked = if i <= REPETITIONS {
            resolve(DNS_SERVER, &name, id)
        } else {
            resolve_tcp(DNS_SERVER, &name, id)
        };
        let answer = match asked {
            Ok(a) => a,
            Err(e) => {
                failures.push(format!("{name}: DNS {e}"));
                continue;
            }
        };
        let Some(&ip) = answer.first() else {
            failures.push(format!("{name}: empty answer"));
            continue;
        };
        // No pause: the answer was released, so the datapath must already allow this.
        let result = connect(ip, Duration::from_secs(3));
        if ip != want || result != (Connect::Open { retransmits: 0 }) {
            failures.push(format!("{name} -> {ip}: {result:?}"));
        }
    }
    Ok(failures)
}

fn has(cache: &[FqdnCacheEntry], name: &str, ip: &str) -> bool {
    cache
        .iter()
        .any(|e| e.name.trim_end_matches('.') == name && e.ip == ip)
}

#[test]
fn dns_learning_expiry_and_changed_answers_through_the_agent() -> TestResult {
    if let Some(reason) = skip() {
        eprintln!("SKIP dns_learning_expiry_and_changed_answers_through_the_agent: {reason}");
        return Ok(());
    }
    if !have("dnsmasq") {
        eprintln!("SKIP dns_learning_expiry_and_changed_answers_through_the_agent: needs dnsmasq");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let prefix = format!("weirdns-{}", std::process::id());
    let mut g = Guard::default();
    let lab = start_lab(&mut g, tmp.path(), &prefix)?;
    let _world = WorldServer::start(&format!("{prefix}-world"))?;

    // Nothing is reachable before its name was asked.
    assert!(
        matches!(lab.connect(SHORT.1, DENIED)?, Connect::Failed(_)),
        "{} reachable before any query\n{}",
        SHORT.1,
        lab.log()
    );
    // The observer shows that drop (the drop checks below rely on it).
    let short_drops = lab.wait_for_policy_drops(SHORT.1, 1)?;

    // Checks 2 and 3, first half: learned, reachable.
    let short = lab.resolve(SHORT.0, 1)?;
    assert_eq!(short, [SHORT.1.parse::<Ipv4Addr>()?], "{}", lab.log());
    assert_eq!(
        lab.connect(SHORT.1, OPEN)?,
        Connect::Open { retransmits: 0 },
        "{}",
        lab.log()
    );
    // The answer said 1 s; the agent keeps it for its minimum TTL.
    let entry = lab
        .fqdn_cache()?
        .into_iter()
        .find(|e| e.name == format!("{}.", SHORT.0))
        .ok_or("short.fqdn.test not in the cache")?;
    assert_eq!(
        entry.expires_ms.saturating_sub(entry.learned_ms),
        MIN_TTL * 1000,
        "{entry:?}"
    );
    let moving = lab.resolve(MOVING, 2)?;
    assert_eq!(moving, [MOVING_OLD.parse::<Ipv4Addr>()?]);
    assert_eq!(
        lab.connect(MOVING_OLD, OPEN)?,
        Connect::Open { retransmits: 0 }
    );
    lab.move_name(MOVING_NEW)?;
    assert!(
        matches!(lab.connect(MOVING_NEW, DENIED)?, Connect::Failed(_)),
        "the new address is reachable before the client asked"
    );
    let moved = lab.resolve(MOVING, 3)?;
    assert_eq!(moved, [MOVING_NEW.parse::<Ipv4Addr>()?]);
    assert_eq!(
        lab.connect(MOVING_NEW, OPEN)?,
        Connect::Open { retransmits: 0 },
        "{}",
        lab.log()
    );
    // The old answer has not expired (or its connection is still in conntrack): as in
    // Cilium, the old address stays reachable until then.
    assert_eq!(
        lab.connect(MOVING_OLD, OPEN)?,
        Connect::Open { retransmits: 0 }
    );
    let cache = lab.fqdn_cache()?;
    assert!(
        has(&cache, MOVING, MOVING_OLD) && has(&cache, MOVING, MOVING_NEW),
        "{cache:?}"
    );
    let waiting_since = Instant::now();

    // Check 1 while the answers above expire.
    // TCP only: the pods' own IPv6 neighbour and multicast chatter is dropped by the
    // client's egress policy at any time.
    let tcp_drops = |m: &HashMap<String, f64>| sum_of(m, "hubble_drop_total", "protocol=\"TCP\"");
    let drops_before = tcp_drops(&metrics(&lab.node)?);
    let started = Instant::now();
    let failures = run_in(&lab.client, ask_and_connect_at_once)?;
    let took = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {} connections made the moment the answer arrived did not open on \
         their first SYN: {failures:#?}\nagent log:\n{}",
        failures.len(),
        REPETITIONS + TCP_REPETITIONS,
        lab.log()
    );
    eprintln!(
        "{REPETITIONS} fresh names over UDP and {TCP_REPETITIONS} over TCP asked and connected \
         to in {took:?}, none dropped"
    );
    // Let the observer drain the datapath's events, then: no drop toward those addresses,
    // no drop at all during the loop, and no event lost (so none could hide).
    std::thread::sleep(Duration::from_millis(500));
    let dropped = lab.drops_toward("10.215.64.0/24")?;
    assert!(
        dropped.is_empty(),
        "drops toward learned addresses: {dropped:?}"
    );
    let m = metrics(&lab.node)?;
    assert_eq!(tcp_drops(&m), drops_before, "TCP drops during the loop");
    assert_eq!(
        sum_of(&m, "hubble_lost_events_total", ""),
        0.0,
        "lost events"
    );
    let learned = lab.fqdn_cache()?;
    assert!(
        (1..=REPETITIONS + TCP_REPETITIONS)
            .map(fresh)
            .all(|(name, ip)| has(&learned, &name, &ip.to_string())),
        "every fresh name is in the cache"
    );

    // Checks 2 and 3, second half: once the answers have expired and the connections are
    // gone from conntrack, housekeeping removes the addresses, and access closes.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let cache = lab.fqdn_cache()?;
        if !has(&cache, SHORT.0, SHORT.1) && !has(&cache, MOVING, MOVING_OLD) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired answers never left the cache: {cache:?}\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "expired addresses removed {:?} after their last connection",
        waiting_since.elapsed()
    );
    let ipcache = lab.ipcache()?;
    for gone in [SHORT.1, MOVING_OLD] {
        assert!(
            !ipcache.contains_key(&format!("{gone}/32")),
            "{gone} still in the ipcache: {ipcache:?}"
        );
        assert!(
            matches!(lab.connect(gone, DENIED)?, Connect::Failed(_)),
            "{gone} reachable after its answer expired\n{}",
            lab.log()
        );
    }
    // The new answer, asked again, is reachable; the old address is not in it and stays
    // closed.
    let again = lab.resolve(MOVING, 4)?;
    assert_eq!(again, [MOVING_NEW.parse::<Ipv4Addr>()?]);
    assert_eq!(
        lab.connect(MOVING_NEW, OPEN)?,
        Connect::Open { retransmits: 0 }
    );
    assert!(matches!(
        lab.connect(MOVING_OLD, DENIED)?,
        Connect::Failed(_)
    ));
    // The denials were policy drops, and the observer shows them: one more toward the
    // short-lived address than before its query, two toward the old one.
    lab.wait_for_policy_drops(SHORT.1, short_drops + 1)?;
    lab.wait_for_policy_drops(MOVING_OLD, 2)?;
    drop(lab);
    Ok(())
}
