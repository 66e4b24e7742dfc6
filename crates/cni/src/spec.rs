//! The CNI specification's data, pure: environment variables, network
//! configuration, results and errors as JSON. No I/O happens here, so every
//! rule is unit-tested.
//!
//! Spec: CNI 1.0.0 (also answers 0.4.0 callers, whose results differ only in the
//! per-IP `version` field).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0"];

/// The version used when the caller did not say (VERSION, early errors).
pub const DEFAULT_VERSION: &str = "1.0.0";

/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Error codes from the CNI specification plus this plugin's own (100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// 1: the configuration's `cniVersion` is not supported.
    IncompatibleVersion = 1,
    /// 2: a configuration field is not supported.
    UnsupportedField = 2,
    /// 3: the container is unknown or does not exist.
    UnknownContainer = 3,
    /// 4: a required environment variable is missing or invalid.
    InvalidEnvironment = 4,
    /// 5: an I/O failure (state directory, netns file, ...).
    Io = 5,
    /// 6: stdin could not be decoded.
    Decode = 6,
    /// 7: the network configuration is invalid.
    InvalidConfig = 7,
    /// 11: transient; the runtime should retry.
    TryAgainLater = 11,
    /// 100: the agent could not be reached or refused the request.
    Agent = 100,
    /// 101: the agent did not report the endpoint ready in time.
    AgentNotReady = 101,
    /// 102: the pod CIDR has no free address.
    AddressesExhausted = 102,
    /// 103: a netlink operation failed.
    Netlink = 103,
    /// 104: CHECK found the container's networking not as ADD left it.
    CheckFailed = 104,
}

impl ErrorCode {
    /// The numeric code written to the error JSON.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// A CNI error result: written to stdout as `{cniVersion, code, msg, details}`
/// with a non-zero exit status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (code {}){}", code.code(), if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The spec or plugin error code.
    pub code: ErrorCode,
    /// Short message.
    pub msg: String,
    /// Longer explanation, may be empty.
    pub details: String,
}

impl CniError {
    /// An error without details.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// An error with details.
    pub fn with_details(code: ErrorCode, msg: impl Into<String>, details: impl ToString) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.to_string(),
        }
    }

    /// The error JSON for stdout, in `cni_version` (the caller's version when known).
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version,
            code: self.code.code(),
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":\"{DEFAULT_VERSION}\",\"code\":{}}}",
                self.code.code()
            )
        })
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach the container to the network.
    Add,
    /// Detach; idempotent.
    Del,
    /// Verify a previous ADD.
    Check,
    /// Report supported versions.
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "ADD" => Some(Self::Add),
            "DEL" => Some(Self::Del),
            "CHECK" => Some(Self::Check),
            "VERSION" => Some(Self::Version),
            _ => None,
        }
    }
}

/// One invocation's environment, validated per command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty only for VERSION).
    pub container_id: String,
    /// `CNI_NETNS`; optional for DEL, absent for VERSION.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (empty only for VERSION).
    pub ifname: String,
    /// `CNI_ARGS`, parsed.
    pub args: CniArgs,
    /// `CNI_PATH`, split on ':' (unused: this plugin delegates nothing).
    pub path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads and validates the environment through `get` (normally `std::env::var`).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let invalid = |msg: String| CniError::new(ErrorCode::InvalidEnvironment, msg);
        let command_raw =
            get("CNI_COMMAND").ok_or_else(|| invalid("CNI_COMMAND is not set".into()))?;
        let command = Command::parse(&command_raw)
            .ok_or_else(|| invalid(format!("unknown CNI_COMMAND {command_raw:?}")))?;
        let path = get("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        if command == Command::Version {
            return Ok(Self {
                command,
                container_id: String::new(),
                netns: None,
                ifname: String::new(),
                args: CniArgs::default(),
                path,
            });
        }
        let container_id = get("CNI_CONTAINERID")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("CNI_CONTAINERID is not set".into()))?;
        validate_container_id(&container_id)?;
        let ifname = get("CNI_IFNAME")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("CNI_IFNAME is not set".into()))?;
        validate_ifname(&ifname)?;
        let netns = get("CNI_NETNS")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        // DEL may come after the namespace is gone; ADD and CHECK need it.
        if netns.is_none() && command != Command::Del {
            return Err(invalid("CNI_NETNS is not set".into()));
        }
        let args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// The spec allows alphanumerics plus `_`, `.` and `-`, starting alphanumeric.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid CNI_CONTAINERID {id:?}"),
        ))
    }
}

