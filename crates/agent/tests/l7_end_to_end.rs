//! Root-only: the real `weir-agent` binary, in a node namespace, enforcing an egress HTTP rule
//! through its transparent proxy on real traffic between two pod namespaces.
//!
//! Safety: nothing here touches the root namespace's networking. Every namespace is named
//! `weirl7-<pid>-*` and removed by a Drop guard even when an assertion fails; the agent runs
//! inside the node namespace (`ip netns exec`, which also gives it a private mount namespace,
//! so its bpffs mount on a temporary directory is private), and its state, policies and API
//! socket live in a temporary directory. The agent process is killed by its guard.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weir_agent_api::v1::FqdnCacheListRequest;
use weir_agent_api::v1::inspect_service_client::InspectServiceClient;

/// Answers every GET with 200 and the path.
const SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("hello " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H)
print("up", flush=True)
s.serve_forever()
"#;

/// Prints `<status> <body>` of one GET, or `error <reason>`.
const CLIENT: &str = r#"
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3)
    print(r.status, r.read().decode().strip())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().strip())
except Exception as e:
    print("error", e)
"#;

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-l7, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints: [{matchLabels: {app: server}}]
      toPorts:
        - ports: [{port: '8080', protocol: TCP}]
          rules:
            http: [{method: GET, path: /allowed}, {method: GET, path: /ingress-denied}]
";

/// The server's own ingress HTTP rule: a connection the client's egress proxy already
/// judged is judged again by the ingress proxy, for the client's identity.
const INGRESS_POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-l7, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
        - ports: [{port: '8080', protocol: TCP}]
          rules:
            http: [{method: GET, path: /allowed}]
";

