//! Shared by the root-only agent tests: skip when not root, `ip`, the namespace guard, and
//! wiring a pod namespace to the node namespace with a veth pair.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub fn skip() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        return Some("needs root (network namespaces, veth, eBPF)");
    }
    for tool in ["ip", "python3"] {
        if !have(tool) {
            return Some("needs iproute2's `ip` and python3");
        }
    }
    None
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn ip(args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Namespaces removed on drop, and child processes killed first.
#[derive(Default)]
pub struct Guard {
    pub namespaces: Vec<String>,
    pub children: Vec<Child>,
}

impl Guard {
    pub fn netns(&mut self, name: String) -> Result<String, Box<dyn std::error::Error>> {
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn agent_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub struct Pod<'a> {
    pub ns: &'a str,
    pub host_if: &'a str,
    pub net: &'a str,
    pub app: &'a str,
}

pub fn wire_pod(node: &str, pod: &Pod<'_>) -> TestResult {
    ip(&[
        "-n",
        node,
        "link",
        "add",
        pod.host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.ns,
    ])?;
    ip(&[
        "-n",
        node,
        "addr",
        "add",
        &format!("{}.1/24", pod.net),
        "dev",
        pod.host_if,
    ])?;
    ip(&["-n", node, "link", "set", pod.host_if, "up"])?;
    ip(&[
        "-n",
        pod.ns,
        "addr",
        "add",
        &format!("{}.2/24", pod.net),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", pod.ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        pod.ns,
        "route",
        "add",
        "default",
        "via",
        &format!("{}.1", pod.net),
    ])?;
    Ok(())
}

/// Waits (up to 30 s) for the agent's API socket, then registers each pod as an endpoint in
/// Kubernetes namespace `prod` with the label `app=<app>` and address `<net>.2`, as the CNI
/// plugin would. Returns the connected channel.
pub fn register_pods(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    log: &Path,
    prefix: &str,
    pods: &[Pod<'_>],
) -> Result<tonic::transport::Channel, Box<dyn std::error::Error>> {
    use weir_agent_api::v1::CreateEndpointRequest;
    use weir_agent_api::v1::endpoint_service_client::EndpointServiceClient;

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let channel = loop {
        if let Ok(c) = rt.block_on(weir_agent_api::connect_unix(socket)) {
            break c;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("agent did not come up:\n{}", agent_log(log)).into());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut endpoints = EndpointServiceClient::new(channel.clone());
    for p in pods {
        let req = CreateEndpointRequest {
            container_id: format!("{prefix}-{}", p.app),
            netns_path: format!("/run/netns/{}", p.ns),
            ifname: "eth0".into(),
            host_ifname: p.host_if.into(),
            ipv4_addresses: vec![format!("{}.2", p.net)],
            namespace: "prod".into(),
            pod_name: p.app.into(),
            labels: std::collections::HashMap::from([("app".to_string(), p.app.to_string())]),
            ..Default::default()
        };
        rt.block_on(endpoints.create_endpoint(req))
            .map_err(|e| format!("CreateEndpoint {}: {e}\n{}", p.app, agent_log(log)))?;
    }
    Ok(channel)
}

/// Wires every pod to the node namespace and lets the node forward between them.
pub fn wire_pods(node: &str, pods: &[Pod<'_>]) -> TestResult {
    for p in pods {
        wire_pod(node, p)?;
    }
    ip(&[
        "netns",
        "exec",
        node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])?;
    Ok(())
}

/// Runs the Python `script` in namespace `ns` (killed with the guard) and waits for the
/// line `up` it prints once it listens.
pub fn start_server(g: &mut Guard, ns: &str, script: &str) -> TestResult {
    use std::io::{BufRead, BufReader};
    let mut server = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", script])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    if let Some(out) = server.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    g.children.push(server);
    if line.trim() != "up" {
        return Err(format!("server in {ns} did not come up: {line:?}").into());
    }
    Ok(())
}