/// Linux interface-name rules, as the spec requires plugins to enforce.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid CNI_IFNAME {name:?}"),
        ))
    }
}

/// `CNI_ARGS`: `K=V;K=V`, with the Kubernetes keys pulled out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `IP`: the address the caller wants, as host-local's `IP=` argument.
    pub ip: Option<Ipv4Addr>,
    /// Every pair in order, including the ones above.
    pub pairs: Vec<(String, String)>,
}

impl CniArgs {
    /// Parses `K=V;K=V`; empty segments are ignored, a segment without `=` is an error.
    pub fn parse(raw: &str) -> Result<Self, CniError> {
        let mut out = Self::default();
        for segment in raw.split(';').filter(|s| !s.is_empty()) {
            let (k, v) = segment.split_once('=').ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS segment {segment:?} is not KEY=VALUE"),
                )
            })?;
            match k {
                "K8S_POD_NAMESPACE" => out.pod_namespace = Some(v.to_string()),
                "K8S_POD_NAME" => out.pod_name = Some(v.to_string()),
                "IP" => {
                    out.ip = Some(v.parse().map_err(|_| {
                        CniError::new(
                            ErrorCode::InvalidEnvironment,
                            format!("CNI_ARGS IP={v:?} is not an IPv4 address"),
                        )
                    })?);
                }
                _ => {}
            }
            out.pairs.push((k.to_string(), v.to_string()));
        }
        Ok(out)
    }
}

/// The network configuration from stdin (fields this plugin reads; others are
/// ignored, as runtimes add their own).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Spec version of this configuration.
    pub cni_version: String,
    /// Network name; also names the IPAM state directory.
    pub name: String,
    /// Plugin type (the binary's name).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// `"ipam": {"subnet": "10.200.1.0/24", "gateway": "10.200.1.1"}`.
    #[serde(default)]
    pub ipam: Option<IpamConf>,
    /// The node's pod CIDR, when not given under `ipam.subnet`.
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    /// Agent API socket; default `/run/weir/agent.sock`.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// IPAM state directory; default `/var/lib/weir/cni`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// MTU of both veth ends; kernel default when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// How long ADD waits for the agent to report the endpoint ready (default 30).
    #[serde(default)]
    pub ready_timeout_seconds: Option<u64>,
    /// Runtime-supplied values (`runtimeConfig.labels`).
    #[serde(default)]
    pub runtime_config: Option<serde_json::Value>,
    /// Conventional `args` (`args.cni.labels`).
    #[serde(default)]
    pub args: Option<serde_json::Value>,
    /// The result of the previous plugin or of ADD (CHECK, DEL).
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
}

/// The `ipam` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    /// Pod CIDR.
    #[serde(default)]
    pub subnet: Option<String>,
    /// Address reserved for the node (never handed out); default: first host.
    #[serde(default)]
    pub gateway: Option<String>,
}

/// Default IPAM state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weir/cni";

/// Default ready timeout for ADD, seconds.
pub const DEFAULT_READY_TIMEOUT_SECS: u64 = 30;

