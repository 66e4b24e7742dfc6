//! Small wrappers around the tools the lab drives (`ip`, `nsenter`, `mount`), and entering a
//! network namespace from a thread.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::LabError;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The bind-mount path of the named network namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<String, LabError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(LabError::Command(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`.
pub fn ip(args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").args(args))
}

/// `ip -n NS ARGS...`: always inside a lab namespace, never the root one.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// A command that runs `program` inside the network namespace `ns` only (mounts, /sys and
/// cgroups stay the caller's, unlike `ip netns exec`).
pub fn nsenter(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(program);
    cmd
}

/// Names of existing network namespaces that start with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `path` is a mount point whose file system is bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    run(Command::new("stat").args(["-f", "-c", "%T"]).arg(path)).is_ok_and(|t| t.trim() == "bpf_fs")
}

/// Whether process `pid` is alive.
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
}

/// Sends `signal` to process `pid` (errors ignored: it may be gone).
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Moves the calling thread into the network namespace at `netns`. Only for threads the lab
/// spawned for that purpose: the thread stays there until it ends.
pub fn enter_netns(netns: &Path) -> Result<(), LabError> {
    let file = File::open(netns).map_err(|e| LabError::Io(netns.to_path_buf(), e))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| LabError::Command(format!("setns {}: {e}", netns.display())))
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns`; sockets it
/// creates live there.
pub fn in_netns<T, F>(netns: &Path, f: F) -> Result<T, LabError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = File::open(netns).map_err(|e| LabError::Io(netns.to_path_buf(), e))?;
    let handle = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| LabError::Command(format!("setns: {e}")))?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| LabError::Command("netns thread panicked".into()))?
}
