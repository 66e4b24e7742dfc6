//! Replays new connections through a kernel backend's loaded programs with BPF_PROG_TEST_RUN,
//! each judged by a named endpoint with its own policy map, against a given ipcache: the
//! kernel half of `weir policy test --datapath aya|libbpf`. One implementation for every
//! backend ([`KernelBackend`]).
//!
//! The programs are loaded through a private bpffs mounted on a fresh temporary directory and
//! unmounted right after loading; they live as long as the [`Replayer`] holds their fds, and
//! nothing is attached to any interface.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use weir_datapath_abi as abi;
use weir_identity::Identity;
use weir_policy_compiler::{MapState, MapStateDiff};
use weir_policy_model::Direction;

use crate::packet::{L4, PacketSpec};
use crate::testrun::{HookDirection, TestRunOutcome};
use crate::{Datapath, DatapathError, EndpointId, Verdict};

/// What a replay needs from a kernel backend beyond [`Datapath`].
pub trait KernelBackend: Datapath + Sized {
    /// Loads the programs, pinning under `pin_dir`.
    fn load_pinned(pin_dir: &Path) -> Result<Self, DatapathError>;
    /// Records `info` as the endpoint behind `ifindex`.
    fn register_ifindex(
        &mut self,
        ifindex: u32,
        info: abi::EndpointInfo,
    ) -> Result<(), DatapathError>;
    /// Runs `packet` through a program `repeat` times.
    fn test_run(
        &self,
        hook: HookDirection,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError>;
}

/// Test runs see the loopback device: the judging endpoint is registered on ifindex 1.
const TEST_RUN_IFINDEX: u32 = 1;

/// Failure to set up or run a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Not running as root (BPF_PROG_TEST_RUN on TC programs and bpffs mounts need it).
    #[error(
        "replaying packets through the kernel needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    )]
    NotRoot,
    /// The private bpffs could not be mounted.
    #[error("mounting a private bpffs on {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Loading the programs, a map update or a test run failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// A bpffs mounted on a fresh temporary directory; unmounted and removed on drop.
#[derive(Debug)]
struct PrivateBpffs {
    dir: PathBuf,
}

impl PrivateBpffs {
    fn mount() -> Result<Self, ReplayError> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("weir-replay-{}-{n}", std::process::id()));
        let err = |source| ReplayError::Mount {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(err)?;
        let c = |s: &str| CString::new(s).unwrap_or_default();
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap_or_default();
        let (src, fstype) = (c("bpf"), c("bpf"));
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(err(e));
        }
        Ok(Self { dir })
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A packet to replay: the first packet of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayPacket {
    /// Source address.
    pub src: IpAddr,
    /// Destination address (same family).
    pub dst: IpAddr,
    /// IP protocol.
    pub protocol: u8,
    /// Destination port, or ICMP type.
    pub port: u16,
}

/// The kernel's answer for one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideOutcome {
    /// What the program did.
    pub outcome: TestRunOutcome,
    /// What it had to do (see [`kernel_expectation`]).
    pub expected: Verdict,
}

impl SideOutcome {
    /// Whether the kernel did what it had to.
    pub fn agrees(&self) -> bool {
        self.outcome.verdict == self.expected
    }
}

/// What the kernel must answer in a test run where `decide` says `decided` (see
/// [`crate::test_run_verdict`]).
pub fn kernel_expectation(
    decided: Verdict,
    direction: Direction,
    packet: &ReplayPacket,
) -> Verdict {
    crate::test_run_verdict(decided, direction, packet.protocol, packet.port)
}

/// Loaded programs on a private bpffs, with named endpoints whose maps can be replaced.
#[derive(Debug)]
pub struct Replayer<D: KernelBackend> {
    dp: D,
    endpoints: BTreeMap<String, EndpointId>,
    ipcache: BTreeSet<(IpNet, Identity)>,
    /// Source port / ICMP id of the next packet: each replay is a new connection.
    next_port: u16,
}