impl NetConf {
    /// Decodes stdin and checks the version and required fields.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(stdin).map_err(|e| {
            CniError::with_details(ErrorCode::Decode, "cannot decode network configuration", e)
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::with_details(
                ErrorCode::IncompatibleVersion,
                format!("unsupported cniVersion {:?}", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "network name is empty",
            ));
        }
        Ok(conf)
    }

    /// The pod CIDR (`ipam.subnet`, else `podCIDR`). IPv4 only, /8 to /30.
    pub fn subnet(&self) -> Result<Ipv4Net, CniError> {
        let raw = self
            .ipam
            .as_ref()
            .and_then(|i| i.subnet.as_deref())
            .or(self.pod_cidr.as_deref())
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    "no pod CIDR: set ipam.subnet or podCIDR",
                )
            })?;
        let net: Ipv4Net = raw.parse().map_err(|e| {
            CniError::with_details(
                ErrorCode::InvalidConfig,
                format!("invalid pod CIDR {raw:?}"),
                e,
            )
        })?;
        if !(8..=30).contains(&net.prefix_len()) {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!("pod CIDR {net} must be between /8 and /30"),
            ));
        }
        Ok(net.trunc())
    }

    /// The reserved node address: `ipam.gateway` or the subnet's first host.
    pub fn gateway(&self, subnet: Ipv4Net) -> Result<Ipv4Addr, CniError> {
        match self.ipam.as_ref().and_then(|i| i.gateway.as_deref()) {
            Some(raw) => {
                let gw: Ipv4Addr = raw.parse().map_err(|e| {
                    CniError::with_details(
                        ErrorCode::InvalidConfig,
                        format!("invalid gateway {raw:?}"),
                        e,
                    )
                })?;
                if subnet.contains(&gw) {
                    Ok(gw)
                } else {
                    Err(CniError::new(
                        ErrorCode::InvalidConfig,
                        format!("gateway {gw} is outside {subnet}"),
                    ))
                }
            }
            None => subnet.hosts().next().ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("{subnet} has no host address"),
                )
            }),
        }
    }

    /// Pod labels: `args.cni.labels` (a list of `{key, value}` or a map), then
    /// `runtimeConfig.labels` (a map), the latter winning on conflicts.
    pub fn labels(&self) -> Result<BTreeMap<String, String>, CniError> {
        let mut out = BTreeMap::new();
        let from_args = self
            .args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("labels"));
        if let Some(v) = from_args {
            merge_labels(&mut out, v, "args.cni.labels")?;
        }
        if let Some(v) = self.runtime_config.as_ref().and_then(|r| r.get("labels")) {
            merge_labels(&mut out, v, "runtimeConfig.labels")?;
        }
        Ok(out)
    }

    /// Named container ports from `runtimeConfig.namedPorts`
    /// (`[{"name": "http", "port": 8080, "protocol": "TCP"}]`; protocol defaults to TCP).
    pub fn named_ports(&self) -> Result<Vec<weir_agent_api::v1::NamedPort>, CniError> {
        let Some(items) = self
            .runtime_config
            .as_ref()
            .and_then(|r| r.get("namedPorts"))
            .filter(|v| !v.is_null())
        else {
            return Ok(Vec::new());
        };
        let bad = || {
            CniError::new(
                ErrorCode::InvalidConfig,
                "runtimeConfig.namedPorts must be a list of {name, port, protocol}",
            )
        };
        let mut out = Vec::new();
        for item in items.as_array().ok_or_else(bad)? {
            let name = item.get("name").and_then(|v| v.as_str()).ok_or_else(bad)?;
            let port = item
                .get("port")
                .and_then(|v| v.as_u64())
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(bad)?;
            let protocol = item
                .get("protocol")
                .and_then(|v| v.as_str())
                .unwrap_or("TCP");
            out.push(weir_agent_api::v1::NamedPort {
                name: name.to_string(),
                port: u32::from(port),
                protocol: protocol.to_string(),
            });
        }
        Ok(out)
    }

    /// The address ADD reported, from `prevResult` (CHECK): the first IPv4 `ips[].address`.
    pub fn prev_ipv4(&self) -> Option<Ipv4Net> {
        self.prev_result
            .as_ref()?
            .get("ips")?
            .as_array()?
            .iter()
            .filter_map(|ip| ip.get("address")?.as_str()?.parse::<Ipv4Net>().ok())
            .next()
    }
}

fn merge_labels(
    out: &mut BTreeMap<String, String>,
    value: &serde_json::Value,
    field: &str,
) -> Result<(), CniError> {
    let bad = || {
        CniError::new(
            ErrorCode::InvalidConfig,
            format!("{field} must map strings to strings"),
        )
    };
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone(), v.as_str().ok_or_else(bad)?.to_string());
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                let k = item.get("key").and_then(|k| k.as_str()).ok_or_else(bad)?;
                let v = item.get("value").and_then(|v| v.as_str()).ok_or_else(bad)?;
                out.insert(k.to_string(), v.to_string());
            }
        }
        serde_json::Value::Null => {}
        _ => return Err(bad()),
    }
    Ok(())
}

