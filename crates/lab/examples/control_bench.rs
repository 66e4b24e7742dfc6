//! Agent control-plane figures on a real lab (root): endpoint ADD→READY and churn against the
//! reference `ptp` CNI plugin, and policy change → enforcement against iptables, each pair
//! measured side by side in one run, and the agent's memory with 100 and 1,000 endpoints. Driven by `bench/agent-control.sh`; prints one
//! `FIGURE name value` line per figure.
//!
//! Usage: control_bench BIN_DIR [ROUNDS]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weir_lab::cluster::{ClusterSpec, PodSpec};
use weir_lab::{Lab, LabConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const CLIENT_IP: &str = "10.0.1.30";
const SERVER: &str = "10.0.1.20:8080";

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn figure(name: &str, value: f64) {
    println!("FIGURE {name} {value:.3}");
}

fn connects(lab: &Lab, pod: &str) -> Res<bool> {
    let ns = weir_lab::sys::netns_path(&lab.pod(pod).ok_or("no pod")?.netns);
    let to: SocketAddr = SERVER.parse()?;
    Ok(weir_lab::sys::in_netns(&ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok()
    })?)
}

fn pod(name: &str, ip: [u8; 4]) -> PodSpec {
    PodSpec {
        name: name.into(),
        namespace: "production".into(),
        labels: [("app".to_string(), "churn".to_string())].into(),
        ip: ip.into(),
        named_ports: Default::default(),
        tcp_ports: Default::default(),
        udp_ports: Default::default(),
        service_account: "default".into(),
    }
}

/// The reference `ptp` plugin (veth + host-local IPAM, no policy) for one pod.
fn ptp(lab: &Lab, command: &str, netns: &str, id: &str) -> Res<Duration> {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "benchptp", "type": "ptp",
        "ipam": {"type": "host-local", "subnet": "10.9.0.0/16",
                 "dataDir": lab.config().dir.join("ptp-ipam")},
    });
    let start = Instant::now();
    let mut child = weir_lab::sys::nsenter(&lab.config().node_ns(), "/usr/lib/cni/ptp")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", weir_lab::sys::netns_path(netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(conf.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        return Err(format!("ptp {command}: {}", String::from_utf8_lossy(&out.stdout)).into());
    }
    Ok(took)
}

