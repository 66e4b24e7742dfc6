//! `weir policy import` and `weir policy delete`: policy changes through the running agent,
//! which validates them whole, stores them in its policy directory and enforces them before
//! it answers.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use tonic::Code;
use weir_agent_api::v1::{
    DeletePolicyRequest, ImportPoliciesRequest, PolicyDocument,
    policy_service_client::PolicyServiceClient,
};

/// Files named directly (`-` is standard input) and the `.yaml`, `.yml` and `.json` files under
/// directories, recursively, sorted; each with its text.
fn read_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<PolicyDocument>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        if depth > 16 {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, depth + 1, out)?;
            } else if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut docs = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            docs.push(PolicyDocument {
                name: "<stdin>".into(),
                text,
            });
            continue;
        }
        let mut files = Vec::new();
        if p.is_dir() {
            walk(p, 0, &mut files)?;
        } else {
            files.push(p.clone());
        }
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            docs.push(PolicyDocument {
                name: f.display().to_string(),
                text,
            });
        }
    }
    anyhow::ensure!(!docs.is_empty(), "no policy files found");
    Ok(docs)
}

/// What a refused request prints: the agent's message, one problem per line.
fn refused(status: &tonic::Status, what: &str) -> ExitCode {
    eprintln!("{what} refused; nothing changed:");
    for l in status.message().lines() {
        eprintln!("  {l}");
    }
    ExitCode::from(1)
}

/// `weir policy import PATH...`
pub fn import(paths: &[PathBuf], socket: &Path, json_out: bool) -> anyhow::Result<ExitCode> {
    let files = read_inputs(paths)?;
    crate::inspect::runtime()?.block_on(async {
        let ch = crate::inspect::connect(socket).await?;
        let reply = PolicyServiceClient::new(ch)
            .import_policies(ImportPoliciesRequest { files })
            .await;
        let r = match reply {
            Ok(r) => r.into_inner(),
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition) => {
                return Ok(refused(&s, "import"));
            }
            Err(s) => anyhow::bail!("import failed: {}", s.message()),
        };
        if json_out {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "revision": r.revision, "policies": r.policies, "files": r.files,
                }))?
            );
        } else {
            for p in &r.policies {
                println!("imported {p}");
            }
            for f in &r.files {
                println!("  wrote {f}");
            }
            println!("Revision: {} (enforced)", r.revision);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `weir policy delete [NAMESPACE/]NAME`
pub fn delete(
    name: &str,
    kind: Option<&str>,
    socket: &Path,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    // `ns/name` for namespaced policies, a bare name for cluster-wide ones.
    let (namespace, name) = match name.split_once('/') {
        Some((ns, n)) => (ns.to_string(), n.to_string()),
        None => (String::new(), name.to_string()),
    };
    crate::inspect::runtime()?.block_on(async {
        let ch = crate::inspect::connect(socket).await?;
        let reply = PolicyServiceClient::new(ch)
            .delete_policy(DeletePolicyRequest {
                namespace,
                name,
                kind: kind.unwrap_or_default().to_string(),
            })
            .await;
        let r = match reply {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                eprintln!("weir: {}", s.message());
                return Ok(ExitCode::from(1));
            }
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition) => {
                return Ok(refused(&s, "delete"));
            }
            Err(s) => anyhow::bail!("delete failed: {}", s.message()),
        };
        if json_out {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "revision": r.revision, "deleted": r.deleted, "files": r.files,
                }))?
            );
        } else {
            println!("deleted {}", r.deleted);
            for f in &r.files {
                println!("  changed {f}");
            }
            println!("Revision: {} (enforced)", r.revision);
        }
        Ok(ExitCode::SUCCESS)
    })
}
