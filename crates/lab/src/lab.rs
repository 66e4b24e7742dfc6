//! The lab itself: a node namespace running `weir-agent`, a world namespace, and pods made by
//! `weir-cni`, all in namespaces named with the lab's prefix and files under the lab
//! directory. Nothing here touches the root namespace's networking.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use weir_agent_api::v1::endpoint_service_client::EndpointServiceClient;
use weir_agent_api::v1::inspect_service_client::InspectServiceClient;
use weir_agent_api::v1::status_service_client::StatusServiceClient;
use weir_agent_api::v1::{
    BpfPolicyEntry, BpfPolicyGetRequest, Endpoint, ListEndpointsRequest, StatusRequest,
    StatusResponse,
};

use crate::LabError;
use crate::cluster::{ClusterSpec, Listeners, PodSpec};
use crate::sys::{self, ip, ip_in, netns_path, nsenter, run};

/// The pod CIDR the node owns.
pub const POD_CIDR: &str = "10.0.0.0/16";
/// The node's own address (the pod CIDR's gateway, never handed to a pod).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Node side of the node-world link.
const NODE_WORLD_IP: &str = "192.168.250.1";
/// World side of the node-world link.
const WORLD_NODE_IP: &str = "192.168.250.2";
/// The CNI network name (also the IPAM directory's name).
const NETWORK: &str = "weirlab";
/// The workload server.
const SERVER_PY: &str = include_str!("server.py");

/// Where a lab lives and which programs it runs.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Prefix of every namespace name (e.g. `weirlab-`).
    pub prefix: String,
    /// The lab directory: agent state, bpffs, policies, socket, logs, lab state.
    pub dir: PathBuf,
    /// The `weir-agent` binary.
    pub agent_bin: PathBuf,
    /// The `weir-cni` binary.
    pub cni_bin: PathBuf,
    /// The Python interpreter for the workload servers.
    pub python: String,
    /// How often the agent polls its policy directory.
    pub policy_poll_ms: u64,
}

impl LabConfig {
    /// A config with the binaries found next to `bin_dir`.
    pub fn new(prefix: &str, dir: &Path, bin_dir: &Path) -> Self {
        LabConfig {
            prefix: prefix.to_string(),
            dir: dir.to_path_buf(),
            agent_bin: bin_dir.join("weir-agent"),
            cni_bin: bin_dir.join("weir-cni"),
            python: "python3".into(),
            policy_poll_ms: 100,
        }
    }

    /// The node namespace's name.
    pub fn node_ns(&self) -> String {
        format!("{}node", self.prefix)
    }

    /// The world namespace's name.
    pub fn world_ns(&self) -> String {
        format!("{}world", self.prefix)
    }

    /// The agent's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// The agent's policy directory.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    /// The bpffs the lab mounts for the agent.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("lab.json")
    }
}

/// A pod the lab made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    /// What it was made from.
    pub spec: PodSpec,
    /// Its network namespace's name.
    pub netns: String,
    /// The container id given to the CNI plugin.
    pub container_id: String,
    /// The CNI ADD result (for CHECK's prevResult).
    pub add_result: String,
    /// Server processes in its namespace.
    pub pids: Vec<u32>,
}

/// A process the lab started in a non-pod namespace.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Place {
    listeners: Listeners,
    pids: Vec<u32>,
}

/// What the lab holds now; persisted in `lab.json` so that other `weir lab` commands and
/// `weir lab down` after a crash find it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabState {
    /// The agent's pid.
    pub agent_pid: Option<u32>,
    /// Namespace labels the agent was started with.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The pods.
    pub pods: Vec<Pod>,
    /// Addresses the world namespace holds.
    pub world_ips: BTreeSet<Ipv4Addr>,
    world: Place,
    host: Place,
    /// Policy files written by the lab.
    pub policy_files: BTreeSet<String>,
    /// What the kube-dns pod answers.
    pub dns: BTreeMap<String, Vec<Ipv4Addr>>,
}

/// Time figures of one [`Lab::apply`].
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Pods created, with the time each CNI ADD took (the plugin returns once READY).
    pub added: Vec<(String, Duration)>,
    /// Pods removed.
    pub removed: usize,
    /// Pods left out of the spec (address clashes, IPv6).
    pub skipped: Vec<String>,
    /// The agent's policy error after the policy files were written, if any.
    pub policy_error: Option<String>,
}

