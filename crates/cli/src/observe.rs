//! `weir observe`: flows from the agent's Observer API, with `hubble observe`'s flags.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, ValueEnum};
use weir_observe::format::{self, Output};
use weir_observe::model::{EVENT_DROP, EVENT_L7, EVENT_POLICY_VERDICT, EVENT_TRACE};
use weir_observe::proto::flow::{EventTypeFilter, FlowFilter, Verdict};
use weir_observe::proto::observer::GetFlowsRequest;
use weir_observe::proto::observer::observer_client::ObserverClient;

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputArg {
    /// One line per flow.
    Compact,
    /// Aligned columns.
    Table,
    /// One JSON flow per line.
    Json,
    /// One JSON GetFlowsResponse per line.
    Jsonpb,
}

/// `weir observe` flags.
#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// The Observer API's unix socket.
    #[arg(long, default_value = weir_observe::server::DEFAULT_HUBBLE_SOCKET)]
    hubble_socket: PathBuf,
    /// An Observer API TCP address (host:port) instead of the socket.
    #[arg(long)]
    server: Option<String>,
    /// Flows from or to this namespace.
    #[arg(short = 'n', long)]
    namespace: Vec<String>,
    /// Flows from or to this pod (`[ns/]name-prefix`).
    #[arg(long)]
    pod: Vec<String>,
    /// Flows from this pod.
    #[arg(long)]
    from_pod: Vec<String>,
    /// Flows to this pod.
    #[arg(long)]
    to_pod: Vec<String>,
    /// Flows from or to endpoints with this label selector (`app=web`).
    #[arg(short = 'l', long)]
    label: Vec<String>,
    /// Verdict: FORWARDED, DROPPED, REDIRECTED, ERROR, AUDIT.
    #[arg(long)]
    verdict: Vec<String>,
    /// Protocol: tcp, udp, icmp, http, dns.
    #[arg(long)]
    protocol: Vec<String>,
    /// Event type: l3_l4 (trace), l7, drop, policy-verdict.
    #[arg(short = 't', long = "type")]
    kind: Vec<String>,
    /// HTTP method.
    #[arg(long)]
    http_method: Vec<String>,
    /// HTTP path (regular expression).
    #[arg(long)]
    http_path: Vec<String>,
    /// Source or destination port.
    #[arg(long)]
    port: Vec<String>,
    /// Source or destination IP or CIDR.
    #[arg(long)]
    ip: Vec<String>,
    /// Flows since this long ago (`30s`, `5m`, `2h`) or this RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// The last N flows (default 20 unless --follow or --since).
    #[arg(long)]
    last: Option<u64>,
    /// Keep streaming new flows.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "compact")]
    output: OutputArg,
}

fn verdict(v: &str) -> anyhow::Result<i32> {
    Verdict::from_str_name(&v.to_ascii_uppercase())
        .map(|v| v as i32)
        .with_context(|| format!("unknown verdict {v:?}"))
}

fn event_type(t: &str) -> anyhow::Result<Vec<EventTypeFilter>> {
    let one = |t| EventTypeFilter {
        r#type: t,
        match_sub_type: false,
        sub_type: 0,
    };
    Ok(match t.to_ascii_lowercase().as_str() {
        "drop" => vec![one(EVENT_DROP)],
        "policy-verdict" => vec![one(EVENT_POLICY_VERDICT)],
        "l7" => vec![one(EVENT_L7)],
        "trace" => vec![one(EVENT_TRACE)],
        // Every L3/L4 flow Weir records is a drop or a policy verdict.
        "l3_l4" | "l3-l4" => vec![one(EVENT_DROP), one(EVENT_POLICY_VERDICT), one(EVENT_TRACE)],
        other => anyhow::bail!("unknown type {other:?} (l3_l4, l7, drop, policy-verdict, trace)"),
    })
}

