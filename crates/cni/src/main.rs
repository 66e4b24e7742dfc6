//! `weir-cni`: the CNI plugin binary. Reads the CNI environment and the network
//! configuration on stdin, prints a result or an error JSON on stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

use weir_cni::spec::{self, CniError, ErrorCode, Invocation};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors are reported in the caller's version when it is one we speak.
    let version = spec::requested_version(&stdin)
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::DEFAULT_VERSION.to_string());
    let outcome = read
        .map_err(|e| CniError::with_details(ErrorCode::Io, "cannot read stdin", e))
        .and_then(|_| Invocation::from_env(|k| std::env::var(k).ok()))
        .and_then(|inv| weir_cni::run(&inv, &stdin));
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(out) => {
            if !out.is_empty() {
                let _ = writeln!(stdout, "{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