impl<D: KernelBackend> Replayer<D> {
    /// Mounts a private bpffs and loads the programs there. Needs root.
    pub fn new() -> Result<Self, ReplayError> {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(ReplayError::NotRoot);
        }
        let fs = PrivateBpffs::mount()?;
        let dp = D::load_pinned(&fs.dir.join("weir"))?;
        // The process's fds keep programs and maps alive; the pins are not needed any more.
        // Unmount now, so that nothing stays behind even if the process is killed (a closed
        // pipe kills `weir policy test ... | head`).
        drop(fs);
        Ok(Self::with_datapath(dp))
    }

    /// Replays through a datapath the caller already loaded (nothing attached to it).
    pub fn with_datapath(dp: D) -> Self {
        Self {
            dp,
            endpoints: BTreeMap::new(),
            ipcache: BTreeSet::new(),
            next_port: 20000,
        }
    }

    /// The loaded datapath.
    pub fn datapath(&self) -> &D {
        &self.dp
    }

    /// The loaded datapath, for direct map updates (benchmarks).
    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Makes the kernel ipcache hold exactly `entries` (adds first, then removals).
    pub fn sync_ipcache(&mut self, entries: &[(IpNet, Identity)]) -> Result<(), ReplayError> {
        let want: BTreeSet<(IpNet, Identity)> =
            entries.iter().map(|(n, i)| (n.trunc(), *i)).collect();
        for (net, id) in want.difference(&self.ipcache) {
            self.dp.upsert_ipcache(*net, *id)?;
        }
        let nets: BTreeSet<IpNet> = want.iter().map(|(n, _)| *n).collect();
        for (net, _) in self.ipcache.difference(&want) {
            if !nets.contains(net) {
                self.dp.remove_ipcache(*net)?;
            }
        }
        self.ipcache = want;
        Ok(())
    }

    /// Makes endpoint `name`'s policy map equal `map` (a diff against what is installed).
    pub fn sync_policy(&mut self, name: &str, map: &MapState) -> Result<EndpointId, ReplayError> {
        let next = EndpointId(self.endpoints.len() as u32 + 1);
        let id = *self.endpoints.entry(name.to_string()).or_insert(next);
        let old = self.dp.dump_policy(id)?;
        let diff = MapStateDiff {
            upserts: map.entries.iter().map(|(k, e)| (*k, e.clone())).collect(),
            removals: old
                .keys()
                .filter(|k| !map.entries.contains_key(k))
                .copied()
                .collect(),
        };
        self.dp.apply_policy_diff(id, &diff)?;
        Ok(id)
    }

    /// Runs the first packet of a new connection through the program of `direction` (egress:
    /// `weir_from_pod`, ingress: `weir_to_pod`), judged by endpoint `name` (identity
    /// `identity`) with the map last given to [`Replayer::sync_policy`].
    pub fn run(
        &mut self,
        name: &str,
        identity: Identity,
        direction: Direction,
        packet: &ReplayPacket,
    ) -> Result<TestRunOutcome, ReplayError> {
        let next = EndpointId(self.endpoints.len() as u32 + 1);
        let id = *self.endpoints.entry(name.to_string()).or_insert(next);
        self.dp.register_ifindex(
            TEST_RUN_IFINDEX,
            abi::EndpointInfo {
                endpoint_id: id.0,
                identity: identity.get(),
                flags: 0,
                ..Default::default()
            },
        )?;
        let sport = self.next_port;
        self.next_port = if sport == u16::MAX { 20000 } else { sport + 1 };
        let l4 = match packet.protocol {
            6 => L4::Tcp {
                sport,
                dport: packet.port,
                flags: 0x02,
            },
            17 => L4::Udp {
                sport,
                dport: packet.port,
            },
            132 => L4::Sctp {
                sport,
                dport: packet.port,
            },
            1 | 58 => L4::Icmp {
                ty: packet.port as u8,
                code: 0,
                id: sport,
            },
            p => L4::Raw {
                protocol: p,
                payload: vec![0; 8],
            },
        };
        let hook = match direction {
            Direction::Egress => HookDirection::FromPod,
            Direction::Ingress => HookDirection::ToPod,
        };
        let frame = PacketSpec::new(packet.src, packet.dst, l4).build();
        Ok(self.dp.test_run(hook, &frame, 1)?)
    }
}
