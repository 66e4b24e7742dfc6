//! Root-only: the real `weir-agent` in a node namespace; a gRPC client generated from Weir's
//! copy of Hubble's observer.proto reads flows and server status, and the metrics endpoint is
//! scraped over HTTP and parsed as Prometheus text. Hubble's policy-verdict flows name the
//! deciding policy; a follow stream (what `weir observe --follow` opens) opened before some
//! traffic receives that traffic's flows.
//!
//! Safety: as in l7_end_to_end.rs, every namespace is `weirobs-<pid>-*`, removed by a Drop
//! guard; the agent runs inside the node namespace with its sockets in a temporary directory.

mod common;

use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weir_observe::model::EVENT_POLICY_VERDICT;
use weir_observe::proto::flow::{EventTypeFilter, Flow, FlowFilter, Verdict};
use weir_observe::proto::observer::observer_client::ObserverClient;
use weir_observe::proto::observer::{GetFlowsRequest, ServerStatusRequest, get_flows_response};

/// Listens on 8080 and 9090 and accepts connections.
const SERVER: &str = r#"
import socket, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.close()
for p in (8080, 9090):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("up", flush=True)
threading.Event().wait()
"#;

/// Prints `ok` when a TCP connection opens within 1 s, else `fail`; binds the source port
/// given as a third argument.
const CONNECT: &str = r#"
import socket, sys
s = socket.socket(); s.settimeout(1)
if len(sys.argv) > 3:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", int(sys.argv[3])))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("ok")
except Exception:
    print("fail")
"#;

/// Prints the body of a GET.
const SCRAPE: &str = r#"
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())
"#;

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-ingress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
";

fn connect(ns: &str, ip: &str, port: u16) -> String {
    connect_from(ns, ip, port, None)
}

fn connect_from(ns: &str, ip: &str, port: u16, source_port: Option<u16>) -> String {
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        ns.into(),
        "python3".into(),
        "-c".into(),
        CONNECT.into(),
        ip.into(),
        port.to_string(),
    ];
    args.extend(source_port.map(|p| p.to_string()));
    Command::new("ip")
        .args(&args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("error {e}"))
}

fn dport(f: &Flow) -> Option<u32> {
    weir_observe::model::ports(f).map(|p| p.1)
}

/// Parses Prometheus text: `name{labels} value` lines into (name with labels, value).
fn parse_prometheus(text: &str) -> Result<HashMap<String, f64>, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line}"))?;
        let v: f64 = value.parse().map_err(|_| format!("bad value: {line}"))?;
        let name = series.split('{').next().unwrap_or("");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad metric name: {line}"));
        }
        if series.contains('{') && !series.ends_with('}') {
            return Err(format!("bad labels: {line}"));
        }
        out.insert(series.to_string(), v);
    }
    Ok(out)
}