/// A running lab. Dropping it tears the lab down unless [`Lab::keep`] was called.
pub struct Lab {
    cfg: LabConfig,
    state: LabState,
    rt: tokio::runtime::Runtime,
    children: Vec<Child>,
    keep: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, LabError> {
    // A worker thread keeps driving the API connections between calls, so that dropped
    // channels really close (the agent's graceful shutdown waits for open connections).
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| LabError::Io(PathBuf::from("tokio runtime"), e))
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), LabError> {
    // Write then rename: the agent's watcher must never read half a file.
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, data).map_err(|e| LabError::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| LabError::Io(path.to_path_buf(), e))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

impl Lab {
    /// Creates the node and world namespaces, mounts the bpffs and starts the agent. Fails if
    /// a lab with this prefix already exists.
    pub fn up(cfg: LabConfig) -> Result<Lab, LabError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(LabError::NotRoot);
        }
        if !sys::netns_with_prefix(&cfg.prefix).is_empty() || cfg.state_file().exists() {
            return Err(LabError::Exists(cfg.prefix.clone()));
        }
        for bin in [&cfg.agent_bin, &cfg.cni_bin] {
            if !bin.exists() {
                return Err(LabError::Missing(bin.display().to_string()));
            }
        }
        let mut lab = Lab {
            cfg,
            state: LabState::default(),
            rt: runtime()?,
            children: Vec::new(),
            keep: false,
        };
        // From here on a failure tears down what was made (Drop).
        lab.build_topology()?;
        lab.start_agent()?;
        lab.save()?;
        Ok(lab)
    }

    /// Opens the lab a previous `up` left running.
    pub fn open(cfg: LabConfig) -> Result<Lab, LabError> {
        let path = cfg.state_file();
        let text = std::fs::read_to_string(&path).map_err(|_| LabError::NotRunning)?;
        let state = serde_json::from_str(&text)
            .map_err(|e| LabError::Command(format!("{}: {e}", path.display())))?;
        Ok(Lab {
            cfg,
            state,
            rt: runtime()?,
            children: Vec::new(),
            keep: true,
        })
    }

    /// Leaves the lab running when this handle is dropped.
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// The configuration.
    pub fn config(&self) -> &LabConfig {
        &self.cfg
    }

    /// What the lab holds.
    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.state.pods.iter().find(|p| p.spec.name == name)
    }

    fn save(&self) -> Result<(), LabError> {
        let text = serde_json::to_string_pretty(&self.state)
            .map_err(|e| LabError::Command(format!("saving lab state: {e}")))?;
        write_file(&self.cfg.state_file(), text.as_bytes())
    }

    fn build_topology(&mut self) -> Result<(), LabError> {
        let dir = &self.cfg.dir;
        for sub in ["state", "policies", "bpffs", "cni", "logs"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| LabError::Io(p.clone(), e))?;
        }
        // Write the state file early so that `down` finds a half-built lab too.
        self.save()?;
        let bpffs = self.cfg.bpffs();
        if !sys::is_bpffs(&bpffs) {
            run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;
        }
        let node = self.cfg.node_ns();
        let world = self.cfg.world_ns();
        for ns in [&node, &world] {
            ip(&["netns", "add", ns])?;
            ip_in(ns, &["link", "set", "lo", "up"])?;
        }
        run(nsenter(&node, "sysctl").args(["-q", "-w", "net.ipv4.ip_forward=1"]))?;
        ip_in(
            &node,
            &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"],
        )?;
        ip_in(
            &node,
            &[
                "link", "add", "world0", "type", "veth", "peer", "name", "node0", "netns", &world,
            ],
        )?;
        ip_in(
            &node,
            &[
                "addr",
                "add",
                &format!("{NODE_WORLD_IP}/30"),
                "dev",
                "world0",
            ],
        )?;
        ip_in(&node, &["link", "set", "world0", "up"])?;
        ip_in(
            &world,
            &[
                "addr",
                "add",
                &format!("{WORLD_NODE_IP}/30"),
                "dev",
                "node0",
            ],
        )?;
        ip_in(&world, &["link", "set", "node0", "up"])?;
        ip_in(&world, &["route", "add", POD_CIDR, "via", NODE_WORLD_IP])?;
        ip_in(
            &world,
            &[
                "route",
                "add",
                &format!("{NODE_IP}/32"),
                "via",
                NODE_WORLD_IP,
            ],
        )?;
        Ok(())
    }

    fn namespace_labels_file(&self) -> PathBuf {
        self.cfg.dir.join("namespaces.json")
    }

    /// Starts the agent in the node namespace and waits until its API answers.
    pub fn start_agent(&mut self) -> Result<(), LabError> {
        let labels = serde_json::to_string(&self.state.namespaces)
            .map_err(|e| LabError::Command(e.to_string()))?;
        write_file(&self.namespace_labels_file(), labels.as_bytes())?;
        let log_path = self.cfg.dir.join("logs/agent.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| LabError::Io(log_path.clone(), e))?;
        let err = log
            .try_clone()
            .map_err(|e| LabError::Io(log_path.clone(), e))?;
        let mut cmd = nsenter(&self.cfg.node_ns(), &self.cfg.agent_bin);
        cmd.arg("--state-dir")
            .arg(self.cfg.dir.join("state"))
            .arg("--bpffs")
            .arg(self.cfg.bpffs())
            .arg("--api-socket")
            .arg(self.cfg.socket())
            .arg("--policy-dir")
            .arg(self.cfg.policy_dir())
            .arg("--namespace-labels")
            .arg(self.namespace_labels_file())
            .arg("--policy-poll-ms")
            .arg(self.cfg.policy_poll_ms.to_string())
            .arg("--pod-cidr")
            .arg(POD_CIDR)
            .arg("--node-address")
            .arg(NODE_IP.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = spawn_detached(&mut cmd)?;
        self.state.agent_pid = Some(child.id());
        self.children.push(child);
        self.save()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.status().is_ok() {
                return Ok(());
            }
            if !self.state.agent_pid.is_some_and(sys::alive) {
                return Err(LabError::Agent(format!(
                    "weir-agent exited; see {}",
                    log_path.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(LabError::Agent("weir-agent did not answer in 60 s".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with `signal` (SIGKILL simulates a crash) and waits until it is gone.
    pub fn stop_agent(&mut self, signal: Signal) -> Result<(), LabError> {
        if let Some(pid) = self.state.agent_pid.take() {
            sys::signal(pid, signal);
            self.reap(pid, Duration::from_secs(5));
            if sys::alive(pid) {
                sys::signal(pid, Signal::SIGKILL);
                self.reap(pid, Duration::from_secs(5));
            }
        }
        self.save()
    }

    /// Waits for `pid` to exit (reaping it when it is the lab's child).
    fn reap(&mut self, pid: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.children.iter_mut().find(|c| c.id() == pid) {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    self.children.retain(|c| c.id() != pid);
                    return;
                }
            } else if !sys::alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's status over its API.
    pub fn status(&self) -> Result<StatusResponse, LabError> {
        let socket = self.cfg.socket();
        self.rt.block_on(async {
            let channel = weir_agent_api::connect_unix(&socket)
                .await
                .map_err(|e| LabError::Agent(e.to_string()))?;
            StatusServiceClient::new(channel)
                .status(StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| LabError::Agent(e.to_string()))
        })
    }

    /// Every endpoint the agent knows.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, LabError> {
        let socket = self.cfg.socket();
        self.rt.block_on(async {
            let channel = weir_agent_api::connect_unix(&socket)
                .await
                .map_err(|e| LabError::Agent(e.to_string()))?;
            EndpointServiceClient::new(channel)
                .list_endpoints(ListEndpointsRequest {})
                .await
                .map(|r| r.into_inner().endpoints)
                .map_err(|e| LabError::Agent(e.to_string()))
        })
    }

    /// The policy map entries the kernel holds for every endpoint (`weir bpf policy get --all`).
    pub fn policy_entries(&self) -> Result<Vec<BpfPolicyEntry>, LabError> {
        let socket = self.cfg.socket();
        self.rt.block_on(async {
            let channel = weir_agent_api::connect_unix(&socket)
                .await
                .map_err(|e| LabError::Agent(e.to_string()))?;
            InspectServiceClient::new(channel)
                .bpf_policy_get(BpfPolicyGetRequest { endpoint_id: 0 })
                .await
                .map(|r| r.into_inner().entries)
                .map_err(|e| LabError::Agent(e.to_string()))
        })
    }

    /// Writes one policy file into the agent's policy directory (atomically).
    pub fn write_policy(&mut self, name: &str, text: &str) -> Result<(), LabError> {
        write_file(&self.cfg.policy_dir().join(name), text.as_bytes())?;
        self.state.policy_files.insert(name.to_string());
        self.save()
    }

    /// Removes one policy file.
    pub fn remove_policy(&mut self, name: &str) -> Result<(), LabError> {
        let path = self.cfg.policy_dir().join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LabError::Io(path, e)),
        }
        self.state.policy_files.remove(name);
        self.save()
    }

    /// Waits until the agent's policy revision differs from `before` and stays put for a few
    /// poll periods (every file event has been applied); returns the policy error, if any.
    pub fn wait_policy_settled(&self, before: u64) -> Result<Option<String>, LabError> {
        let poll = Duration::from_millis(self.cfg.policy_poll_ms.max(20));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = before;
        let mut stable_since = Instant::now();
        let mut changed = false;
        loop {
            let s = self.status()?;
            if s.policy_revision != last {
                last = s.policy_revision;
                changed = true;
                stable_since = Instant::now();
            }
            let settled = if changed { poll * 3 } else { poll * 6 };
            if stable_since.elapsed() >= settled || Instant::now() > deadline {
                return Ok(Some(s.last_policy_error).filter(|e| !e.is_empty()));
            }
            std::thread::sleep(poll / 2);
        }
    }

    /// Brings the lab to `spec`: policies first, then pods (kept when unchanged), world
    /// addresses and servers. Restarts the agent when the namespace labels change.
    pub fn apply(&mut self, spec: &ClusterSpec) -> Result<ApplyReport, LabError> {
        let mut report = ApplyReport {
            skipped: spec.skipped.clone(),
            ..ApplyReport::default()
        };
        if spec.namespaces != self.state.namespaces {
            // Identities depend on namespace labels, which the agent reads at start.
            report.removed += self.remove_pods(|_| true)?;
            self.stop_agent(Signal::SIGTERM)?;
            self.state.namespaces = spec.namespaces.clone();
            self.start_agent()?;
        }
        // Policies.
        let before = self.status()?.policy_revision;
        let wanted: BTreeSet<String> = spec.policies.iter().map(|p| p.name.clone()).collect();
        let mut changed = false;
        for old in self.state.policy_files.clone() {
            if !wanted.contains(&old) {
                self.remove_policy(&old)?;
                changed = true;
            }
        }
        for p in &spec.policies {
            let path = self.cfg.policy_dir().join(&p.name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(p.text.as_str()) {
                self.write_policy(&p.name, &p.text)?;
                changed = true;
            }
        }
        if changed {
            report.policy_error = self.wait_policy_settled(before)?;
        }
        // Pods. When the scenario's DNS data changes, every pod is made anew: an endpoint
        // keeps the names it resolved (and the addresses toFQDNs opened for them) for their
        // TTL, as in Cilium, and one scenario's lookups must not open another's flows.
        let dns_changed = self.state.dns != spec.dns;
        self.state.dns = spec.dns.clone();
        report.removed +=
            self.remove_pods(|p| dns_changed || !spec.pods.iter().any(|s| s.same_pod(&p.spec)))?;
        let new: Vec<PodSpec> = spec
            .pods
            .iter()
            .filter(|s| !self.state.pods.iter().any(|p| p.spec.same_pod(s)))
            .cloned()
            .collect();
        report.added = self.add_pods(&new)?;
        // Servers whose ports changed.
        let mut restart = Vec::new();
        let mut stopped = Vec::new();
        for s in &spec.pods {
            let is_dns = s.labels.get("k8s-app").is_some_and(|v| v == "kube-dns");
            if let Some(p) = self.state.pods.iter_mut().find(|p| p.spec.same_pod(s))
                && (p.spec.tcp_ports != s.tcp_ports
                    || p.spec.udp_ports != s.udp_ports
                    || (is_dns && dns_changed && !new.iter().any(|n| n.name == s.name)))
            {
                p.spec.tcp_ports = s.tcp_ports.clone();
                p.spec.udp_ports = s.udp_ports.clone();
                stopped.append(&mut p.pids);
                restart.push(s.name.clone());
            }
        }
        // Gone for good before the new servers bind the same ports.
        self.kill_all(&stopped);
        for name in restart {
            self.start_pod_servers(&name)?;
        }
        // The world and the node.
        let world = self.cfg.world_ns();
        let node = self.cfg.node_ns();
        for addr in &spec.world_ips {
            if self.state.world_ips.insert(*addr) {
                ip_in(&world, &["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
                ip_in(
                    &node,
                    &[
                        "route",
                        "replace",
                        &format!("{addr}/32"),
                        "via",
                        WORLD_NODE_IP,
                    ],
                )?;
            }
        }
        if self.state.world.listeners != spec.world {
            let pids = std::mem::take(&mut self.state.world.pids);
            self.kill_all(&pids);
            self.state.world = Place {
                listeners: spec.world.clone(),
                pids: self
                    .start_server(&world, "world", &spec.world)?
                    .into_iter()
                    .collect(),
            };
        }
        if self.state.host.listeners != spec.host {
            let pids = std::mem::take(&mut self.state.host.pids);
            self.kill_all(&pids);
            self.state.host = Place {
                listeners: spec.host.clone(),
                pids: self
                    .start_server(&node, "host", &spec.host)?
                    .into_iter()
                    .collect(),
            };
        }
        self.save()?;
        Ok(report)
    }

    fn kill_all(&mut self, pids: &[u32]) {
        for pid in pids {
            sys::signal(*pid, Signal::SIGKILL);
        }
        for pid in pids {
            self.reap(*pid, Duration::from_secs(2));
        }
    }

    /// The CNI network configuration for one pod.
    fn cni_config(&self, pod: &PodSpec, prev_result: Option<&str>) -> String {
        let named: Vec<serde_json::Value> = pod
            .named_ports
            .iter()
            .map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP"}))
            .collect();
        let mut conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "weir-cni",
            "ipam": {"subnet": POD_CIDR, "gateway": NODE_IP.to_string()},
            "stateDir": self.cfg.dir.join("cni"),
            "agentSocket": self.cfg.socket(),
            "readyTimeoutSeconds": 30,
            "runtimeConfig": {"labels": pod.cni_labels(), "namedPorts": named},
        });
        if let Some(prev) =
            prev_result.and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            && let Some(obj) = conf.as_object_mut()
        {
            obj.insert("prevResult".into(), prev);
        }
        conf.to_string()
    }

    /// Runs the CNI plugin for `pod` as a runtime would, inside the node namespace. Returns
    /// whether it succeeded and its stdout.
    pub fn cni(
        &self,
        command: &str,
        pod: &PodSpec,
        netns: Option<&str>,
        prev_result: Option<&str>,
    ) -> Result<(bool, String), LabError> {
        let mut cmd = nsenter(&self.cfg.node_ns(), &self.cfg.cni_bin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", self.container_id(&pod.name))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};IP={}",
                    pod.namespace, pod.name, pod.ip
                ),
            )
            .env_remove("CNI_NETNS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", netns_path(ns));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| LabError::Command(format!("weir-cni: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            let conf = self.cni_config(pod, prev_result);
            stdin
                .write_all(conf.as_bytes())
                .map_err(|e| LabError::Command(format!("weir-cni stdin: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| LabError::Command(format!("weir-cni: {e}")))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// The container id the lab gives a pod.
    pub fn container_id(&self, pod: &str) -> String {
        format!("{}{}", self.cfg.prefix, sanitize(pod))
    }

    /// The network namespace name of a pod.
    pub fn pod_netns(&self, pod: &str) -> String {
        format!("{}pod-{}", self.cfg.prefix, sanitize(pod))
    }

    /// Creates pods concurrently (one CNI ADD each, as a runtime starting them at once would),
    /// then their servers. Returns each pod's ADD time.
    pub fn add_pods(&mut self, pods: &[PodSpec]) -> Result<Vec<(String, Duration)>, LabError> {
        for p in pods {
            let ns = self.pod_netns(&p.name);
            ip(&["netns", "add", &ns])?;
            ip_in(&ns, &["link", "set", "lo", "up"])?;
        }
        let this = &*self;
        let results: Vec<Result<(PodSpec, String, Duration), LabError>> = std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .map(|p| {
                    s.spawn(move || {
                        let ns = this.pod_netns(&p.name);
                        let start = Instant::now();
                        let (ok, out) = this.cni("ADD", p, Some(&ns), None)?;
                        if !ok {
                            return Err(LabError::Cni(format!("ADD {}: {out}", p.name)));
                        }
                        Ok((p.clone(), out, start.elapsed()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(LabError::Command("ADD thread panicked".into())))
                })
                .collect()
        });
        let mut times = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok((spec, out, took)) => {
                    times.push((spec.name.clone(), took));
                    self.state.pods.push(Pod {
                        netns: self.pod_netns(&spec.name),
                        container_id: self.container_id(&spec.name),
                        add_result: out,
                        spec,
                        pids: Vec::new(),
                    });
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        // Pods whose ADD failed still have a namespace: remove it.
        for p in pods {
            if !self.state.pods.iter().any(|q| q.spec.name == p.name) {
                let _ = ip(&["netns", "del", &self.pod_netns(&p.name)]);
            }
        }
        self.save()?;
        if let Some(e) = first_err {
            return Err(e);
        }
        for p in pods {
            self.start_pod_servers(&p.name)?;
        }
        self.save()?;
        Ok(times)
    }

    fn start_pod_servers(&mut self, name: &str) -> Result<(), LabError> {
        let Some(idx) = self.state.pods.iter().position(|p| p.spec.name == name) else {
            return Ok(());
        };
        let Some(pod) = self.state.pods.get(idx).cloned() else {
            return Ok(());
        };
        let is_dns = pod
            .spec
            .labels
            .get("k8s-app")
            .is_some_and(|v| v == "kube-dns")
            && sys::have("dnsmasq");
        let mut listeners = Listeners {
            tcp: pod.spec.tcp_ports.clone(),
            udp: pod.spec.udp_ports.clone(),
        };
        let mut pids = Vec::new();
        if is_dns {
            listeners.tcp.remove(&53);
            listeners.udp.remove(&53);
            let dns = self.state.dns.clone();
            pids.push(self.start_dnsmasq(&pod, &dns)?);
        }
        pids.extend(self.start_server(
            &pod.netns,
            &format!("pod-{}", sanitize(name)),
            &listeners,
        )?);
        if let Some(p) = self.state.pods.get_mut(idx) {
            p.pids = pids;
        }
        Ok(())
    }

    fn start_dnsmasq(
        &mut self,
        pod: &Pod,
        dns: &BTreeMap<String, Vec<Ipv4Addr>>,
    ) -> Result<u32, LabError> {
        let mut cmd = nsenter(&pod.netns, "dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            "--pid-file=",
        ])
        .arg(format!("--listen-address={}", pod.spec.ip))
        // Answers live a minute, like a cluster DNS's, so names learned stay learned.
        .arg("--local-ttl=60");
        for (name, ips) in dns {
            for a in ips {
                cmd.arg(format!("--address=/{name}/{a}"));
            }
        }
        // Every other name is NXDOMAIN (without upstreams dnsmasq would say REFUSED, which
        // is what the DNS proxy says to a query the policy denies).
        cmd.arg("--address=/#/");
        // Its log on stderr, so that readiness ("started") can be read below.
        cmd.arg("--log-facility=-");
        let log = self
            .cfg
            .dir
            .join(format!("logs/dns-{}.log", sanitize(&pod.spec.name)));
        let f = std::fs::File::create(&log).map_err(|e| LabError::Io(log.clone(), e))?;
        let f2 = f.try_clone().map_err(|e| LabError::Io(log.clone(), e))?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let mut child = spawn_detached(&mut cmd)?;
        let pid = child.id();
        // Flows must not race its start: a query before it binds is answered by "port
        // unreachable", which the probes would read as a packet that got through.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("started") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LabError::Command(format!(
                    "dnsmasq in {} exited ({status}): {}",
                    pod.spec.name,
                    text.trim()
                )));
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.children.push(child);
        Ok(pid)
    }

    /// Starts the workload server in namespace `ns`; waits until it listens.
    fn start_server(
        &mut self,
        ns: &str,
        tag: &str,
        listeners: &Listeners,
    ) -> Result<Option<u32>, LabError> {
        let args = listeners.server_args();
        if args.is_empty() {
            return Ok(None);
        }
        let log = self.cfg.dir.join(format!("logs/server-{tag}.log"));
        let f = std::fs::File::create(&log).map_err(|e| LabError::Io(log.clone(), e))?;
        let f2 = f.try_clone().map_err(|e| LabError::Io(log.clone(), e))?;
        let mut cmd = nsenter(ns, &self.cfg.python);
        cmd.arg("-c")
            .arg(SERVER_PY)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2);
        let child = spawn_detached(&mut cmd)?;
        let pid = child.id();
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening") {
                return Ok(Some(pid));
            }
            if !sys::alive(pid) || Instant::now() > deadline {
                return Err(LabError::Command(format!(
                    "server in {ns} did not start: {}",
                    text.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the pods `which` selects: CNI DEL, servers, namespace.
    pub fn remove_pods(&mut self, which: impl Fn(&Pod) -> bool) -> Result<usize, LabError> {
        let (gone, kept): (Vec<Pod>, Vec<Pod>) = std::mem::take(&mut self.state.pods)
            .into_iter()
            .partition(|p| which(p));
        self.state.pods = kept;
        let mut first_err = None;
        for p in &gone {
            self.kill_all(&p.pids);
            match self.cni("DEL", &p.spec, Some(&p.netns), Some(&p.add_result)) {
                Ok((true, _)) => {}
                Ok((false, out)) => {
                    first_err.get_or_insert(LabError::Cni(format!("DEL {}: {out}", p.spec.name)));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            let _ = ip(&["netns", "del", &p.netns]);
        }
        self.save()?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(gone.len()),
        }
    }

    /// Tears everything down (see [`down`]).
    pub fn down(mut self) -> Result<(), LabError> {
        self.keep = true;
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), LabError> {
        let mut pids: Vec<u32> = self
            .state
            .pods
            .iter()
            .flat_map(|p| p.pids.clone())
            .collect();
        pids.extend(self.state.world.pids.iter().copied());
        pids.extend(self.state.host.pids.iter().copied());
        self.kill_all(&pids);
        let _ = self.stop_agent(Signal::SIGKILL);
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        down(&self.cfg)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // WEIR_LAB_KEEP=1 leaves a failed lab in place for a post-mortem (`weir lab down`).
        if !self.keep && std::env::var_os("WEIR_LAB_KEEP").is_none() {
            let _ = self.teardown();
        }
    }
}

/// Spawns a long-lived process in its own process group (a Ctrl-C on `weir` leaves it be).
fn spawn_detached(cmd: &mut Command) -> Result<Child, LabError> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
        .spawn()
        .map_err(|e| LabError::Command(format!("{cmd:?}: {e}")))
}

/// Removes a lab whatever its state, also after a crash: processes recorded in its state
/// file, processes still running inside its namespaces, the namespaces with its prefix, the
/// bpffs mount and the lab directory. Idempotent.
pub fn down(cfg: &LabConfig) -> Result<(), LabError> {
    if let Ok(text) = std::fs::read_to_string(cfg.state_file())
        && let Ok(state) = serde_json::from_str::<LabState>(&text)
    {
        let mut pids: Vec<u32> = state.pods.iter().flat_map(|p| p.pids.clone()).collect();
        pids.extend(state.world.pids);
        pids.extend(state.host.pids);
        pids.extend(state.agent_pid);
        for pid in pids {
            sys::signal(pid, Signal::SIGKILL);
        }
    }
    let namespaces = sys::netns_with_prefix(&cfg.prefix);
    // Anything else still running in a lab namespace (a server whose pid was not recorded).
    for ns in &namespaces {
        if let Ok(out) = ip(&["netns", "pids", ns]) {
            for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                sys::signal(pid, Signal::SIGKILL);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut errors = Vec::new();
    for ns in namespaces.iter().rev() {
        if let Err(e) = ip(&["netns", "del", ns]) {
            errors.push(e.to_string());
        }
    }
    let bpffs = cfg.bpffs();
    if sys::is_bpffs(&bpffs) {
        let _ = std::fs::remove_dir_all(bpffs.join("weir"));
        if let Err(e) = run(Command::new("umount").arg(&bpffs)) {
            errors.push(e.to_string());
        }
    }
    if cfg.dir.exists()
        && !sys::is_bpffs(&bpffs)
        && let Err(e) = std::fs::remove_dir_all(&cfg.dir)
    {
        errors.push(format!("{}: {e}", cfg.dir.display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Command(errors.join("; ")))
    }
}