/// The VERSION reply.
pub fn version_json(cni_version: Option<&str>) -> String {
    let version = cni_version
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(DEFAULT_VERSION);
    serde_json::json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// The `cniVersion` of a VERSION request's stdin, if it parses.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(stdin).ok()?;
    Some(v.get("cniVersion")?.as_str()?.to_string())
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The netns path for container-side interfaces; absent for host-side ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpConfig {
    /// `"4"`; only written for 0.4.0 results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// CIDR notation, e.g. `10.200.1.5/32`.
    pub address: String,
    /// The default gateway for this address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteConfig {
    /// Destination CIDR.
    pub dst: String,
    /// Next hop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// The ADD success result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddResult {
    /// Version of the result, the configuration's.
    pub cni_version: String,
    /// Host then container interface.
    pub interfaces: Vec<Interface>,
    /// Assigned addresses.
    pub ips: Vec<IpConfig>,
    /// Routes set in the container.
    pub routes: Vec<RouteConfig>,
    /// DNS is left to the runtime.
    pub dns: serde_json::Value,
}

/// The link-local next hop every pod uses; the host-side veth answers for it
/// through a permanent neighbour entry in the pod.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What ADD built, as plain data, to render as a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Host-side veth name.
    pub host_ifname: String,
    /// Host-side veth MAC.
    pub host_mac: [u8; 6],
    /// Container-side interface name.
    pub ifname: String,
    /// Container-side MAC.
    pub container_mac: [u8; 6],
    /// Netns path.
    pub netns: String,
    /// The pod's address (a /32 in the pod).
    pub ip: Ipv4Addr,
}

impl AddResult {
    /// The result for `attachment`, shaped for `cni_version`.
    pub fn new(cni_version: &str, attachment: &Attachment) -> Self {
        let version = (cni_version == "0.4.0").then(|| "4".to_string());
        Self {
            cni_version: cni_version.to_string(),
            interfaces: vec![
                Interface {
                    name: attachment.host_ifname.clone(),
                    mac: format_mac(&attachment.host_mac),
                    sandbox: None,
                },
                Interface {
                    name: attachment.ifname.clone(),
                    mac: format_mac(&attachment.container_mac),
                    sandbox: Some(attachment.netns.clone()),
                },
            ],
            ips: vec![IpConfig {
                version,
                address: format!("{}/32", attachment.ip),
                gateway: Some(POD_GATEWAY.to_string()),
                interface: Some(1),
            }],
            routes: vec![RouteConfig {
                dst: "0.0.0.0/0".into(),
                gw: Some(POD_GATEWAY.to_string()),
            }],
            dns: serde_json::json!({}),
        }
    }

