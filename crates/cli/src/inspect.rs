//! Commands that ask the running agent: `weir status`, `weir endpoint list`, `weir identity
//! list`, `weir policy get`, `weir bpf ...`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;
use weir_agent_api::v1::{
    BpfCtListRequest, BpfIpcacheListRequest, BpfPolicyGetRequest, FqdnCacheListRequest,
    GetPoliciesRequest, ListEndpointsRequest, ListIdentitiesRequest, StatusRequest,
    endpoint_service_client::EndpointServiceClient, inspect_service_client::InspectServiceClient,
    status_service_client::StatusServiceClient,
};

/// `weir bpf ...`
#[derive(Subcommand)]
pub enum BpfCommand {
    /// Policy map entries as the kernel holds them.
    #[command(subcommand)]
    Policy(BpfPolicyCommand),
    /// The ipcache (prefix → identity).
    #[command(subcommand)]
    Ipcache(ListOnly),
    /// Connection tracking entries.
    #[command(subcommand)]
    Ct(ListOnly),
}

/// `weir fqdn ...`
#[derive(Subcommand)]
pub enum FqdnCommand {
    /// Names the DNS proxy learned: name, address, identity, endpoint and expiry.
    #[command(subcommand)]
    Cache(ListOnly),
}

/// `weir bpf policy ...`
#[derive(Subcommand)]
pub enum BpfPolicyCommand {
    /// Entries of one endpoint, or of all with `--all`: direction, remote identity and its
    /// labels, port/protocol, action, proxy port, the rules behind each entry, and its packet
    /// and byte counters.
    ///
    /// The counters count the packets decided by the entry: the first packet of each
    /// connection it allowed or redirected, and every packet it denied. Packets of established
    /// connections pass through conntrack without a policy lookup and are not counted. The
    /// counts restart when the entry is written with a different action (policy updates that
    /// leave an entry as it is keep them).
    Get {
        /// The endpoint id.
        endpoint: Option<u32>,
        /// Every endpoint.
        #[arg(long)]
        all: bool,
    },
}

/// A `list` subcommand.
#[derive(Subcommand)]
pub enum ListOnly {
    /// List the entries.
    List,
}

/// Which view to print.
pub enum Query {
    /// `weir status`
    Status,
    /// `weir endpoint list`
    Endpoints,
    /// `weir identity list`
    Identities,
    /// `weir policy get`
    Policies,
    /// `weir bpf ...`
    Bpf(BpfCommand),
    /// `weir fqdn cache list`
    Fqdn(FqdnCommand),
}

/// A runtime for one command's calls.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A channel to the agent, or an error that says how to get one.
pub(crate) async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    weir_agent_api::connect_unix(socket).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is weir-agent running, and are you root?)",
            socket.display()
        )
    })
}

/// Runs a query against the agent at `socket`; `json` selects machine-readable output.
pub fn run(query: Query, socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let ch = connect(socket).await?;
        match query {
            Query::Status => status(ch, json).await,
            Query::Endpoints => endpoints(ch, json).await,
            Query::Identities => identities(ch, json).await,
            Query::Policies => policies(ch, json).await,
            Query::Bpf(b) => bpf(ch, b, json).await,
            Query::Fqdn(FqdnCommand::Cache(ListOnly::List)) => fqdn_cache(ch, json).await,
        }
    })
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            let w = c.lines().map(str::len).max().unwrap_or(0);
            if let Some(x) = widths.get_mut(i) {
                *x = (*x).max(w);
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            s.push_str(&format!("{c:<w$}   "));
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        // Multi-line cells (labels) continue on the next lines, as cilium-dbg prints them.
        let height = r
            .iter()
            .map(|c| c.lines().count().max(1))
            .max()
            .unwrap_or(1);
        for i in 0..height {
            line(r.iter().map(|c| c.lines().nth(i).unwrap_or("")).collect());
        }
    }
}