fn since(s: &str) -> anyhow::Result<prost_types::Timestamp> {
    let unit = s.trim_start_matches(|c: char| c.is_ascii_digit());
    let digits = s.get(..s.len() - unit.len()).unwrap_or("");
    let secs: u64 = match (digits.parse::<u64>(), unit) {
        (Ok(n), "s") => n,
        (Ok(n), "m") => n.saturating_mul(60),
        (Ok(n), "h") => n.saturating_mul(3600),
        _ => anyhow::bail!("--since {s:?}: use a duration like 30s, 5m or 2h"),
    };
    let t = SystemTime::now()
        .checked_sub(Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(weir_observe::enrich::timestamp(t))
}

/// The whitelist the flags describe. Flags that name both directions (`--pod`, `--ip`,
/// `--namespace`, `--label`, `--port`) become two filters, source side and destination
/// side, ORed — as `hubble observe` does.
pub fn whitelist(a: &ObserveArgs) -> anyhow::Result<Vec<FlowFilter>> {
    let mut base = FlowFilter {
        verdict: a
            .verdict
            .iter()
            .map(|v| verdict(v))
            .collect::<Result<_, _>>()?,
        protocol: a.protocol.clone(),
        http_method: a.http_method.clone(),
        http_path: a.http_path.clone(),
        source_pod: a.from_pod.clone(),
        destination_pod: a.to_pod.clone(),
        ..FlowFilter::default()
    };
    for t in &a.kind {
        base.event_type.extend(event_type(t)?);
    }
    let mut pods: Vec<String> = a.pod.clone();
    pods.extend(a.namespace.iter().map(|ns| format!("{ns}/")));
    let two_sided =
        !pods.is_empty() || !a.ip.is_empty() || !a.label.is_empty() || !a.port.is_empty();
    if !two_sided {
        return Ok(vec![base]);
    }
    let mut src = base.clone();
    src.source_pod.extend(pods.iter().cloned());
    src.source_ip.extend(a.ip.iter().cloned());
    src.source_label.extend(a.label.iter().cloned());
    src.source_port.extend(a.port.iter().cloned());
    let mut dst = base;
    dst.destination_pod.extend(pods);
    dst.destination_ip.extend(a.ip.iter().cloned());
    dst.destination_label.extend(a.label.iter().cloned());
    dst.destination_port.extend(a.port.iter().cloned());
    Ok(vec![src, dst])
}

/// Runs `weir observe`.
pub fn run(a: &ObserveArgs) -> anyhow::Result<ExitCode> {
    let filters = whitelist(a)?;
    let since = a.since.as_deref().map(since).transpose()?;
    let number = match (a.last, a.follow || since.is_some()) {
        (Some(n), _) => n,
        (None, true) => 0,
        (None, false) => 20,
    };
    let req = GetFlowsRequest {
        number,
        first: false,
        follow: a.follow,
        blacklist: Vec::new(),
        whitelist: filters,
        since,
        until: None,
    };
    let output = match a.output {
        OutputArg::Compact => Output::Compact,
        OutputArg::Table => Output::Table,
        OutputArg::Json => Output::Json,
        OutputArg::Jsonpb => Output::JsonPb,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = match &a.server {
            Some(addr) => weir_observe::server::connect_tcp(addr).await?,
            None => weir_observe::server::connect_unix(&a.hubble_socket).await?,
        };
        let mut client = ObserverClient::new(channel);
        let mut stream = client.get_flows(req).await?.into_inner();
        if matches!(output, Output::Table) {
            println!("{}", format::TABLE_HEADER);
        }
        while let Some(resp) = stream.message().await? {
            let line = format::render(&resp, output);
            if !line.is_empty() {
                println!("{line}");
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ObserveArgs,
    }

    fn parse(args: &[&str]) -> ObserveArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        match T::try_parse_from(v) {
            Ok(t) => t.a,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn flags_become_hubble_filters() {
        let f =
            whitelist(&parse(&["--verdict", "dropped", "--namespace", "prod"])).unwrap_or_default();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].source_pod, vec!["prod/"]);
        assert_eq!(f[1].destination_pod, vec!["prod/"]);
        assert_eq!(f[0].verdict, vec![Verdict::Dropped as i32]);
        let f = whitelist(&parse(&[
            "--type",
            "policy-verdict",
            "--from-pod",
            "prod/client",
        ]))
        .unwrap_or_default();
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0].event_type.first().map(|e| e.r#type),
            Some(EVENT_POLICY_VERDICT)
        );
        assert_eq!(f[0].source_pod, vec!["prod/client"]);
        assert!(whitelist(&parse(&["--verdict", "nope"])).is_err());
        assert!(whitelist(&parse(&["--type", "nope"])).is_err());
    }

    #[test]
    fn since_durations() {
        assert!(since("30s").is_ok() && since("5m").is_ok() && since("2h").is_ok());
        assert!(since("x").is_err() && since("5d").is_err() && since("").is_err());
    }
}