    /// The JSON for stdout.
    pub fn to_json(&self) -> Result<String, CniError> {
        serde_json::to_string(self)
            .map_err(|e| CniError::with_details(ErrorCode::Io, "cannot encode result", e))
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// The host-side veth name: `weir` + 11 hex digits of a hash of container id and
/// ifname, so it is stable across retries and fits IFNAMSIZ.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a: stable across releases (unlike std's hasher); collisions are
    // harmless beyond a failed ADD, and 44 bits make them rare.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let hex = format!("{hash:016x}");
    format!("weir{}", hex.get(..11).unwrap_or(&hex))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ADD_ENV: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-1",
        ),
    ];

    #[test]
    fn parses_add_environment() {
        let inv = Invocation::from_env(env(ADD_ENV)).expect("valid");
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.container_id, "abc123");
        assert_eq!(inv.netns, Some(PathBuf::from("/var/run/netns/x")));
        assert_eq!(inv.args.pod_namespace.as_deref(), Some("prod"));
        assert_eq!(inv.args.pod_name.as_deref(), Some("web-1"));
        assert_eq!(inv.path.len(), 2);
    }

    fn code_of(pairs: &[(&str, &str)]) -> Option<u32> {
        Invocation::from_env(env(pairs))
            .err()
            .map(|e| e.code.code())
    }

    #[test]
    fn missing_or_invalid_variables_are_code_4() {
        assert_eq!(code_of(&[]), Some(4));
        assert_eq!(code_of(&[("CNI_COMMAND", "FROB")]), Some(4));
        let without = |k: &str| {
            ADD_ENV
                .iter()
                .copied()
                .filter(|(n, _)| *n != k)
                .collect::<Vec<_>>()
        };
        assert_eq!(code_of(&without("CNI_CONTAINERID")), Some(4));
        assert_eq!(code_of(&without("CNI_IFNAME")), Some(4));
        assert_eq!(code_of(&without("CNI_NETNS")), Some(4));
        let with = |k: &str, v: &'static str| {
            ADD_ENV
                .iter()
                .map(|&(n, o)| (n, if n == k { v } else { o }))
                .collect::<Vec<_>>()
        };
        assert_eq!(code_of(&with("CNI_IFNAME", "a-very-long-name0")), Some(4));
        assert_eq!(code_of(&with("CNI_IFNAME", "..")), Some(4));
        assert_eq!(code_of(&with("CNI_IFNAME", "eth/0")), Some(4));
        assert_eq!(code_of(&with("CNI_CONTAINERID", "../etc")), Some(4));
        assert_eq!(code_of(&with("CNI_ARGS", "novalue")), Some(4));
    }

    #[test]
    fn del_without_netns_and_version_without_anything_are_fine() {
        let del: Vec<_> = ADD_ENV
            .iter()
            .map(|&(k, v)| (k, if k == "CNI_COMMAND" { "DEL" } else { v }))
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        assert_eq!(Invocation::from_env(env(&del)).map(|i| i.netns), Ok(None));
        let v = Invocation::from_env(env(&[("CNI_COMMAND", "VERSION")])).map(|i| i.command);
        assert_eq!(v, Ok(Command::Version));
    }

    const CONF: &str = r#"{
        "cniVersion": "1.0.0", "name": "weir", "type": "weir-cni",
        "ipam": {"subnet": "10.200.1.0/24"},
        "agentSocket": "/tmp/a.sock",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"labels": {"app": "web", "tier": "front"}},
        "args": {"cni": {"labels": [{"key": "app", "value": "old"}, {"key": "team", "value": "x"}]}}
    }"#;

    #[test]
    fn requested_ip_and_named_ports() {
        let args = CniArgs::parse("IgnoreUnknown=1;IP=10.0.1.10").expect("valid");
        assert_eq!(args.ip, Some(Ipv4Addr::new(10, 0, 1, 10)));
        assert!(CniArgs::parse("IP=nope").is_err());
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"weir-cni",
                "runtimeConfig":{"namedPorts":[{"name":"http","port":8080},
                                               {"name":"dns","port":53,"protocol":"UDP"}]}}"#,
        )
        .expect("valid");
        let ports = conf.named_ports().expect("ports");
        assert_eq!(ports.len(), 2);
        assert_eq!(
            ports.first().map(|p| (p.port, p.protocol.as_str())),
            Some((8080, "TCP"))
        );
        let bad = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"weir-cni",
                "runtimeConfig":{"namedPorts":[{"name":"x","port":70000}]}}"#,
        )
        .expect("valid");
        assert!(bad.named_ports().is_err());
    }

    #[test]
    fn parses_config_subnet_gateway_and_labels() {
        let conf = NetConf::parse(CONF.as_bytes()).expect("valid");
        let subnet = conf.subnet().expect("subnet");
        assert_eq!(subnet.to_string(), "10.200.1.0/24");
        assert_eq!(conf.gateway(subnet), Ok(Ipv4Addr::new(10, 200, 1, 1)));
        let labels = conf.labels().expect("labels");
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(labels.get("team").map(String::as_str), Some("x"));
        assert_eq!(labels.get("tier").map(String::as_str), Some("front"));
        assert_eq!(conf.agent_socket, Some(PathBuf::from("/tmp/a.sock")));
    }

    #[test]
    fn pod_cidr_field_and_explicit_gateway() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"weir-cni","podCIDR":"10.9.0.7/16",
                "ipam":{"gateway":"10.9.255.254"}}"#,
        )
        .expect("valid");
        let subnet = conf.subnet().expect("subnet");
        assert_eq!(subnet.to_string(), "10.9.0.0/16");
        assert_eq!(conf.gateway(subnet), Ok(Ipv4Addr::new(10, 9, 255, 254)));
    }

    #[test]
    fn config_errors_have_spec_codes() {
        let code = |s: &str| NetConf::parse(s.as_bytes()).err().map(|e| e.code.code());
        assert_eq!(code("not json"), Some(6));
        assert_eq!(
            code(r#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#),
            Some(1)
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"","type":"t"}"#),
            Some(7)
        );
        let conf = |s: &str| NetConf::parse(s.as_bytes()).expect("valid");
        let no_cidr = conf(r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#);
        assert_eq!(no_cidr.subnet().err().map(|e| e.code.code()), Some(7));
        let tiny = conf(r#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDR":"10.0.0.0/31"}"#);
        assert_eq!(tiny.subnet().err().map(|e| e.code.code()), Some(7));
        let outside = conf(
            r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"subnet":"10.0.0.0/24","gateway":"10.1.0.1"}}"#,
        );
        let subnet = outside.subnet().expect("subnet");
        assert_eq!(
            outside.gateway(subnet).err().map(|e| e.code.code()),
            Some(7)
        );
        let bad_labels = conf(
            r#"{"cniVersion":"1.0.0","name":"n","type":"t","runtimeConfig":{"labels":{"a":1}}}"#,
        );
        assert_eq!(bad_labels.labels().err().map(|e| e.code.code()), Some(7));
    }

    fn attachment() -> Attachment {
        Attachment {
            host_ifname: "weir0123456789a".into(),
            host_mac: [0xee, 0, 0, 0, 0, 1],
            ifname: "eth0".into(),
            container_mac: [0x02, 0xab, 0, 0, 0, 2],
            netns: "/var/run/netns/x".into(),
            ip: Ipv4Addr::new(10, 200, 1, 5),
        }
    }

    #[test]
    fn add_result_json_1_0_0() {
        let json = AddResult::new("1.0.0", &attachment())
            .to_json()
            .expect("json");
        let v: serde_json::Value = serde_json::from_str(&json).expect("parse");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["interfaces"][1]["name"], "eth0");
        assert_eq!(v["interfaces"][1]["mac"], "02:ab:00:00:00:02");
        assert_eq!(v["interfaces"][1]["sandbox"], "/var/run/netns/x");
        assert!(v["interfaces"][0].get("sandbox").is_none());
        assert_eq!(v["ips"][0]["address"], "10.200.1.5/32");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(v["routes"][0]["gw"], "169.254.1.1");
    }

    #[test]
    fn add_result_json_0_4_0_has_ip_version() {
        let json = AddResult::new("0.4.0", &attachment())
            .to_json()
            .expect("json");
        let v: serde_json::Value = serde_json::from_str(&json).expect("parse");
        assert_eq!(v["ips"][0]["version"], "4");
    }

    #[test]
    fn prev_result_address_is_read() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDR":"10.0.0.0/24",
                "prevResult":{"ips":[{"address":"10.0.0.9/32"}]}}"#,
        )
        .expect("valid");
        assert_eq!(
            conf.prev_ipv4().map(|n| n.addr()),
            Some(Ipv4Addr::new(10, 0, 0, 9))
        );
    }

    #[test]
    fn error_json_shape() {
        let err = CniError::with_details(ErrorCode::Agent, "agent down", "no socket");
        let v: serde_json::Value = serde_json::from_str(&err.to_json("0.4.0")).expect("parse");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 100);
        assert_eq!(v["msg"], "agent down");
        assert_eq!(v["details"], "no socket");
        let plain: serde_json::Value =
            serde_json::from_str(&CniError::new(ErrorCode::Decode, "x").to_json("1.0.0"))
                .expect("parse");
        assert!(plain.get("details").is_none());
    }

    #[test]
    fn version_reply_lists_supported_versions() {
        let v: serde_json::Value =
            serde_json::from_str(&version_json(Some("0.4.0"))).expect("parse");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.4.0", "1.0.0"])
        );
        let v: serde_json::Value =
            serde_json::from_str(&version_json(Some("9.9.9"))).expect("parse");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            requested_version(br#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
        assert_eq!(requested_version(b""), None);
    }

    #[test]
    fn host_ifname_is_stable_short_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("weir"));
        assert_ne!(a, host_ifname("abd", "eth0"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert!(validate_ifname(&a).is_ok());
    }
}