/// Milliseconds since the Unix epoch as UTC `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn fqdn_cache(ch: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut entries = InspectServiceClient::new(ch)
        .fqdn_cache_list(FqdnCacheListRequest {})
        .await?
        .into_inner()
        .entries;
    entries.sort_by(|a, b| (&a.pod, &a.name, &a.ip).cmp(&(&b.pod, &b.name, &b.ip)));
    if json {
        let v: Vec<_> = entries
            .iter()
            .map(|e| {
                json!({"endpoint": e.endpoint_id, "pod": e.pod, "name": e.name, "ip": e.ip,
                       "identity": e.identity, "learned": utc(e.learned_ms), "expires": utc(e.expires_ms)})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        table(
            &["ENDPOINT", "POD", "NAME", "IP", "IDENTITY", "EXPIRES"],
            entries
                .iter()
                .map(|e| {
                    vec![
                        e.endpoint_id.to_string(),
                        e.pod.clone(),
                        e.name.clone(),
                        e.ip.clone(),
                        e.identity.to_string(),
                        utc(e.expires_ms),
                    ]
                })
                .collect(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(ch: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let s = StatusServiceClient::new(ch)
        .status(StatusRequest {})
        .await?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "version": s.version, "datapath": s.datapath_backend, "cluster": s.cluster_name,
                "endpoints": s.endpoint_count, "identities": s.identity_count, "policy_revision": s.policy_revision,
                "uptime_seconds": s.uptime_seconds, "policy_errors": s.last_policy_error,
            }))?
        );
    } else {
        println!(
            "Weir agent:      OK (version {}, up {} s)",
            s.version, s.uptime_seconds
        );
        println!("Datapath:        {}", s.datapath_backend);
        println!("Cluster:         {}", s.cluster_name);
        println!("Endpoints:       {}", s.endpoint_count);
        println!("Identities:      {}", s.identity_count);
        println!("Policy revision: {}", s.policy_revision);
        if s.last_policy_error.is_empty() {
            println!("Policy errors:   none");
        } else {
            println!("Policy errors (the last good version of these files stays enforced):");
            for l in s.last_policy_error.lines() {
                println!("  {l}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn endpoints(ch: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let list = EndpointServiceClient::new(ch)
        .list_endpoints(ListEndpointsRequest {})
        .await?
        .into_inner()
        .endpoints;
    if json {
        let v: Vec<_> = list.iter().map(|e| json!({
            "id": e.endpoint_id, "pod": format!("{}/{}", e.namespace, e.pod_name), "identity": e.identity,
            "ingress_enforced": e.ingress_enforced, "egress_enforced": e.egress_enforced,
            "ipv4": e.ipv4_addresses, "ipv6": e.ipv6_addresses, "labels": e.labels, "state": e.state().as_str_name(),
        })).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let enf = |b: bool| if b { "Enabled" } else { "Disabled" }.to_string();
    let rows = list
        .iter()
        .map(|e| {
            let mut labels: Vec<String> = e
                .labels
                .iter()
                .map(|(k, v)| format!("k8s:{k}={v}"))
                .collect();
            labels.sort();
            labels.push(format!("k8s:io.kubernetes.pod.namespace={}", e.namespace));
            vec![
                e.endpoint_id.to_string(),
                enf(e.ingress_enforced),
                enf(e.egress_enforced),
                e.identity.to_string(),
                labels.join("\n"),
                e.ipv6_addresses.join(","),
                e.ipv4_addresses.join(","),
                if e.state == 2 {
                    "ready".into()
                } else {
                    "not-ready".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "ENDPOINT",
            "POLICY (ingress)",
            "POLICY (egress)",
            "IDENTITY",
            "LABELS (source:key[=value])",
            "IPv6",
            "IPv4",
            "STATUS",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

async fn identities(ch: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let list = InspectServiceClient::new(ch)
        .list_identities(ListIdentitiesRequest {})
        .await?
        .into_inner()
        .identities;
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|i| json!({"id": i.identity, "labels": i.labels}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        table(
            &["ID", "LABELS"],
            list.iter()
                .map(|i| vec![i.identity.to_string(), i.labels.join("\n")])
                .collect(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn policies(ch: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let p = InspectServiceClient::new(ch)
        .get_policies(GetPoliciesRequest {})
        .await?
        .into_inner();
    if json {
        let files: Vec<_> = p
            .files
            .iter()
            .map(|f| json!({"path": f.path, "policies": f.policies, "error": f.error}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"revision": p.revision, "files": files}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    for f in &p.files {
        println!("{}", f.path);
        for name in &f.policies {
            println!("  {name}");
        }
        if !f.error.is_empty() {
            println!("  REJECTED (last good version enforced):");
            for l in f.error.lines() {
                println!("    {l}");
            }
        }
    }
    println!("Revision: {}", p.revision);
    Ok(ExitCode::SUCCESS)
}

fn proto_name(p: u32) -> String {
    match p {
        0 => "ANY".into(),
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

async fn bpf(ch: Channel, cmd: BpfCommand, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = InspectServiceClient::new(ch);
    match cmd {
        BpfCommand::Policy(BpfPolicyCommand::Get { endpoint, all }) => {
            let endpoint_id = match (endpoint, all) {
                (Some(e), false) => e,
                (None, true) => 0,
                _ => anyhow::bail!("give an endpoint id or --all"),
            };
            let entries = client
                .bpf_policy_get(BpfPolicyGetRequest { endpoint_id })
                .await?
                .into_inner()
                .entries;
            if json {
                let v: Vec<_> = entries.iter().map(|e| json!({
                    "endpoint": e.endpoint_id, "direction": e.direction, "identity": e.identity, "labels": e.identity_labels,
                    "protocol": e.protocol, "port": e.port, "prefix_len": e.prefix_len, "action": e.action,
                    "proxy_port": e.proxy_port, "derived_from": e.derived_from,
                    "packets": e.packets, "bytes": e.bytes,
                })).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let rows = entries
                .iter()
                .map(|e| {
                    let port = match e.prefix_len {
                        0 => "ANY".to_string(),
                        8 => format!("ANY/{}", proto_name(e.protocol)),
                        24 => format!("{}/{}", e.port, proto_name(e.protocol)),
                        n => format!("{}/{} (/{})", e.port, proto_name(e.protocol), n - 8),
                    };
                    let labels = if e.identity == 0 {
                        "ANY".to_string()
                    } else {
                        e.identity_labels.join("\n")
                    };
                    vec![
                        e.endpoint_id.to_string(),
                        e.action.to_ascii_uppercase(),
                        e.direction.clone(),
                        format!("{}\n{labels}", e.identity),
                        port,
                        if e.proxy_port == 0 {
                            "NONE".into()
                        } else {
                            e.proxy_port.to_string()
                        },
                        e.packets.to_string(),
                        e.bytes.to_string(),
                        e.derived_from.join("\n"),
                    ]
                })
                .collect();
            table(
                &[
                    "ENDPOINT",
                    "POLICY",
                    "DIRECTION",
                    "IDENTITY / LABELS",
                    "PORT/PROTO",
                    "PROXY PORT",
                    "PACKETS",
                    "BYTES",
                    "FROM RULES",
                ],
                rows,
            );
        }
        BpfCommand::Ipcache(ListOnly::List) => {
            let entries = client
                .bpf_ipcache_list(BpfIpcacheListRequest {})
                .await?
                .into_inner()
                .entries;
            if json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| json!({"prefix": e.prefix, "identity": e.identity}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                table(
                    &["IP PREFIX", "IDENTITY"],
                    entries
                        .iter()
                        .map(|e| vec![e.prefix.clone(), e.identity.to_string()])
                        .collect(),
                );
            }
        }
        BpfCommand::Ct(ListOnly::List) => {
            let entries = client
                .bpf_ct_list(BpfCtListRequest {})
                .await?
                .into_inner()
                .entries;
            if json {
                let v: Vec<_> = entries.iter().map(|e| json!({
                    "src": e.src, "dst": e.dst, "sport": e.sport, "dport": e.dport, "protocol": e.protocol,
                    "direction": e.direction, "packets": e.packets, "bytes": e.bytes, "flags": e.flags, "proxy_port": e.proxy_port,
                })).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                table(
                    &[
                        "PROTO",
                        "SOURCE",
                        "DESTINATION",
                        "DIRECTION",
                        "PACKETS",
                        "BYTES",
                        "FLAGS",
                    ],
                    entries
                        .iter()
                        .map(|e| {
                            vec![
                                proto_name(e.protocol),
                                format!("{}:{}", e.src, e.sport),
                                format!("{}:{}", e.dst, e.dport),
                                e.direction.clone(),
                                e.packets.to_string(),
                                e.bytes.to_string(),
                                format!("{:#x}", e.flags),
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_epoch_milliseconds() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_795_911_960_514), "2026-11-29T00:26:00Z");
    }
}