#[test]
fn flows_status_and_metrics_from_a_running_agent() -> TestResult {
    if let Some(reason) = skip() {
        eprintln!("SKIP flows_status_and_metrics_from_a_running_agent: {reason}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let prefix = format!("weirobs-{}", std::process::id());
    let mut g = Guard::default();
    let node = g.netns(format!("{prefix}-node"))?;
    let a = g.netns(format!("{prefix}-a"))?;
    let b = g.netns(format!("{prefix}-b"))?;
    let pods = [
        Pod {
            ns: &a,
            host_if: "lxca",
            net: "10.212.1",
            app: "client",
        },
        Pod {
            ns: &b,
            host_if: "lxcb",
            net: "10.212.2",
            app: "server",
        },
    ];
    wire_pods(&node, &pods)?;
    start_server(&mut g, &b, SERVER)?;

    let policies = tmp.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("p.yaml"), POLICY)?;
    let socket: PathBuf = tmp.path().join("agent.sock");
    let hubble: PathBuf = tmp.path().join("hubble.sock");
    let log = tmp.path().join("agent.log");
    let agent = Command::new("ip")
        .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_weir-agent")])
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--bpffs")
        .arg(tmp.path().join("bpf"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--policy-dir")
        .arg(&policies)
        .args(["--node-name", "obs-node", "--no-proxies"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    g.children.push(agent);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    register_pods(&rt, &socket, &log, &prefix, &pods)?;

    assert_eq!(connect(&a, "10.212.2.2", 8080), "ok", "{}", agent_log(&log));
    assert_eq!(
        connect(&a, "10.212.2.2", 9090),
        "fail",
        "{}",
        agent_log(&log)
    );

    let mut observer =
        ObserverClient::new(rt.block_on(weir_observe::server::connect_unix(&hubble))?);
    let read = |observer: &mut ObserverClient<_>,
                filter: FlowFilter|
     -> Result<Vec<Flow>, Box<dyn std::error::Error>> {
        let req = GetFlowsRequest {
            number: 100,
            whitelist: vec![filter],
            ..Default::default()
        };
        rt.block_on(async {
            let mut s = observer.get_flows(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(r) = s.message().await? {
                if let Some(get_flows_response::ResponseTypes::Flow(f)) = r.response_types {
                    out.push(f);
                }
            }
            Ok(out)
        })
    };
    let dropped_filter = FlowFilter {
        verdict: vec![Verdict::Dropped as i32],
        destination_pod: vec!["prod/server".into()],
        // The node's own MLD reports to the pod are dropped too (world, no
        // rule); this test is about the TCP connection it made.
        destination_port: vec!["9090".into()],
        ..Default::default()
    };
    let allowed_filter = FlowFilter {
        verdict: vec![Verdict::Forwarded as i32],
        destination_port: vec!["8080".into()],
        traffic_direction: vec![1],
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (dropped, allowed) = loop {
        let d = read(&mut observer, dropped_filter.clone())?;
        let a = read(&mut observer, allowed_filter.clone())?;
        if (!d.is_empty() && !a.is_empty()) || Instant::now() > deadline {
            break (d, a);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let denied = dropped
        .first()
        .ok_or_else(|| format!("no drop flow\n{}", agent_log(&log)))?;
    assert_eq!(
        dport(denied),
        Some(9090),
        "{denied:?}\nall drops: {dropped:?}"
    );
    assert_eq!(denied.drop_reason_desc, 133);
    assert_eq!(denied.node_name, "obs-node");
    let (src, dst) = (
        denied.source.clone().unwrap_or_default(),
        denied.destination.clone().unwrap_or_default(),
    );
    assert_eq!(
        (src.namespace.as_str(), src.pod_name.as_str()),
        ("prod", "client")
    );
    assert_eq!(dst.pod_name, "server");
    assert!(src.identity >= 256 && dst.identity >= 256 && src.identity != dst.identity);
    assert!(
        dst.labels.iter().any(|l| l == "k8s:app=server"),
        "{:?}",
        dst.labels
    );
    assert_eq!(
        denied.weir_policy_decision,
        "denied (default deny): selected by prod/server-ingress; no rule allowed this"
    );
    assert_eq!(
        denied.ingress_denied_by.first().map(|p| p.name.as_str()),
        Some("server-ingress")
    );

    let allow = allowed.first().ok_or("no allowed flow")?;
    assert_eq!(
        allow.source.as_ref().map(|e| e.pod_name.as_str()),
        Some("client")
    );
    assert_eq!(
        allow.weir_deciding_rules,
        vec!["prod/server-ingress ingress[0]"]
    );
    assert_eq!(
        allow
            .ingress_allowed_by
            .first()
            .map(|p| p.namespace.as_str()),
        Some("prod")
    );

    let status = rt
        .block_on(observer.server_status(ServerStatusRequest {}))?
        .into_inner();
    assert_eq!(status.max_flows, 4095);
    assert!(status.num_flows >= 2 && status.seen_flows >= status.num_flows);
    stock_grpc_client_reads_the_same(&hubble, tmp.path())?;

    let text = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node,
            "python3",
            "-c",
            SCRAPE,
            "http://127.0.0.1:9965/metrics",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    let metrics = parse_prometheus(&text)?;
    let drops = metrics
        .get("hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"TCP\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(drops >= 1.0, "{text}");
    assert!(
        metrics
            .keys()
            .any(|k| k.starts_with("hubble_flows_processed_total{")),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node,
                "python3",
                "-c",
                SCRAPE,
                "http://127.0.0.1:9965/metrics",
            ])
            .output()?;
        let m = parse_prometheus(&String::from_utf8_lossy(&text.stdout))?;
        if m.get("weir_endpoints").copied() == Some(2.0) {
            break;
        }
        assert!(Instant::now() < deadline, "weir_endpoints never reached 2");
        std::thread::sleep(Duration::from_millis(200));
    }

    // `--type policy-verdict`: the allowed connection's first packet and the policy drop,
    // each naming the policy that decided it.
    let verdicts = read(
        &mut observer,
        FlowFilter {
            event_type: vec![EventTypeFilter {
                r#type: EVENT_POLICY_VERDICT,
                ..Default::default()
            }],
            destination_pod: vec!["prod/server".into()],
            traffic_direction: vec![1],
            ..Default::default()
        },
    )?;
    let allowed_verdict = verdicts
        .iter()
        .find(|f| dport(f) == Some(8080) && f.verdict == Verdict::Forwarded as i32)
        .ok_or_else(|| format!("no allowed policy verdict in {verdicts:?}"))?;
    assert_eq!(
        allowed_verdict
            .ingress_allowed_by
            .first()
            .map(|p| p.name.as_str()),
        Some("server-ingress")
    );
    let denied_verdict = verdicts
        .iter()
        .find(|f| dport(f) == Some(9090) && f.verdict == Verdict::Dropped as i32)
        .ok_or_else(|| format!("no denied policy verdict in {verdicts:?}"))?;
    assert_eq!(denied_verdict.drop_reason_desc, 133);
    assert_eq!(
        denied_verdict
            .ingress_denied_by
            .first()
            .map(|p| p.name.as_str()),
        Some("server-ingress")
    );
    // The drop is also a drop flow (`--type drop`), a separate flow.
    let drop_flow = dropped
        .iter()
        .find(|f| f.event_type.as_ref().map(|t| t.r#type) == Some(weir_observe::model::EVENT_DROP))
        .ok_or_else(|| format!("no drop event flow in {dropped:?}"))?;
    assert_ne!(denied_verdict.uuid, drop_flow.uuid);

    // `weir observe --follow --port 61001 --port 61002`: the stream opens first (no history
    // is sent: number 0), then traffic from those source ports is made; its flows must
    // arrive on the open stream.
    const FOLLOW_PORTS: [u16; 2] = [61001, 61002];
    let ports: Vec<String> = FOLLOW_PORTS.iter().map(ToString::to_string).collect();
    let follow = GetFlowsRequest {
        number: 0,
        follow: true,
        whitelist: vec![
            FlowFilter {
                source_port: ports.clone(),
                ..Default::default()
            },
            FlowFilter {
                destination_port: ports,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let followed: Vec<Flow> = rt.block_on(async {
        let mut stream = observer.get_flows(follow).await?.into_inner();
        let allowed = connect_from(&a, "10.212.2.2", 8080, Some(FOLLOW_PORTS[0]));
        let denied = connect_from(&a, "10.212.2.2", 9090, Some(FOLLOW_PORTS[1]));
        assert_eq!((allowed.as_str(), denied.as_str()), ("ok", "fail"));
        let mut got = Vec::new();
        // Liveness only: flows come within milliseconds; 20 s means they never will.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let complete = |got: &[Flow]| {
            let seen = |sport: u32, verdict: Verdict| {
                got.iter().any(|f| {
                    weir_observe::model::ports(f).map(|p| p.0) == Some(sport)
                        && f.verdict == verdict as i32
                })
            };
            seen(61001, Verdict::Forwarded) && seen(61002, Verdict::Dropped)
        };
        while !complete(&got) {
            let msg = tokio::time::timeout_at(deadline, stream.message()).await;
            let Ok(msg) = msg else { break };
            match msg? {
                Some(r) => {
                    if let Some(get_flows_response::ResponseTypes::Flow(f)) = r.response_types {
                        got.push(f);
                    }
                }
                None => break,
            }
        }
        Ok::<_, Box<dyn std::error::Error>>(got)
    })?;
    let summary: Vec<String> = followed
        .iter()
        .map(|f| {
            format!(
                "{:?} {:?} {}",
                weir_observe::model::ports(f),
                f.event_type,
                f.verdict
            )
        })
        .collect();
    let allowed_new = followed
        .iter()
        .find(|f| {
            weir_observe::model::ports(f) == Some((61001, 8080))
                && f.verdict == Verdict::Forwarded as i32
        })
        .ok_or_else(|| format!("no followed allowed flow: {summary:?}\n{}", agent_log(&log)))?;
    assert_eq!(
        allowed_new.source.as_ref().map(|e| e.pod_name.as_str()),
        Some("client")
    );
    let dropped_new = followed
        .iter()
        .filter(|f| weir_observe::model::ports(f) == Some((61002, 9090)))
        .filter(|f| f.verdict == Verdict::Dropped as i32)
        .count();
    assert!(dropped_new >= 1, "{summary:?}");
    drop(rt);
    Ok(())
}

/// A stock gRPC client, not Weir's: Python's grpcio with messages protoc generated from
/// Weir's `observer.proto`, reading server status and the dropped flows over the socket.
fn stock_grpc_client_reads_the_same(hubble: &Path, tmp: &Path) -> TestResult {
    // Debian's python3-grpcio lives under the system interpreter, which a pyenv or venv
    // earlier on PATH would hide.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let probe = Command::new(python)
        .args(["-c", "import grpc, google.protobuf"])
        .status();
    if !have("protoc") || !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIP the stock gRPC client check: protoc or python3-grpcio missing (scripts/setup installs them)"
        );
        return Ok(());
    }
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../observe/proto");
    let gen_dir = tmp.join("pygen");
    std::fs::create_dir_all(&gen_dir)?;
    let out = Command::new("protoc")
        .arg("-I")
        .arg(&proto)
        .arg("-I/usr/include")
        .arg(format!("--python_out={}", gen_dir.display()))
        .args(["flow/flow.proto", "observer/observer.proto"])
        .output()?;
    assert!(
        out.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/hubble_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&gen_dir)
        .arg(hubble)
        .arg("9090")
        .output()?;
    assert!(
        out.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["max_flows"], 4095, "{v}");
    assert!(v["num_flows"].as_u64().is_some_and(|n| n >= 2), "{v}");
    let flows = v["flows"].as_array().ok_or("no flows array")?;
    let drop = flows
        .iter()
        .find(|f| f["source_pod"] == "client")
        .ok_or_else(|| format!("no drop from the client in {v}"))?;
    assert_eq!(drop["verdict"], "DROPPED", "{v}");
    assert_eq!(drop["drop_reason"], 133, "{v}");
    assert_eq!(drop["destination_pod"], "server", "{v}");
    assert_eq!(drop["destination_port"], 9090, "{v}");
    assert_eq!(drop["node_name"], "obs-node", "{v}");
    Ok(())
}
