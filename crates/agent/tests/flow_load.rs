//! Load: datapath events generated at a known rate go through the agent's event task (drain,
//! enrichment against a real `Manager` with 100 endpoints, the observer's ring and metrics) to
//! a reader following the ring. Delivered plus counted-as-lost must equal generated.
//! A drop by policy is two flows, as in Hubble (its policy verdict, then the drop): the
//! accounting counts flows, and the events delivered are the flows less those companions.
//!
//! The generator stands in for the kernel: a thread filling a bounded event ring (16,384
//! events, the kernel ring's 1 MiB at 64 bytes an event) that counts what did not fit, as the
//! kernel's `events_lost` counter does. The agent side (event task and reader) runs on a
//! single-threaded runtime pinned to one CPU.
//!
//! `flow_load_sweep` (ignored; run it in release) finds the highest rate with zero loss:
//! `cargo test --release -p weir-agent --test flow_load -- --ignored --nocapture`

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use weir_agent::manager::{EndpointSpec, Manager, ManagerConfig};
use weir_agent::observe::{AgentObserver, spawn_event_pump};
use weir_datapath::{
    Counters, CtRecord, Datapath, DatapathError, DatapathEvent, EndpointAttachment, EndpointId,
    EventKind, FakeDatapath,
};
use weir_identity::Identity;
use weir_observe::proto::flow::LostEventSource;
use weir_observe::{Event, Observer, ObserverConfig};
use weir_policy_compiler::{EntryAction, MapStateDiff, PolicyKey};
use weir_policy_model::{Direction, parse_policies};

const RING_EVENTS: usize = 16_384;
const ENDPOINTS: u32 = 100;

/// The kernel's event ring as the agent sees it.
#[derive(Default)]
struct EventRing {
    queue: Mutex<VecDeque<DatapathEvent>>,
    lost: AtomicU64,
    /// Policy drops that went in: each becomes two flows.
    policy_drops: AtomicU64,
}

impl EventRing {
    fn push(&self, ev: DatapathEvent) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= RING_EVENTS {
            self.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            if ev.kind == EventKind::Drop && ev.drop_reason == 133 {
                self.policy_drops.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(ev);
        }
    }
}

/// The fake datapath with a bounded, lossy event ring.
struct RingDatapath {
    inner: FakeDatapath,
    ring: Arc<EventRing>,
}

impl Datapath for RingDatapath {
    fn attach_endpoint(&mut self, e: &EndpointAttachment) -> Result<(), DatapathError> {
        self.inner.attach_endpoint(e)
    }
    fn detach_endpoint(&mut self, e: &EndpointAttachment) -> Result<(), DatapathError> {
        self.inner.detach_endpoint(e)
    }
    fn apply_policy_diff(&mut self, e: EndpointId, d: &MapStateDiff) -> Result<(), DatapathError> {
        self.inner.apply_policy_diff(e, d)
    }
    fn upsert_ipcache(&mut self, p: IpNet, i: Identity) -> Result<(), DatapathError> {
        self.inner.upsert_ipcache(p, i)
    }
    fn remove_ipcache(&mut self, p: IpNet) -> Result<(), DatapathError> {
        self.inner.remove_ipcache(p)
    }
    fn dump_policy(
        &self,
        e: EndpointId,
    ) -> Result<BTreeMap<PolicyKey, EntryAction>, DatapathError> {
        self.inner.dump_policy(e)
    }
    fn list_ipcache(&self) -> Result<Vec<(IpNet, Identity)>, DatapathError> {
        self.inner.list_ipcache()
    }
    fn list_conntrack(&self) -> Result<Vec<CtRecord>, DatapathError> {
        self.inner.list_conntrack()
    }
    fn gc_conntrack(&mut self) -> Result<usize, DatapathError> {
        self.inner.gc_conntrack()
    }
    fn drain_events(&mut self) -> Result<Vec<DatapathEvent>, DatapathError> {
        let mut q = self.ring.queue.lock().unwrap_or_else(|e| e.into_inner());
        Ok(q.drain(..).collect())
    }
    fn counters(&self) -> Result<Counters, DatapathError> {
        Ok(Counters {
            events_lost: self.ring.lost.load(Ordering::Relaxed),
            ..Counters::default()
        })
    }
}

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-frontend, namespace: prod}
spec:
  endpointSelector: {matchExpressions: [{key: tier, operator: In, values: [backend]}]}
  ingress:
    - fromEndpoints: [{matchLabels: {tier: frontend}}]
      toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
    - fromEndpoints: [{matchLabels: {tier: edge}}]
      toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET}]}}]
