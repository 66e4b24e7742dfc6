//! The `weir` binary against a real agent in a lab (root only; skips with the reason
//! otherwise): `policy import` of a good and a bad set, `policy delete`, persistence across an
//! agent restart, and `weir connectivity test` end to end.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use weir_lab::cluster::ClusterSpec;
use weir_lab::{Lab, LabConfig, Signal};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn weir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weir"))
}

/// target/debug, where weir, weir-agent and weir-cni are.
fn bin_dir() -> PathBuf {
    weir().parent().map(Path::to_path_buf).unwrap_or_default()
}

fn can_run_a_lab() -> bool {
    if !is_root() {
        eprintln!("SKIP: the lab needs root");
        return false;
    }
    for b in ["weir-agent", "weir-cni"] {
        if !bin_dir().join(b).exists() {
            eprintln!("SKIP: {b} not built (cargo build -p weir-agent -p weir-cni)");
            return false;
        }
    }
    for tool in ["ip", "nsenter", "python3", "dnsmasq"] {
        if !weir_lab::sys::have(tool) {
            eprintln!("SKIP: {tool} is missing (scripts/setup installs it)");
            return false;
        }
    }
    true
}

fn connects(lab: &Lab, from_pod: &str, to: SocketAddr) -> Result<bool, Box<dyn std::error::Error>> {
    let ns = weir_lab::sys::netns_path(&lab.pod(from_pod).ok_or("no pod")?.netns);
    Ok(weir_lab::sys::in_netns(&ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(1000)).is_ok()
    })?)
}

fn weir_at(socket: &Path, args: &[&str]) -> Result<Output, std::io::Error> {
    Command::new(weir())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A lab (namespaces named `weir<tag><pid>-`) and the seed's allow-frontend-to-backend
/// scenario as a cluster spec.
fn seed_02_lab(tag: &str, dir: &Path) -> Result<(Lab, ClusterSpec), Box<dyn std::error::Error>> {
    let cfg = LabConfig::new(
        &format!("weir{tag}{}-", std::process::id()),
        &dir.join("lab"),
        &bin_dir(),
    );
    let lab = Lab::up(cfg)?;
    let path = repo().join("examples/seed/02-allow-frontend-to-backend.yaml");
    let s = weir_scenario::parse_scenario("02.yaml", &std::fs::read_to_string(path)?)
        .map_err(|e| format!("{e:?}"))?;
    Ok((lab, ClusterSpec::from_scenario(&s)))
}

#[test]
fn policy_import_and_delete_through_the_agent() -> TestResult {
    if !can_run_a_lab() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (mut lab, mut spec) = seed_02_lab("ci", dir.path())?;
    let policy = spec.policies.pop().ok_or("no policy")?;
    lab.apply(&spec)?; // pods only
    let socket = lab.config().socket();
    let backend: SocketAddr = "10.0.1.20:8080".parse()?;
    assert!(connects(&lab, "reporting-1", backend)?, "no policy: open");

    // A good file: enforced by the time the command returns (no waiting for a watcher).
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, &policy.text)?;
    let out = weir_at(&socket, &["policy", "import", &good.display().to_string()])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("imported CiliumNetworkPolicy production/allow-frontend-to-backend"),
        "{}",
        text(&out)
    );
    assert!(!connects(&lab, "reporting-1", backend)?, "imported: denied");
    assert!(connects(&lab, "frontend-1", backend)?, "imported: allowed");
    let stored = lab
        .config()
        .policy_dir()
        .join("imported/cnp-production-allow-frontend-to-backend.yaml");
    assert!(stored.exists(), "persisted in the policy directory");

    // A bad set: rejected whole with file:line:col, the good change next to it not applied.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        policy.text.replace("endpointSelector:", "endpointSelectr:"),
    )?;
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        policy
            .text
            .replace("allow-frontend-to-backend", "allow-reporting")
            .replace("app: frontend", "app: reporting"),
    )?;
    let out = weir_at(
        &socket,
        &[
            "policy",
            "import",
            &other.display().to_string(),
            &bad.display().to_string(),
        ],
    )?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let loc = format!("{}:", bad.display());
    let after = err.split(&loc).nth(1).unwrap_or_default();
    let mut parts = after.split(':');
    assert!(
        parts.next().is_some_and(|l| l.parse::<u32>().is_ok())
            && parts.next().is_some_and(|c| c.parse::<u32>().is_ok()),
        "file:line:col in {err}"
    );
    assert!(err.contains("nothing changed"), "{err}");
    assert!(
        !connects(&lab, "reporting-1", backend)?,
        "rejected: unchanged"
    );
    let out = weir_at(&socket, &["--json", "policy", "get"])?;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("allow-reporting"),
        "{}",
        text(&out)
    );

    // A restart reads the imported policy back from the directory.
    lab.stop_agent(Signal::SIGTERM)?;
    lab.start_agent()?;
    assert!(
        !connects(&lab, "reporting-1", backend)?,
        "restart: still denied"
    );
    assert!(
        connects(&lab, "frontend-1", backend)?,
        "restart: still allowed"
    );

    // Delete: gone from the kernel and the directory; a second delete says it is unknown.
    let out = weir_at(
        &socket,
        &["policy", "delete", "production/allow-frontend-to-backend"],
    )?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(connects(&lab, "reporting-1", backend)?, "deleted: open");
    assert!(!stored.exists());
    let out = weir_at(
        &socket,
        &["policy", "delete", "production/allow-frontend-to-backend"],
    )?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no policy"));
    lab.down()?;
    Ok(())
}

