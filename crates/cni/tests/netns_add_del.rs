//! Root-only: runs the real `weir-cni` binary against real namespaces.
//!
//! Safety: nothing here changes the root namespace's networking. Every
//! namespace is named `weircni-<pid>-<tag>-...` and removed by a Drop guard even
//! when an assertion fails; the plugin runs inside the test's node namespace
//! (`ip netns exec`), and traffic only goes to addresses inside those
//! namespaces. The fake agent is a unix socket in a temporary directory.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use weir_agent_api::v1::endpoint_service_server::{EndpointService, EndpointServiceServer};
use weir_agent_api::v1::get_endpoint_request::Key;
use weir_agent_api::v1::{
    CreateEndpointRequest, CreateEndpointResponse, DeleteEndpointRequest, DeleteEndpointResponse,
    Endpoint, EndpointState, GetEndpointRequest, ListEndpointsRequest, ListEndpointsResponse,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Skips (returns true) with a reason when the environment cannot run these tests.
fn skip() -> bool {
    if !is_root() {
        eprintln!("SKIP: needs root (network namespaces, veth)");
        return true;
    }
    if !have("ip") {
        eprintln!("SKIP: needs iproute2's `ip`");
        return true;
    }
    false
}

fn run(cmd: &mut Command) -> Result<Output, Box<dyn std::error::Error>> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = run(Command::new("ip").args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Named network namespaces removed on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: String) -> Result<String, Box<dyn std::error::Error>> {
        ip(&["netns", "add", &name])?;
        self.0.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.0.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// An in-test agent: endpoints in a map; CreateEndpoint answers "not ready"
/// so the plugin has to poll GetEndpoint, which answers READY.
#[derive(Default, Clone)]
struct FakeAgent {
    endpoints: Arc<Mutex<HashMap<String, Endpoint>>>,
}

#[tonic::async_trait]
impl EndpointService for FakeAgent {
    async fn create_endpoint(
        &self,
        request: Request<CreateEndpointRequest>,
    ) -> Result<Response<CreateEndpointResponse>, Status> {
        let r = request.into_inner();
        let mut map = self
            .endpoints
            .lock()
            .map_err(|_| Status::internal("lock"))?;
        let id = map.len() as u64 + 1;
        map.insert(
            r.container_id.clone(),
            Endpoint {
                endpoint_id: id,
                container_id: r.container_id,
                identity: 4242,
                state: EndpointState::Ready as i32,
                netns_path: r.netns_path,
                ifname: r.ifname,
                host_ifname: r.host_ifname,
                host_ifindex: r.host_ifindex,
                ipv4_addresses: r.ipv4_addresses,
                ipv6_addresses: r.ipv6_addresses,
                namespace: r.namespace,
                pod_name: r.pod_name,
                labels: r.labels,
                named_ports: r.named_ports,
                ..Default::default()
            },
        );
        Ok(Response::new(CreateEndpointResponse {
            endpoint_id: id,
            identity: 4242,
            ready: false,
        }))
    }

    async fn delete_endpoint(
        &self,
        request: Request<DeleteEndpointRequest>,
    ) -> Result<Response<DeleteEndpointResponse>, Status> {
        let mut map = self
            .endpoints
            .lock()
            .map_err(|_| Status::internal("lock"))?;
        let found = map.remove(&request.into_inner().container_id).is_some();
        Ok(Response::new(DeleteEndpointResponse { found }))
    }

    async fn get_endpoint(
        &self,
        request: Request<GetEndpointRequest>,
    ) -> Result<Response<Endpoint>, Status> {
        let map = self
            .endpoints
            .lock()
            .map_err(|_| Status::internal("lock"))?;
        match request.into_inner().key {
            Some(Key::ContainerId(id)) => map
                .get(&id)
                .cloned()
                .map(Response::new)
                .ok_or_else(|| Status::not_found(id)),
            _ => Err(Status::invalid_argument("container id required")),
        }
    }

    async fn list_endpoints(
        &self,
        _request: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let map = self
            .endpoints
            .lock()
            .map_err(|_| Status::internal("lock"))?;
        Ok(Response::new(ListEndpointsResponse {
            endpoints: map.values().cloned().collect(),
        }))
    }
}

/// Serves the fake agent on its own thread; stops when dropped.
struct AgentServer {
    agent: FakeAgent,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentServer {
    fn start(dir: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let socket = dir.join("agent.sock");
        let agent = FakeAgent::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let service = EndpointServiceServer::new(agent.clone());
        let path = socket.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                let _ = ready_tx.send(Err("runtime".into()));
                return;
            };
            rt.block_on(async move {
                let listener = match weir_agent_api::bind_unix(&path).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ready_rx.recv()??;
        Ok(Self {
            agent,
            socket,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn endpoint(&self, container_id: &str) -> Option<Endpoint> {
        self.agent.endpoints.lock().ok()?.get(container_id).cloned()
    }
}

impl Drop for AgentServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Cni<'a> {
    node: &'a str,
    config: String,
}

impl Cni<'_> {
    /// Runs `weir-cni` inside the node namespace; returns (success, stdout).
    fn call(
        &self,
        command: &str,
        container_id: &str,
        netns: Option<&str>,
        config: &str,
    ) -> Result<(bool, String), Box<dyn std::error::Error>> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.node, env!("CARGO_BIN_EXE_weir-cni")])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=pod-{container_id}"),
            )
            .env_remove("CNI_NETNS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", format!("/var/run/netns/{ns}"));
        }
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(config.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            eprintln!(
                "weir-cni {command} {container_id} failed: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((out.status.success(), stdout))
    }
}

fn config(state: &Path, socket: &Path, extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"weir-test","type":"weir-cni",
            "ipam":{{"subnet":"10.200.1.0/24"}},
            "stateDir":"{}","agentSocket":"{}","readyTimeoutSeconds":5,
            "runtimeConfig":{{"labels":{{"app":"web"}}}}{extra}}}"#,
        state.display(),
        socket.display()
    )
}

