//! Root-only: podman (CNI network backend) runs a busybox container on a
//! network whose plugin is `weir-cni`, so a real runtime drives ADD and DEL.
//!
//! Safety: podman runs inside a private node namespace (`nsenter --net`), so
//! the plugin creates nothing in the root namespace; the namespace is named
//! `weircni-<pid>-p-node` and removed by a Drop guard. Podman's storage, run
//! root, configuration and plugin directory all live in a temporary directory.
//! Skips with a message when podman, runc or busybox is missing.

use std::collections::HashMap;
use std::path::Path;
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
    for applet in ["sh", "ip", "ping", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    Ok(())
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
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins)?;
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_weir-cni"), plugins.join("weir-cni"))?;
    let netconf = dir.path().join("net.d");
    std::fs::create_dir_all(&netconf)?;
    let state = dir.path().join("state");
    std::fs::write(
        netconf.join("weirnet.conflist"),
        format!(
            r#"{{"cniVersion":"1.0.0","name":"weirnet","plugins":[{{"type":"weir-cni",
                "ipam":{{"subnet":"10.200.7.0/24"}},"stateDir":"{}","agentSocket":"{}"}}]}}"#,
            state.display(),
            socket.display()
        ),
    )?;
    let containers_conf = dir.path().join("containers.conf");
    std::fs::write(
        &containers_conf,
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n",
            plugins.display()
        ),
    )?;
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs)?;

    let root = dir.path().join("storage");
    let runroot = dir.path().join("runroot");
    let tmpdir = dir.path().join("tmp");
    // nsenter rather than `ip netns exec`: the latter remounts /sys, hiding the
    // cgroup mounts runc needs.
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{node}"))
        .arg("podman")
        .arg("--root")
        .arg(&root)
        .arg("--runroot")
        .arg(&runroot)
        .arg("--tmpdir")
        .arg(&tmpdir)
        .args([
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--network-backend",
            "cni",
        ])
        .arg("--cni-config-dir")
        .arg(&netconf)
        .args(["--events-backend", "none"])
        .args([
            "run",
            "--rm",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(["--network", "weirnet", "--rootfs"])
        .arg(&rootfs)
        .args([
            "/bin/sh",
            "-c",
            "ip -4 addr show eth0; ping -c 1 -W 2 10.200.7.1",
        ])
        .env("CONTAINERS_CONF", &containers_conf)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = stop.send(());
    let _ = server.join();
    assert!(out.status.success(), "podman failed:\n{stdout}\n{stderr}");
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
