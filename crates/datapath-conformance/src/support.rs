//! Shared helpers: privilege checks, a private bpffs, hand-written MapStates.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use weir_datapath::Datapath;
use weir_datapath_abi as abi;

use crate::Backend;
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapState, MapStateDiff, PolicyEntry, PolicyKey};
use weir_policy_model::Direction;

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Why the kernel tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("no kernel BTF: BPF likely unavailable".into());
    }
    None
}

/// Prints why and returns true when the test must be skipped.
pub fn skip(test: &str) -> bool {
    match skip_reason() {
        Some(r) => {
            eprintln!("SKIPPED {test}: {r}");
            true
        }
        None => false,
    }
}

/// A bpffs mounted on a fresh temporary directory; unmounted and removed on drop.
pub struct Bpffs {
    /// The mount point.
    pub dir: PathBuf,
}

impl Default for Bpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Bpffs {
    /// Mounts a fresh bpffs (panics when it cannot: callers checked [`skip`] first).
    pub fn new() -> Bpffs {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("weir-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount bpffs");
        Bpffs { dir }
    }

    /// The pin directory inside the mount.
    pub fn pins(&self) -> PathBuf {
        self.dir.join("weir")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Loads a datapath on a private bpffs with endpoint 1 (identity 1000) on ifindex 1, so test
/// runs (which see loopback) are judged as that endpoint.
pub fn load_for_test_run<B: Backend>() -> (Bpffs, B::Dp) {
    let fs = Bpffs::new();
    let mut dp = B::load(&fs.pins()).unwrap_or_else(|e| panic!("load {}: {e}", B::NAME));
    B::register_ifindex(
        &mut dp,
        1,
        abi::EndpointInfo {
            endpoint_id: 1,
            identity: 1000,
            flags: 0,
            ..Default::default()
        },
    )
    .expect("register");
    (fs, dp)
}

/// A policy key.
pub fn key(identity: u32, dir: Direction, protocol: u8, port: u16, prefix_len: u8) -> PolicyKey {
    PolicyKey {
        identity: Identity(identity),
        direction: dir,
        protocol,
        port,
        prefix_len,
    }
}

/// A policy entry with no provenance.
pub fn entry(action: EntryAction) -> PolicyEntry {
    PolicyEntry {
        action,
        derived_from: Default::default(),
    }
}

/// A MapState of the given entries.
pub fn map(entries: &[(PolicyKey, EntryAction)]) -> MapState {
    let mut m = MapState::default();
    for (k, a) in entries {
        m.entries.insert(*k, entry(*a));
    }
    m
}

/// Replaces endpoint `ep`'s policy with `m` (diff from what is installed).
pub fn install<D: Datapath + ?Sized>(dp: &mut D, ep: u32, m: &MapState) {
    let id = weir_datapath::EndpointId(ep);
    let old = dp.dump_policy(id).expect("dump");
    let diff = MapStateDiff {
        upserts: m.entries.iter().map(|(k, e)| (*k, e.clone())).collect(),
        removals: old
            .keys()
            .filter(|k| !m.entries.contains_key(k))
            .copied()
            .collect(),
    };
    dp.apply_policy_diff(id, &diff).expect("apply");
}