/// GETs `url` until the answer is `want` (a policy file change takes effect within a second
/// or so), returning the last answer.
fn get_until(ns: &str, url: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let got = get(ns, url);
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const DNS_POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-dns, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints: [{matchLabels: {app: server}}]
      toPorts:
        - ports: [{port: '53', protocol: ANY}]
          rules:
            dns: [{matchPattern: '*.example.com'}]
    - toFQDNs: [{matchName: api.example.com}]
      toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
";

fn get(ns: &str, url: &str) -> String {
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", CLIENT, url])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("error {e}"))
}

#[test]
fn egress_http_rule_enforced_by_the_agents_proxy() -> TestResult {
    if let Some(reason) = skip() {
        eprintln!("SKIP egress_http_rule_enforced_by_the_agents_proxy: {reason}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let prefix = format!("weirl7-{}", std::process::id());
    let mut g = Guard::default();
    let node = g.netns(format!("{prefix}-node"))?;
    let a = g.netns(format!("{prefix}-a"))?;
    let b = g.netns(format!("{prefix}-b"))?;
    let pods = [
        Pod {
            ns: &a,
            host_if: "lxca",
            net: "10.211.1",
            app: "client",
        },
        Pod {
            ns: &b,
            host_if: "lxcb",
            net: "10.211.2",
            app: "server",
        },
    ];
    wire_pods(&node, &pods)?;

    // Pod B's HTTP server.
    start_server(&mut g, &b, SERVER)?;

    // The agent, in the node namespace.
    let policies = tmp.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("l7.yaml"), POLICY)?;
    let socket: PathBuf = tmp.path().join("agent.sock");
    let log = tmp.path().join("agent.log");
    // Settings from a configuration file, as an operator would deploy it; the flag given
    // on the command line overrides the file's (wrong) socket path.
    let config = tmp.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "# weir-agent settings\nstate-dir: {}\nbpffs: {}\npolicy-dir: {}\napi-socket: /nonexistent/agent.sock\n",
            tmp.path().join("state").display(),
            tmp.path().join("bpf").display(),
            policies.display()
        ),
    )?;
    let agent = Command::new("ip")
        .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_weir-agent")])
        .arg("--config")
        .arg(&config)
        .arg("--api-socket")
        .arg(&socket)
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

    let base = "http://10.211.2.2:8080";
    let allowed = get(&a, &format!("{base}/allowed"));
    let denied = get(&a, &format!("{base}/denied"));
    let again = get(&a, &format!("{base}/allowed"));
    let log_text = agent_log(&log);
    assert_eq!(allowed, "200 hello /allowed", "agent log:\n{log_text}");
    assert_eq!(denied, "403 Access denied", "agent log:\n{log_text}");
    assert_eq!(again, "200 hello /allowed", "agent log:\n{log_text}");

    // Egress and ingress L7 on one connection: two proxies in a row. Before the server has
    // a rule of its own, the egress rule alone decides.
    let both = format!("{base}/ingress-denied");
    assert_eq!(get(&a, &both), "200 hello /ingress-denied");
    std::fs::write(policies.join("ingress-l7.yaml"), INGRESS_POLICY)?;
    let by_ingress = get_until(&a, &both, "403 Access denied");
    let through_both = get(&a, &format!("{base}/allowed"));
    let by_egress = get(&a, &format!("{base}/denied"));
    let log_text = agent_log(&log);
    assert_eq!(by_ingress, "403 Access denied", "agent log:\n{log_text}");
    // The ingress proxy judged the client (its rule is for app=client only), not the node.
    assert_eq!(through_both, "200 hello /allowed", "agent log:\n{log_text}");
    assert_eq!(by_egress, "403 Access denied", "agent log:\n{log_text}");
    // The DNS part below needs the server open to the client again.
    std::fs::remove_file(policies.join("ingress-l7.yaml"))?;
    assert_eq!(
        get_until(&a, &both, "200 hello /ingress-denied"),
        "200 hello /ingress-denied"
    );

    if !have("dnsmasq") || !have("dig") {
        eprintln!("SKIP the DNS part: needs dnsmasq and dig");
        return Ok(());
    }
    // DNS over TCP, then UDP: dnsmasq in pod B answers api.example.com with an address
    // outside every endpoint, in a "world" namespace where an HTTP server listens too. It
    // becomes reachable only once the proxy has seen the answer. (Not an extra address of
    // pod B: a pod's packets must come from its own address.)
    let w = g.netns(format!("{prefix}-w"))?;
    wire_pod(
        &node,
        &Pod {
            ns: &w,
            host_if: "lxcw",
            net: "10.211.9",
            app: "world",
        },
    )?;
    start_server(&mut g, &w, SERVER)?;
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            &b,
            "dnsmasq",
            "-k",
            "--no-resolv",
            "--no-hosts",
        ])
        .args([
            "--listen-address=10.211.2.2",
            "--bind-interfaces",
            "--port=53",
        ])
        .args(["--address=/api.example.com/10.211.9.2", "--local-ttl=60"])
        .args(["--pid-file=", "--user=root"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    g.children.push(dnsmasq);
    std::fs::write(policies.join("dns.yaml"), DNS_POLICY)?;
    std::thread::sleep(Duration::from_millis(1500));
    let world = "http://10.211.9.2:8080/x";
    let before = get(&a, world);
    assert!(
        before.starts_with("error"),
        "reachable before the query: {before}"
    );
    let answer = Command::new("ip")
        .args([
            "netns", "exec", &a, "dig", "+tcp", "+short", "+time=3", "+tries=1",
        ])
        .args(["@10.211.2.2", "api.example.com"])
        .output()?;
    let answer = String::from_utf8_lossy(&answer.stdout).trim().to_string();
    let refused = Command::new("ip")
        .args(["netns", "exec", &a, "dig", "+tcp", "+time=3", "+tries=1"])
        .args(["@10.211.2.2", "evil.example.org"])
        .output()?;
    let refused = String::from_utf8_lossy(&refused.stdout).to_string();
    let after = get(&a, world);
    let log_text = agent_log(&log);
    assert_eq!(answer, "10.211.9.2", "agent log:\n{log_text}");
    assert!(
        refused.contains("REFUSED"),
        "{refused}\nagent log:\n{log_text}"
    );
    assert_eq!(after, "200 hello /x", "agent log:\n{log_text}");
    // The same over UDP: the datapath assigns every redirected datagram to the proxy's socket.
    let udp = Command::new("ip")
        .args(["netns", "exec", &a, "dig", "+short", "+time=3", "+tries=1"])
        .args(["@10.211.2.2", "api.example.com"])
        .output()?;
    let udp = String::from_utf8_lossy(&udp.stdout).trim().to_string();
    assert_eq!(
        udp,
        "10.211.9.2",
        "DNS over UDP; agent log:\n{}",
        agent_log(&log)
    );
    let udp_refused = Command::new("ip")
        .args(["netns", "exec", &a, "dig", "+time=3", "+tries=1"])
        .args(["@10.211.2.2", "evil.example.org"])
        .output()?;
    let udp_refused = String::from_utf8_lossy(&udp_refused.stdout).to_string();
    assert!(udp_refused.contains("REFUSED"), "{udp_refused}");

    // What `weir fqdn cache list` shows: the learned name with its address, the identity
    // the address got and the pod that asked; nothing for the refused name.
    let channel = rt.block_on(weir_agent_api::connect_unix(&socket))?;
    let cache = rt
        .block_on(InspectServiceClient::new(channel).fqdn_cache_list(FqdnCacheListRequest {}))?
        .into_inner()
        .entries;
    let learned = cache
        .iter()
        .find(|e| e.name == "api.example.com.")
        .ok_or_else(|| format!("api.example.com not in the cache: {cache:?}"))?;
    assert_eq!(learned.ip, "10.211.9.2");
    assert!(learned.identity >= 256, "{learned:?}");
    assert!(learned.pod.ends_with("/client"), "{learned:?}");
    assert!(learned.expires_ms > learned.learned_ms, "{learned:?}");
    assert!(!cache.iter().any(|e| e.name.contains("evil")), "{cache:?}");
    drop(rt);
    Ok(())
}