fn busybox_ping(ns: &str, addr: &str) -> Option<bool> {
    if !have("busybox") {
        eprintln!("note: busybox missing, ping checks skipped");
        return None;
    }
    let status = Command::new("ip")
        .args([
            "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "2", addr,
        ])
        .stdout(Stdio::null())
        .status()
        .ok()?;
    Some(status.success())
}

#[test]
fn add_check_del_in_private_namespaces() -> TestResult {
    if skip() {
        return Ok(());
    }
    let prefix = format!("weircni-{}-a", std::process::id());
    let mut namespaces = Namespaces(Vec::new());
    let node = namespaces.add(format!("{prefix}-node"))?;
    let pod = namespaces.add(format!("{prefix}-pod"))?;
    // The node's own address (the pod CIDR's gateway), inside the node namespace.
    ip(&["-n", &node, "addr", "add", "10.200.1.1/32", "dev", "lo"])?;

    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let agent = AgentServer::start(dir.path())?;
    let conf = config(&state, &agent.socket, "");
    let cni = Cni {
        node: &node,
        config: conf.clone(),
    };

    // VERSION.
    let (ok, out) = cni.call("VERSION", "", None, &conf)?;
    assert!(ok);
    assert!(
        out.contains("\"supportedVersions\":[\"0.4.0\",\"1.0.0\"]"),
        "{out}"
    );

    // ADD.
    let (ok, out) = cni.call("ADD", "c1", Some(&pod), &cni.config)?;
    assert!(ok, "ADD failed: {out}");
    let result: serde_json::Value = serde_json::from_str(&out)?;
    let address = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(address, "10.200.1.2/32");
    let pod_ip = address.trim_end_matches("/32").to_string();
    let host_if = result["interfaces"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        host_if.starts_with("weir") && host_if.len() <= 15,
        "{host_if}"
    );

    // Kernel state: veth ends, /32 address, routes, permanent neighbour.
    let pod_addr = ip(&["-n", &pod, "-4", "addr", "show", "dev", "eth0"])?;
    assert!(pod_addr.contains(&address), "{pod_addr}");
    let pod_routes = ip(&["-n", &pod, "-4", "route"])?;
    assert!(
        pod_routes.contains("default via 169.254.1.1 dev eth0"),
        "{pod_routes}"
    );
    let neigh = ip(&["-n", &pod, "neigh", "show", "169.254.1.1"])?;
    assert!(neigh.contains("PERMANENT"), "{neigh}");
    let node_routes = ip(&["-n", &node, "-4", "route"])?;
    assert!(
        node_routes.contains(&format!("{pod_ip} dev {host_if}")),
        "{node_routes}"
    );
    let host_link = ip(&["-n", &node, "link", "show", "dev", &host_if])?;
    assert!(
        host_link.contains("state UP") || host_link.contains(",UP"),
        "{host_link}"
    );

    // Traffic stays inside the test namespaces.
    if let Some(ok) = busybox_ping(&pod, "10.200.1.1") {
        assert!(ok, "pod cannot reach the node address");
    }
    if let Some(ok) = busybox_ping(&node, &pod_ip) {
        assert!(ok, "node cannot reach the pod");
    }

    // The agent saw the endpoint with its labels and names.
    let ep = agent.endpoint("c1").ok_or("agent has no endpoint c1")?;
    assert_eq!(ep.namespace, "prod");
    assert_eq!(ep.pod_name, "pod-c1");
    assert_eq!(ep.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(ep.host_ifname, host_if);
    assert_eq!(ep.ipv4_addresses, vec![pod_ip.clone()]);
    assert!(ep.host_ifindex > 0);

    // CHECK with the ADD result as prevResult.
    let check_conf = config(&state, &agent.socket, &format!(r#","prevResult":{out}"#));
    let (ok, out) = cni.call("CHECK", "c1", Some(&pod), &check_conf)?;
    assert!(ok, "CHECK failed: {out}");

    // CHECK notices a broken route.
    ip(&["-n", &pod, "route", "del", "default"])?;
    let (ok, out) = cni.call("CHECK", "c1", Some(&pod), &check_conf)?;
    assert!(!ok);
    assert!(out.contains("\"code\":104"), "{out}");

    // DEL, then DEL again (idempotent), then DEL without a netns.
    let (ok, out) = cni.call("DEL", "c1", Some(&pod), &check_conf)?;
    assert!(ok, "DEL failed: {out}");
    assert!(out.trim().is_empty());
    assert!(agent.endpoint("c1").is_none());
    let links = ip(&["-n", &node, "link"])?;
    assert!(!links.contains(&host_if), "{links}");
    let pod_links = ip(&["-n", &pod, "link"])?;
    assert!(!pod_links.contains("eth0"), "{pod_links}");
    let (ok, _) = cni.call("DEL", "c1", Some(&pod), &check_conf)?;
    assert!(ok, "second DEL must succeed");
    let (ok, _) = cni.call("DEL", "unknown-container", None, &check_conf)?;
    assert!(ok, "DEL of an unknown container must succeed");

    // Errors come back as CNI error JSON with a non-zero exit.
    let bad = conf.replace("\"1.0.0\"", "\"0.2.0\"");
    let (ok, out) = cni.call("ADD", "c2", Some(&pod), &bad)?;
    assert!(!ok);
    let err: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(err["code"], 1);
    let (ok, out) = cni.call("ADD", "c3", Some("weircni-no-such-netns"), &conf)?;
    assert!(!ok);
    let err: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(err["code"], 3);
    Ok(())
}

#[test]
fn concurrent_adds_get_distinct_addresses() -> TestResult {
    if skip() {
        return Ok(());
    }
    let prefix = format!("weircni-{}-b", std::process::id());
    let mut namespaces = Namespaces(Vec::new());
    let node = namespaces.add(format!("{prefix}-node"))?;
    let pods: Vec<String> = (0..6)
        .map(|i| namespaces.add(format!("{prefix}-pod{i}")))
        .collect::<Result<_, _>>()?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let agent = AgentServer::start(dir.path())?;
    let conf = config(&state, &agent.socket, "");
    let cni = Cni {
        node: &node,
        config: conf.clone(),
    };
    let results: Vec<(bool, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let cni = &cni;
                s.spawn(move || {
                    cni.call("ADD", &format!("cc{i}"), Some(pod), &cni.config)
                        .ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten().unwrap_or((false, String::new())))
            .collect()
    });
    let mut addresses = std::collections::BTreeSet::new();
    for (ok, out) in &results {
        assert!(ok, "concurrent ADD failed: {out}");
        let v: serde_json::Value = serde_json::from_str(out)?;
        addresses.insert(
            v["ips"][0]["address"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(addresses.len(), pods.len(), "{addresses:?}");
    for (i, pod) in pods.iter().enumerate() {
        let (ok, out) = cni.call("DEL", &format!("cc{i}"), Some(pod), &conf)?;
        assert!(ok, "DEL failed: {out}");
    }
    let left = std::fs::read_dir(state.join("networks/weir-test"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
        .count();
    assert_eq!(left, 0, "all addresses freed");
    Ok(())
}