";

fn v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

fn v6(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16))
}

/// A node with 100 endpoints (IPv4 and IPv6) under one policy.
fn node(ring: Arc<EventRing>) -> Manager<RingDatapath> {
    let dp = RingDatapath {
        inner: FakeDatapath::new(),
        ring,
    };
    let mut m = Manager::new(ManagerConfig::default(), dp).expect("manager");
    for i in 1..=ENDPOINTS {
        let tier = ["backend", "frontend", "edge"][(i % 3) as usize];
        let labels = [
            ("app".to_string(), format!("app-{}", i % 40)),
            ("tier".to_string(), tier.to_string()),
            ("version".to_string(), format!("v{}", i % 4)),
        ];
        m.create_endpoint(EndpointSpec {
            container_id: format!("c-{i}"),
            netns_path: format!("/run/netns/p{i}"),
            ifname: "eth0".into(),
            host_ifname: format!("lxc{i}"),
            addresses: vec![v4(i), v6(i)],
            namespace: "prod".into(),
            pod_name: format!("app-{}-{i:05}", i % 40),
            labels: labels.into_iter().collect(),
            named_ports: BTreeMap::new(),
        })
        .expect("endpoint");
    }
    let path = PathBuf::from("policy.yaml");
    m.load_policy_file(Path::new(&path), parse_policies("policy.yaml", POLICY))
        .expect("policy");
    m
}