fn churn(lab: &mut Lab, rounds: usize) -> Res<()> {
    let (mut weir_add, mut ptp_add) = (Vec::new(), Vec::new());
    let (mut weir_cycle, mut ptp_cycle) = (Duration::ZERO, Duration::ZERO);
    for i in 0..rounds {
        // Alternate which one goes first, so neither always runs on a warmer machine.
        for first in [i % 2 == 0, i % 2 == 1] {
            if first {
                let p = pod(&format!("churn-{i}"), [10, 0, 9, 10]);
                let start = Instant::now();
                let times = lab.add_pods(std::slice::from_ref(&p))?;
                weir_add.extend(times.iter().map(|(_, d)| ms(*d)));
                lab.remove_pods(|q| q.spec.name == p.name)?;
                weir_cycle += start.elapsed();
            } else {
                let ns = format!("{}ptp{i}", lab.config().prefix);
                weir_lab::sys::ip(&["netns", "add", &ns])?;
                let start = Instant::now();
                let add = ptp(lab, "ADD", &ns, &format!("ptp{i}"))?;
                ptp(lab, "DEL", &ns, &format!("ptp{i}"))?;
                ptp_cycle += start.elapsed();
                weir_lab::sys::ip(&["netns", "del", &ns])?;
                ptp_add.push(ms(add));
            }
        }
    }
    let (w50, p50) = (pct(&mut weir_add, 0.5), pct(&mut ptp_add, 0.5));
    figure("add_ready_p50_ms_weir", w50);
    figure("add_ready_p90_ms_weir", pct(&mut weir_add, 0.9));
    figure("add_p50_ms_ptp", p50);
    figure("add_ready_over_ptp", w50 / p50);
    let rate = |d: Duration| 2.0 * rounds as f64 / d.as_secs_f64();
    figure("churn_per_s_weir", rate(weir_cycle));
    figure("churn_per_s_ptp", rate(ptp_cycle));
    figure("churn_weir_over_ptp", rate(weir_cycle) / rate(ptp_cycle));
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Res<Duration> {
    let start = Instant::now();
    let out = cmd.stdin(Stdio::null()).output()?;
    let took = start.elapsed();
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(took)
}

fn policy_latency(lab: &mut Lab, bin_dir: &Path, text: &str, rounds: usize) -> Res<()> {
    let dir = lab.config().dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let deny = dir.join("deny.yaml");
    let allow = dir.join("allow.yaml");
    // Two versions of one policy: the client (app=reporting) denied, then allowed.
    std::fs::write(&deny, text)?;
    std::fs::write(&allow, text.replace("app: frontend", "app: reporting"))?;
    let weir = bin_dir.join("weir");
    let socket = lab.config().socket();
    let server_ns = lab.pod("backend-1").ok_or("no backend")?.netns.clone();
    let (mut api, mut ipt, mut watched) = (Vec::new(), Vec::new(), Vec::new());
    let mut wrong = 0usize;
    for i in 0..rounds {
        // `weir policy import`: the command returns once the change is in the kernel.
        for (file, want) in [(&deny, false), (&allow, true)] {
            let d = run_ok(
                Command::new(&weir)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["policy", "import"])
                    .arg(file),
            )?;
            api.push(ms(d));
            if connects(lab, "reporting-1")? != want {
                wrong += 1;
            }
        }
        // The baseline: one iptables rule in the server's namespace, added then deleted.
        for (op, want) in [("-I", false), ("-D", true)] {
            let d = run_ok(weir_lab::sys::nsenter(&server_ns, "iptables").args([
                op, "INPUT", "-s", CLIENT_IP, "-p", "tcp", "--dport", "8080", "-j", "DROP",
            ]))?;
            ipt.push(ms(d));
            if connects(lab, "reporting-1")? != want {
                wrong += 1;
            }
        }
        // The watched directory: a file renamed in, until the agent reports the new revision
        // (it answers status only once the change is applied).
        let before = lab.status()?.policy_revision;
        let src = if i % 2 == 0 { &deny } else { &allow };
        let tmp = lab.config().policy_dir().join(".bench.tmp");
        std::fs::copy(src, &tmp)?;
        let start = Instant::now();
        std::fs::rename(&tmp, lab.config().policy_dir().join("bench.yaml"))?;
        while lab.status()?.policy_revision == before {
            if start.elapsed() > Duration::from_secs(5) {
                return Err("the watcher did not apply the file in 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        watched.push(ms(start.elapsed()));
        std::fs::remove_file(lab.config().policy_dir().join("bench.yaml"))?;
        lab.wait_policy_settled(lab.status()?.policy_revision)?;
    }
    let (a50, i50) = (pct(&mut api, 0.5), pct(&mut ipt, 0.5));
    figure("policy_import_p50_ms", a50);
    figure("policy_import_p90_ms", pct(&mut api, 0.9));
    figure("iptables_rule_p50_ms", i50);
    figure("policy_import_over_iptables", a50 / i50);
    figure("policy_file_to_enforced_p50_ms", pct(&mut watched, 0.5));
    figure("policy_file_to_enforced_p90_ms", pct(&mut watched, 0.9));
    figure(
        "policy_file_over_poll_period",
        pct(&mut watched, 0.5) / lab.config().policy_poll_ms as f64,
    );
    figure("wrong_verdicts_after_change", wrong as f64);
    Ok(())
}

/// The agent's resident memory, in KiB.
fn agent_rss_kib(lab: &Lab) -> Res<f64> {
    let pid = lab.state().agent_pid.ok_or("agent not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .ok_or("no VmRSS")?;
    Ok(kib)
}

/// Agent memory as local endpoints are added: RSS with the seed lab, then with 100 and 1,000
/// more pods (ten pods per deployment, so one identity per ten pods, as in a real cluster).
fn memory(lab: &mut Lab) -> Res<()> {
    let before = agent_rss_kib(lab)?;
    let mut added = 0usize;
    let mut at = Vec::new();
    for target in [100usize, 1000] {
        while added < target {
            let batch: Vec<PodSpec> = (added..(added + 50).min(target))
                .map(|i| {
                    let mut p = pod(
                        &format!("mem-{i}"),
                        [10, 0, 100 + (i / 250) as u8, (i % 250) as u8 + 2],
                    );
                    p.labels = [("app".to_string(), format!("mem-{}", i / 10))].into();
                    p
                })
                .collect();
            added += batch.len();
            lab.add_pods(&batch)?;
        }
        // Let allocator arenas settle after the burst of threads.
        std::thread::sleep(Duration::from_millis(500));
        let rss = agent_rss_kib(lab)?;
        at.push(rss);
        figure(&format!("agent_rss_mib_{target}_endpoints"), rss / 1024.0);
    }
    figure("agent_rss_mib_seed_lab", before / 1024.0);
    if let [r100, r1000] = at[..] {
        figure("agent_kib_per_endpoint_100_to_1000", (r1000 - r100) / 900.0);
        figure("agent_rss_1000_over_seed", r1000 / before);
    }
    let endpoints = lab.endpoints()?.len();
    figure("endpoints_ready", endpoints as f64);
    lab.remove_pods(|q| q.spec.name.starts_with("mem-"))?;
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let bin_dir = PathBuf::from(args.next().ok_or("usage: control_bench BIN_DIR [ROUNDS]")?);
    let rounds: usize = args.next().map_or(Ok(20), |r| r.parse())?;
    let dir = std::env::temp_dir().join(format!("weirbench-{}", std::process::id()));
    let cfg = LabConfig::new(&format!("weirbn{}-", std::process::id()), &dir, &bin_dir);
    let mut lab = Lab::up(cfg)?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text =
        std::fs::read_to_string(repo.join("examples/seed/02-allow-frontend-to-backend.yaml"))?;
    let s = weir_scenario::parse_scenario("02.yaml", &text).map_err(|e| format!("{e:?}"))?;
    let mut spec = ClusterSpec::from_scenario(&s);
    let policy = spec.policies.pop().ok_or("no policy")?;
    lab.apply(&spec)?;
    println!(
        "# {} rounds; load {}",
        rounds,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    // Churn with a policy in place (the new endpoint's policy is compiled and installed).
    lab.write_policy("base.yaml", &policy.text)?;
    lab.wait_policy_settled(0)?;
    churn(&mut lab, rounds)?;
    lab.remove_policy("base.yaml")?;
    lab.wait_policy_settled(lab.status()?.policy_revision)?;
    policy_latency(&mut lab, &bin_dir, &policy.text, rounds)?;
    lab.write_policy("base.yaml", &policy.text)?;
    lab.wait_policy_settled(lab.status()?.policy_revision)?;
    memory(&mut lab)?;
    lab.down()?;
    Ok(())
}
