//! Root-only: podman (CNI network backend) runs a busybox container on a
//! network whose plugin is `weir-cni`, so a real runtime drives ADD and DEL.
//!
//! Safety: podman runs inside a private node namespace (`nsenter --net`), so
//! the plugin creates nothing in the root namespace; the namespace is named
//! `weircni-<pid>-p-node` and removed by a Drop guard. Podman's storage, run
//! root, configuration and plugin directory all live in a temporary directory.
//! Skips with a message when podman, runc or busybox is missing.
//!
//! The second test runs the real `weir-agent` in the node namespace: podman
//! containers on three networks (each network's `args.cni.labels` gives its pods
//! `app=server`, `app=client` or `app=other`), and a CiliumNetworkPolicy that lets
//! only clients reach the server's port 8080. The BPF programs on the containers'
//! veths allow and drop their real connections.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Records what the runtime registered and deleted.
#[derive(Default, Clone)]
struct RecordingAgent {
    live: Arc<Mutex<HashMap<String, Endpoint>>>,
    created: Arc<Mutex<Vec<Endpoint>>>,
    deleted: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl EndpointService for RecordingAgent {
    async fn create_endpoint(
        &self,
        request: Request<CreateEndpointRequest>,
    ) -> Result<Response<CreateEndpointResponse>, Status> {
        let r = request.into_inner();
        let ep = Endpoint {
            endpoint_id: 1,
            container_id: r.container_id.clone(),
            identity: 4242,
            state: EndpointState::Ready as i32,
            host_ifname: r.host_ifname,
            ipv4_addresses: r.ipv4_addresses,
            namespace: r.namespace,
            pod_name: r.pod_name,
            labels: r.labels,
            ..Default::default()
        };
        self.live
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .insert(r.container_id, ep.clone());
        self.created
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .push(ep);
        Ok(Response::new(CreateEndpointResponse {
            endpoint_id: 1,
            identity: 4242,
            ready: true,
        }))
    }

    async fn delete_endpoint(
        &self,
        request: Request<DeleteEndpointRequest>,
    ) -> Result<Response<DeleteEndpointResponse>, Status> {
        let id = request.into_inner().container_id;
        let found = self
            .live
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .remove(&id)
            .is_some();
        self.deleted
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .push(id);
        Ok(Response::new(DeleteEndpointResponse { found }))
    }

    async fn get_endpoint(
        &self,
        request: Request<GetEndpointRequest>,
    ) -> Result<Response<Endpoint>, Status> {
        let live = self.live.lock().map_err(|_| Status::internal("lock"))?;
        match request.into_inner().key {
            Some(Key::ContainerId(id)) => live
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
        let live = self.live.lock().map_err(|_| Status::internal("lock"))?;
        Ok(Response::new(ListEndpointsResponse {
            endpoints: live.values().cloned().collect(),
        }))
    }
}

fn busybox_rootfs(root: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    for dir in ["proc", "sys", "dev", "etc", "tmp", "run"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::copy("/usr/bin/busybox", bin.join("busybox"))?;
    for applet in [
        "sh", "ip", "ping", "cat", "httpd", "wget", "mkdir", "sleep", "echo", "timeout",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    Ok(())
}

/// Podman confined to a test: storage, run root, configuration and a plugin directory holding
/// `weir-cni`, all under the test's directory; it runs in the node namespace (nsenter rather
/// than `ip netns exec`: the latter remounts /sys, hiding the cgroup mounts runc needs).
struct Podman {
    /// `nsenter --net=... podman <global options>`, without the command.
    base: Vec<std::ffi::OsString>,
    containers_conf: PathBuf,
    rootfs: PathBuf,
    /// Where the test writes its network lists.
    netconf: PathBuf,
}

impl Podman {
    fn new(dir: &Path, node: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins)?;
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_weir-cni"), plugins.join("weir-cni"))?;
        let netconf = dir.join("net.d");
        std::fs::create_dir_all(&netconf)?;
        let containers_conf = dir.join("containers.conf");
        std::fs::write(
            &containers_conf,
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n",
                plugins.display()
            ),
        )?;
        let rootfs = dir.join("rootfs");
        busybox_rootfs(&rootfs)?;
        let mut base: Vec<std::ffi::OsString> = vec![
            format!("--net=/var/run/netns/{node}").into(),
            "podman".into(),
        ];
        for (flag, sub) in [
            ("--root", "storage"),
            ("--runroot", "runroot"),
            ("--tmpdir", "tmp"),
        ] {
            base.push(flag.into());
            base.push(dir.join(sub).into_os_string());
        }
        for a in [
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--network-backend",
            "cni",
            "--events-backend",
            "none",
        ] {
            base.push(a.into());
        }
        base.push("--cni-config-dir".into());
        base.push(netconf.clone().into_os_string());
        Ok(Podman {
            base,
            containers_conf,
            rootfs,
            netconf,
        })
    }

    /// `podman run OPTS --rootfs ROOTFS /bin/sh -c SCRIPT`: stdout, stderr, success.
    fn run(&self, opts: &[&str], script: &str) -> std::io::Result<(String, String, bool)> {
        let out = Command::new("nsenter")
            .args(&self.base)
            .args([
                "run",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(opts)
            .arg("--rootfs")
            .arg(&self.rootfs)
            .args(["/bin/sh", "-c", script])
            .env("CONTAINERS_CONF", &self.containers_conf)
            .output()?;
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        ))
    }
}

#[test]
fn podman_container_gets_a_weir_endpoint() -> TestResult {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: podman test needs root");
        return Ok(());
    }
    for tool in ["ip", "nsenter", "podman", "runc"] {
        if !have(tool) {
            eprintln!("SKIP: podman test needs `{tool}` (apt-get install podman runc)");
            return Ok(());
        }
    }
    if !Path::new("/usr/bin/busybox").exists() {
        eprintln!("SKIP: podman test needs /usr/bin/busybox (apt-get install busybox-static)");
        return Ok(());
    }

    let dir = tempfile::tempdir()?;
    let node = format!("weircni-{}-p-node", std::process::id());
    let status = Command::new("ip").args(["netns", "add", &node]).status()?;
    assert!(status.success(), "ip netns add");
    let _guard = Namespace(node.clone());
    for args in [
        vec!["-n", &node, "link", "set", "lo", "up"],
        vec!["-n", &node, "addr", "add", "10.200.7.1/32", "dev", "lo"],
    ] {
        assert!(
            Command::new("ip").args(&args).status()?.success(),
            "{args:?}"
        );
    }

    // The in-test agent.
    let socket = dir.path().join("agent.sock");
    let agent = RecordingAgent::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let service = EndpointServiceServer::new(agent.clone());
    let path = socket.clone();
    let server = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            let _ = ready_tx.send(Err("runtime".into()));
            return;
        };
        rt.block_on(async move {
            match weir_agent_api::bind_unix(&path).await {
                Ok(listener) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                            let _ = stopped.await;
                        })
                        .await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            }
        });
    });
    ready_rx.recv()??;

    // Plugin directory, network list, containers.conf and rootfs.
    let podman = Podman::new(dir.path(), &node)?;
    let state = dir.path().join("state");
    std::fs::write(
        podman.netconf.join("weirnet.conflist"),
        format!(
            r#"{{"cniVersion":"1.0.0","name":"weirnet","plugins":[{{"type":"weir-cni",
                "ipam":{{"subnet":"10.200.7.0/24"}},"stateDir":"{}","agentSocket":"{}"}}]}}"#,
            state.display(),
            socket.display()
        ),
    )?;
    let (stdout, stderr, ok) = podman.run(
        &["--rm", "--network", "weirnet"],
        "ip -4 addr show eth0; ping -c 1 -W 2 10.200.7.1",
    )?;
    let _ = stop.send(());
    let _ = server.join();
    assert!(ok, "podman failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("10.200.7.2/32"), "{stdout}");
    assert!(stdout.contains("1 packets received"), "{stdout}");

    let created = agent.created.lock().map_err(|_| "lock")?.clone();
    assert_eq!(created.len(), 1, "one endpoint registered");
    let ep = created.first().ok_or("no endpoint")?;
    assert_eq!(ep.ipv4_addresses, vec!["10.200.7.2".to_string()]);
    // `podman run --rm` tears the network down: DEL reached the agent and IPAM.
    let deleted = agent.deleted.lock().map_err(|_| "lock")?.clone();
    assert!(
        deleted.contains(&ep.container_id),
        "DEL not seen: {deleted:?}"
    );
    let left = std::fs::read_dir(state.join("networks/weirnet"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
        .count();
    assert_eq!(left, 0, "address freed");
    Ok(())
}

/// Kills the agent, removes podman's containers and unmounts the agent's bpffs even when
/// the test fails (the agent runs under `nsenter --net` only, so its mount is in the root
/// mount namespace).
struct Cleanup {
    agent: Option<std::process::Child>,
    podman: Vec<std::ffi::OsString>,
    containers: Vec<String>,
    bpffs: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            // `rm -f` runs the CNI DEL while the agent is still up.
            let _ = Command::new("nsenter")
                .args(&self.podman)
                .args(["rm", "-f", "-t", "0", c])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = Command::new("umount")
            .arg(&self.bpffs)
            .stderr(Stdio::null())
            .status();
    }
}

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-from-clients, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

#[test]
fn podman_containers_traffic_follows_policy_with_the_real_agent() -> TestResult {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: podman policy test needs root");
        return Ok(());
    }
    for tool in ["ip", "nsenter", "podman", "runc"] {
        if !have(tool) {
            eprintln!("SKIP: podman policy test needs `{tool}` (apt-get install podman runc)");
            return Ok(());
        }
    }
    if !Path::new("/usr/bin/busybox").exists() {
        eprintln!(
            "SKIP: podman policy test needs /usr/bin/busybox (apt-get install busybox-static)"
        );
        return Ok(());
    }
    let agent_bin = Path::new(env!("CARGO_BIN_EXE_weir-cni")).with_file_name("weir-agent");
    if !agent_bin.exists() {
        eprintln!(
            "SKIP: podman policy test needs {} (cargo build --workspace --bins; scripts/test does)",
            agent_bin.display()
        );
        return Ok(());
    }

    let dir = tempfile::tempdir()?;
    let node = format!("weircni-{}-q-node", std::process::id());
    let status = Command::new("ip").args(["netns", "add", &node]).status()?;
    assert!(status.success(), "ip netns add");
    let _guard = Namespace(node.clone());
    for args in [
        vec!["-n", &node, "link", "set", "lo", "up"],
        vec![
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    ] {
        assert!(
            Command::new("ip").args(&args).status()?.success(),
            "{args:?}"
        );
    }

    // The real agent, configured through a file, in the node namespace.
    let socket = dir.path().join("agent.sock");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("policy.yaml"), POLICY)?;
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "state-dir: {}\nbpffs: {}\napi-socket: {}\npolicy-dir: {}\nno-proxies: true\nno-metrics: true\nnode-name: podman-node\n",
            dir.path().join("agent-state").display(),
            dir.path().join("bpf").display(),
            socket.display(),
            policies.display()
        ),
    )?;
    let log = dir.path().join("agent.log");
    let podman = Podman::new(dir.path(), &node)?;
    let mut cleanup = Cleanup {
        agent: None,
        podman: podman.base.clone(),
        containers: Vec::new(),
        bpffs: dir.path().join("bpf"),
    };
    cleanup.agent = Some(
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{node}"))
            .arg(&agent_bin)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let channel = loop {
        if let Ok(c) = rt.block_on(weir_agent_api::connect_unix(&socket)) {
            break c;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("agent did not come up:\n{}", agent_log()).into());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };

    // Three networks: the labels of their pods come from each network's configuration.
    for (name, app, subnet) in [
        ("weir-server", "server", "10.200.8.0/26"),
        ("weir-client", "client", "10.200.8.64/26"),
        ("weir-other", "other", "10.200.8.128/26"),
    ] {
        std::fs::write(
            podman.netconf.join(format!("{name}.conflist")),
            format!(
                r#"{{"cniVersion":"1.0.0","name":"{name}","plugins":[{{"type":"weir-cni",
                    "ipam":{{"subnet":"{subnet}"}},"stateDir":"{}","agentSocket":"{}",
                    "args":{{"cni":{{"labels":[{{"key":"app","value":"{app}"}}]}}}}}}]}}"#,
                dir.path().join("cni-state").display(),
                socket.display()
            ),
        )?;
    }

    // The server: HTTP on 8080 (allowed to clients) and on 9090 (allowed to nobody).
    cleanup.containers.push("weir-srv".into());
    let (stdout, stderr, ok) = podman.run(
        &["-d", "--name", "weir-srv", "--network", "weir-server"],
        "mkdir -p /tmp/www && echo hello > /tmp/www/index.html && httpd -p 8080 -h /tmp/www && exec httpd -f -p 9090 -h /tmp/www",
    )?;
    assert!(
        ok,
        "podman run server:\n{stdout}\n{stderr}\n{}",
        agent_log()
    );
    let mut endpoints =
        weir_agent_api::v1::endpoint_service_client::EndpointServiceClient::new(channel);
    let listed = rt
        .block_on(endpoints.list_endpoints(ListEndpointsRequest::default()))?
        .into_inner()
        .endpoints;
    let server = listed
        .iter()
        .find(|e| e.labels.get("app").map(String::as_str) == Some("server"))
        .ok_or_else(|| format!("server endpoint not registered: {listed:?}"))?;
    assert_eq!(server.state, EndpointState::Ready as i32, "{server:?}");
    let server_ip = server
        .ipv4_addresses
        .first()
        .ok_or("server has no address")?
        .clone();

    // A client: 8080 answers (after a retry or two while httpd starts), 9090 is dropped.
    // `timeout`, not wget's `-T`, which crashes Debian's static busybox.
    let fetch = |port: u16| format!("timeout 3 wget -q -O - http://{server_ip}:{port}/");
    let script = format!(
        "for i in 1 2 3 4 5; do {} && break; sleep 1; done; echo; {} && echo 9090-OPEN || echo 9090-BLOCKED",
        fetch(8080),
        fetch(9090)
    );
    let (stdout, stderr, _) = podman.run(&["--rm", "--network", "weir-client"], &script)?;
    assert!(
        stdout.contains("hello"),
        "client to 8080:\n{stdout}\n{stderr}\n{}",
        agent_log()
    );
    assert!(
        stdout.contains("9090-BLOCKED"),
        "client to 9090:\n{stdout}\n{stderr}"
    );

    // Another workload: no rule lets `app=other` in, on any port.
    let script = format!("{} && echo 8080-OPEN || echo 8080-BLOCKED", fetch(8080));
    let (stdout, stderr, _) = podman.run(&["--rm", "--network", "weir-other"], &script)?;
    assert!(
        stdout.contains("8080-BLOCKED"),
        "other to 8080:\n{stdout}\n{stderr}"
    );

    // The server's endpoint is the one whose ingress the policy enforces.
    assert!(
        server.ingress_enforced && !server.egress_enforced,
        "{server:?}"
    );
    Ok(())
}