/// 50 % default-deny drops from remote addresses, 35 % allowed connections between
/// endpoints, 15 % redirects; a third IPv6.
fn event(n: u64, identities: &[Identity]) -> DatapathEvent {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef;
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    let local = 1 + (x % u64::from(ENDPOINTS)) as u32;
    let peer = 1 + ((x >> 8) % u64::from(ENDPOINTS)) as u32;
    let ipv6 = (x >> 16).is_multiple_of(3);
    let addr = |i| if ipv6 { v6(i) } else { v4(i) };
    let roll = (x >> 20) % 100;
    let peer_identity = identities
        .get(peer as usize - 1)
        .copied()
        .unwrap_or(Identity(2));
    let (kind, reason, dport, proxy_port, src, src_identity) = if roll < 50 {
        let remote = 1_000 + ((x >> 28) % 50_000) as u32;
        let port = 1 + ((x >> 40) % 1024) as u16;
        (EventKind::Drop, 133, port, 0, addr(remote), Identity(2))
    } else if roll < 85 {
        (EventKind::AllowNew, 0, 8080, 0, addr(peer), peer_identity)
    } else {
        (
            EventKind::RedirectNew,
            0,
            80,
            15001,
            addr(peer),
            peer_identity,
        )
    };
    DatapathEvent {
        timestamp_ns: n,
        kind,
        drop_reason: reason,
        direction: Direction::Ingress,
        protocol: 6,
        src: Some(src),
        dst: Some(addr(local)),
        sport: 32_768 + (x >> 48) as u16 % 28_000,
        dport,
        tcp_flags: 0x02,
        src_identity,
        dst_identity: identities
            .get(local as usize - 1)
            .copied()
            .unwrap_or(Identity(2)),
        endpoint_id: EndpointId(local),
        ifindex: 10 + local,
        proxy_port,
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch it. Failure (fewer CPUs) leaves the thread unpinned, which is fine for a test.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Whether a flow is the policy verdict of a drop (its drop flow follows).
fn is_policy_drop_verdict(f: &weir_observe::proto::flow::Flow) -> bool {
    f.event_type.as_ref().map(|t| t.r#type) == Some(weir_observe::model::EVENT_POLICY_VERDICT)
        && f.verdict == weir_observe::proto::flow::Verdict::Dropped as i32
}

/// What one run at a given rate gave.
#[derive(Debug)]
struct Outcome {
    generated: u64,
    /// Events delivered (flows less policy-verdict companions of drops).
    delivered: u64,
    /// Flows delivered.
    delivered_flows: u64,
    /// Flows the events that reached the agent make (policy drops make two).
    flows_made: u64,
    lost_datapath: u64,
    lost_ring: u64,
    /// CPU time of the agent-side thread over the run, as a share of the wall time.
    cpu_share: f64,
}

fn run(rate: u64, seconds: u64) -> Outcome {
    let ring = Arc::new(EventRing::default());
    let manager = node(ring.clone());
    let identities: Vec<Identity> = manager.endpoints().map(|e| e.identity).collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let done = Arc::new(AtomicBool::new(false));
    let generated = Arc::new(AtomicU64::new(0));
    let observer = Arc::new(Observer::new(ObserverConfig::default()));
    let obs = Arc::new(AgentObserver::new(observer.clone(), "load-node"));
    if cpus > 1 {
        pin_to_cpu(1);
    }
    let cpu0 = thread_cpu_time();
    let started = Instant::now();
    let (delivered_flows, companions, lost_datapath, lost_ring) = rt.block_on(async {
        let manager = Arc::new(tokio::sync::Mutex::new(manager));
        let mut follower = observer.follow();
        let pump = spawn_event_pump(manager, obs);
        let generator = {
            let (ring, done, generated) = (ring.clone(), done.clone(), generated.clone());
            std::thread::spawn(move || {
                if cpus > 1 {
                    pin_to_cpu(0);
                }
                let start = Instant::now();
                let total = rate * seconds;
                let mut n = 0u64;
                while n < total {
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                    while n < due.min(total) {
                        ring.push(event(n, &identities));
                        n += 1;
                    }
                    generated.store(n, Ordering::Release);
                    std::thread::sleep(Duration::from_micros(500));
                }
                done.store(true, Ordering::Release);
            })
        };
        let (mut delivered, mut companions, mut lost_dp, mut lost_ring) = (0u64, 0u64, 0u64, 0u64);
        let mut last_progress = Instant::now();
        loop {
            let total =
                generated.load(Ordering::Acquire) + ring.policy_drops.load(Ordering::Acquire);
            if done.load(Ordering::Acquire) && delivered + lost_dp + lost_ring >= total {
                break;
            }
            // Liveness guard only (not a performance bound): nothing for 60 s means it stopped.
            if last_progress.elapsed() > Duration::from_secs(60) {
                break;
            }
            let batch =
                tokio::time::timeout(Duration::from_millis(100), follower.next_batch(4096)).await;
            let Ok(Some(batch)) = batch else { continue };
            last_progress = Instant::now();
            if std::env::var_os("FLOW_LOAD_DEBUG").is_some() {
                eprintln!("batch {} at {:?}", batch.len(), started.elapsed());
            }
            for e in batch {
                match e {
                    Event::Flow(f) => {
                        delivered += 1;
                        if is_policy_drop_verdict(&f) {
                            companions += 1;
                        }
                    }
                    Event::Lost(l) if l.source == LostEventSource::PerfEventRingBuffer as i32 => {
                        lost_dp += l.num_events_lost
                    }
                    Event::Lost(l) => lost_ring += l.num_events_lost,
                }
            }
        }
        pump.abort();
        assert!(generator.join().is_ok());
        (delivered, companions, lost_dp, lost_ring)
    });
    let cpu = thread_cpu_time().saturating_sub(cpu0);
    Outcome {
        generated: generated.load(Ordering::Acquire),
        delivered: delivered_flows.saturating_sub(companions),
        delivered_flows,
        flows_made: generated.load(Ordering::Acquire) - lost_datapath
            + ring.policy_drops.load(Ordering::Acquire),
        lost_datapath,
        lost_ring,
        cpu_share: cpu.as_secs_f64() / started.elapsed().as_secs_f64(),
    }
}

#[test]
fn delivered_plus_lost_equals_generated_at_50k_per_second() {
    let o = run(50_000, 2);
    println!("{o:?}");
    assert_eq!(o.generated, 100_000);
    assert_eq!(o.delivered_flows + o.lost_ring, o.flows_made);
    if o.lost_ring == 0 {
        assert_eq!(o.delivered + o.lost_datapath, o.generated);
    }
}

#[test]
#[ignore = "a rate sweep for BENCHMARKS.md; run in release with --nocapture"]
fn flow_load_sweep() {
    let mut best = 0;
    for rate in [
        25_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000, 400_000, 600_000,
    ] {
        let o = run(rate, 3);
        let lost = o.lost_datapath + o.lost_ring;
        println!(
            "rate {rate:>7}/s: generated {:>8} delivered {:>8} lost {:>7} (datapath ring {}, flow ring {}), agent thread CPU {:.0} %",
            o.generated,
            o.delivered,
            lost,
            o.lost_datapath,
            o.lost_ring,
            o.cpu_share * 100.0
        );
        assert_eq!(o.delivered_flows + o.lost_ring, o.flows_made);
        if lost == 0 {
            best = rate;
        }
    }
    println!("highest rate with zero loss: {best}/s");
}