#[test]
fn connectivity_test_end_to_end() -> TestResult {
    if !can_run_a_lab() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let prefix = format!("weirct{}-", std::process::id());
    let out = Command::new(weir())
        .args(["connectivity", "test"])
        .env("WEIR_CONNECTIVITY_DIR", dir.path().join("ct"))
        .env("WEIR_CONNECTIVITY_PREFIX", &prefix)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for phase in [
        "no-policies",
        "ingress-policy",
        "egress-l7-dns",
        "deny-policy",
    ] {
        assert!(stdout.contains(&format!("== {phase}:")), "{stdout}");
    }
    assert!(stdout.contains("deny (http 403)") && stdout.contains("deny (dns REFUSED)"));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed, 0 skipped"), "{last}");
    // It cleaned up after itself.
    assert!(weir_lab::sys::netns_with_prefix(&prefix).is_empty());
    assert!(!dir.path().join("ct").exists());
    Ok(())
}

/// `weir observe --follow` as a user runs it: the binary streams, with its filters applied
/// on the server, the flows of traffic that starts after it, until it is stopped.
#[test]
fn observe_follow_streams_new_flows_through_the_weir_binary() -> TestResult {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;

    if !can_run_a_lab() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (mut lab, spec) = seed_02_lab("of", dir.path())?;
    let hubble = lab.config().socket().with_file_name("hubble.sock");
    lab.apply(&spec)?;
    let backend: SocketAddr = "10.0.1.20:8080".parse()?;

    // Only drops toward the backend's port: the allowed connection below must not show.
    let mut follow = Command::new(weir())
        .arg("observe")
        .arg("--hubble-socket")
        .arg(&hubble)
        .args([
            "--follow",
            "--verdict",
            "DROPPED",
            "--port",
            "8080",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = follow.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The stream is open once the command has connected; give it a moment, then make sure
    // no history was printed (follow without --last starts now).
    std::thread::sleep(Duration::from_millis(500));
    let early: Vec<String> = rx.try_iter().collect();

    // The command may still be connecting on a loaded machine: repeat the pair of
    // connections until the drop shows (each round is new traffic after the stream opened).
    let mut lines = early;
    let mut drop_seen = None;
    for _ in 0..5 {
        assert!(
            connects(&lab, "frontend-1", backend)?,
            "frontend → backend allowed"
        );
        assert!(
            !connects(&lab, "reporting-1", backend)?,
            "reporting → backend denied"
        );
        let round = std::time::Instant::now() + Duration::from_secs(2);
        while drop_seen.is_none() && std::time::Instant::now() < round {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                let v: serde_json::Value = serde_json::from_str(&l)?;
                if v["source"]["pod_name"] == "reporting-1" {
                    drop_seen = Some(v.clone());
                }
                lines.push(l);
            }
        }
        if drop_seen.is_some() {
            break;
        }
    }
    let _ = follow.kill();
    let status = follow.wait()?;
    let mut err = String::new();
    if let Some(mut e) = follow.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let v = drop_seen
        .ok_or_else(|| format!("no drop followed ({status}); lines {lines:#?}\nstderr {err}"))?;
    assert_eq!(v["verdict"], "DROPPED", "{v}");
    assert_eq!(v["destination"]["pod_name"], "backend-1", "{v}");
    assert_eq!(v["l4"]["TCP"]["destination_port"], 8080, "{v}");
    // The filters ran on the server: nothing forwarded, nothing from frontend-1.
    for l in &lines {
        let f: serde_json::Value = serde_json::from_str(l)?;
        assert_eq!(f["verdict"], "DROPPED", "{l}");
        assert_ne!(f["source"]["pod_name"], "frontend-1", "{l}");
    }

    // `weir bpf policy get` counts, per entry, the packets it decided: the backend's entry
    // for 8080 decided the frontend's connections above.
    let out = weir_at(
        &lab.config().socket(),
        &["--json", "bpf", "policy", "get", "--all"],
    )?;
    assert!(out.status.success(), "{}", text(&out));
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let counted = entries
        .as_array()
        .ok_or("entries are not an array")?
        .iter()
        .find(|e| e["port"] == 8080 && e["packets"].as_u64().is_some_and(|p| p >= 1))
        .ok_or_else(|| format!("no 8080 entry with packets counted: {entries:#}"))?;
    let (packets, bytes) = (
        counted["packets"].as_u64().unwrap_or(0),
        counted["bytes"].as_u64().unwrap_or(0),
    );
    assert!(bytes >= packets * 40, "{counted}");
    lab.down()?;
    Ok(())
}
