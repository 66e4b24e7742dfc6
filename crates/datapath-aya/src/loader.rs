//! Loading, pinning, attaching and map access.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, IterableMap, MapData, PerCpuArray, RingBuf};
use aya::programs::tc::{self, NlOptions, TcAttachOptions, TcAttachType, TcHandle};
use aya::programs::{SchedClassifier, tc::TcError};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use tokio::io::unix::AsyncFd;
use weir_datapath::batch;
use weir_datapath::encode::{self, PolicySlot};
use weir_datapath::policy_flags::PolicyFlags;
use weir_datapath::{
    Counters, CtRecord, Datapath, DatapathError, DatapathEvent, EndpointAttachment, EndpointId,
    InstalledPolicyEntry,
};
use weir_datapath_abi as abi;
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapStateDiff, PolicyKey};

use crate::EBPF_OBJECT;

/// tc filter priority and handle of our filters (fixed, so a later process can find them).
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Failure to load the datapath.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The pin directory could not be created or is not on a bpffs.
    #[error("pin directory {path}: {source}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The object or a program failed to load (verifier log included).
    #[error("loading {what}: {message}")]
    Load {
        /// What failed.
        what: String,
        /// The error chain.
        message: String,
    },
}

fn load_err(what: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Load {
        what: what.to_string(),
        message: e.to_string(),
    }
}

fn be(context: &str, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::backend(context, e)
}

enum Events {
    Plain(RingBuf<MapData>),
    Async(AsyncFd<RingBuf<MapData>>),
    Moving,
}

/// The aya-backed [`Datapath`].
pub struct AyaDatapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    policy: LpmTrie<MapData, abi::PolicyKey, abi::PolicyValue>,
    policy_exact: HashMap<MapData, abi::PolicyKey, abi::PolicyValue>,
    ipcache: LpmTrie<MapData, abi::IpcacheKey, abi::IpcacheValue>,
    ipcache_hosts: HashMap<MapData, abi::IpcacheKey, abi::IpcacheValue>,
    ipcache_hosts4: HashMap<MapData, u32, abi::IpcacheValue>,
    endpoints: HashMap<MapData, u32, abi::EndpointInfo>,
    conntrack: HashMap<MapData, abi::CtKey, abi::CtEntry>,
    conntrack4: HashMap<MapData, abi::CtKey4, abi::CtEntry>,
    counters: PerCpuArray<MapData, u64>,
    /// What the policy maps hold, for the endpoints' lookup-skipping flags.
    flags: PolicyFlags,
    events: Events,
}

impl std::fmt::Debug for AyaDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AyaDatapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl AyaDatapath {
    /// Loads the programs, creating the maps under `pin_dir` (a directory on a bpffs) or
    /// reopening the ones a previous process pinned there, and pins the programs there too.
    /// Enforcement already attached by a previous process keeps running throughout.
    pub fn load(pin_dir: &Path) -> Result<Self, LoadError> {
        std::fs::create_dir_all(pin_dir).map_err(|source| LoadError::PinDir {
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|e| load_err("eBPF object", e))?;
        for name in [
            abi::program_name::FROM_POD,
            abi::program_name::TO_POD,
            abi::program_name::EMPTY,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| load_err(name, "missing from object"))?
                .try_into()
                .map_err(|e| load_err(name, e))?;
            prog.load().map_err(|e| load_err(name, format!("{e:?}")))?;
            let pin = pin_dir.join(name);
            // Replace an older pin: filters keep their own program reference.
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(load_err(name, e)),
            }
            prog.pin(&pin).map_err(|e| load_err(name, e))?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| load_err(name, "map missing from object"))
        };
        let policy = LpmTrie::try_from(take(abi::map_name::POLICY)?)
            .map_err(|e| load_err("policy map", e))?;
        let policy_exact = HashMap::try_from(take(abi::map_name::POLICY_EXACT)?)
            .map_err(|e| load_err("exact policy map", e))?;
        let ipcache = LpmTrie::try_from(take(abi::map_name::IPCACHE)?)
            .map_err(|e| load_err("ipcache map", e))?;
        let ipcache_hosts = HashMap::try_from(take(abi::map_name::IPCACHE_HOSTS)?)
            .map_err(|e| load_err("ipcache host map", e))?;
        let ipcache_hosts4 = HashMap::try_from(take(abi::map_name::IPCACHE_HOSTS4)?)
            .map_err(|e| load_err("ipcache IPv4 host map", e))?;
        let endpoints = HashMap::try_from(take(abi::map_name::ENDPOINTS)?)
            .map_err(|e| load_err("endpoint map", e))?;
        let conntrack = HashMap::try_from(take(abi::map_name::CONNTRACK)?)
            .map_err(|e| load_err("conntrack map", e))?;
        let conntrack4 = HashMap::try_from(take(abi::map_name::CONNTRACK4)?)
            .map_err(|e| load_err("IPv4 conntrack map", e))?;
        let counters = PerCpuArray::try_from(take(abi::map_name::COUNTERS)?)
            .map_err(|e| load_err("counter map", e))?;
        let events = RingBuf::try_from(take(abi::map_name::EVENTS)?)
            .map_err(|e| load_err("event ring", e))?;
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            policy,
            policy_exact,
            ipcache,
            ipcache_hosts,
            ipcache_hosts4,
            endpoints,
            conntrack,
            conntrack4,
            counters,
            flags: PolicyFlags::new(),
            events: Events::Plain(events),
        };
        dp.resync_flags()
            .map_err(|e| load_err("endpoint policy flags", e))?;
        Ok(dp)
    }

    /// Rebuilds the policy summary from the (possibly reopened) maps and rewrites every
    /// endpoint's flags from it: a previous process's flags are not trusted.
    fn resync_flags(&mut self) -> Result<(), DatapathError> {
        let mut flags = PolicyFlags::new();
        // With the values: an upsert of an entry the kernel already holds as it is keeps its
        // counters.
        for item in self.policy.iter() {
            let (k, v) = item.map_err(|e| be("policy map iterate", e))?;
            flags.insert_value(PolicySlot::Trie(k.prefix_len(), k.data()), &v);
        }
        for item in self.policy_exact.iter() {
            let (k, v) = item.map_err(|e| be("exact policy map iterate", e))?;
            flags.insert_value(PolicySlot::Exact(k), &v);
        }
        self.flags = flags;
        let stale: Vec<(u32, abi::EndpointInfo)> = self
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, info)| self.flags.flags(info.endpoint_id) != info.flags)
            .collect();
        for (idx, info) in stale {
            let info = abi::EndpointInfo {
                flags: self.flags.flags(info.endpoint_id),
                ..info
            };
            self.endpoints
                .insert(idx, info, 0)
                .map_err(|e| be("endpoint map update", e))?;
        }
        Ok(())
    }

    /// Writes `flags` into every endpoint map entry of `endpoint_id`.
    /// Writes policy upserts: exact entries (most of a policy) in one batched system call,
    /// trie entries one by one (the trie has no batch operations).
    fn write_policy_upserts(
        &mut self,
        ups: &[(PolicySlot, abi::PolicyValue)],
    ) -> Result<(), DatapathError> {
        let mut exact_keys = Vec::with_capacity(ups.len());
        let mut exact_values = Vec::with_capacity(ups.len());
        for (slot, v) in ups {
            if let PolicySlot::Exact(k) = slot {
                exact_keys.push(*k);
                exact_values.push(*v);
            }
        }
        // SAFETY: the exact policy map's key and value types are these ABI structs.
        unsafe {
            batch::update_batch(
                self.policy_exact.map().fd().as_fd(),
                &exact_keys,
                &exact_values,
            )
        }
        .map_err(|e| be("exact policy map insert", e))?;
        for (slot, v) in ups {
            let PolicySlot::Trie(p, k) = slot else {
                continue;
            };
            self.policy
                .insert(&Key::new(*p, *k), *v, 0)
                .map_err(|e| be("policy map insert", e))?;
        }
        Ok(())
    }

    fn write_endpoint_flags(&mut self, endpoint_id: u32, flags: u32) -> Result<(), DatapathError> {
        let targets: Vec<(u32, abi::EndpointInfo)> = self
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, info)| info.endpoint_id == endpoint_id && info.flags != flags)
            .collect();
        for (idx, info) in targets {
            self.endpoints
                .insert(idx, abi::EndpointInfo { flags, ..info }, 0)
                .map_err(|e| be("endpoint map update", e))?;
        }
        Ok(())
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub(crate) fn program(&self, name: &str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or_else(|| be(name, "missing program"))?
            .try_into()
            .map_err(|e| be(name, e))
    }

    /// Records `info` for `ifindex` without attaching anything (used by test runs, which see
    /// the loopback ifindex 1). `info.flags` is replaced by the flags the endpoint's policy
    /// entries need.
    pub fn register_ifindex(
        &mut self,
        ifindex: u32,
        info: abi::EndpointInfo,
    ) -> Result<(), DatapathError> {
        let info = abi::EndpointInfo {
            flags: self.flags.flags(info.endpoint_id),
            ..info
        };
        self.endpoints
            .insert(ifindex, info, 0)
            .map_err(|e| be("endpoint map insert", e))
    }

    /// Forgets the endpoint recorded for `ifindex` (packets there pass unjudged).
    pub fn unregister_ifindex(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        match self.endpoints.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(be("endpoint map remove", e)),
        }
    }

    /// Waits until events are available (needs a tokio runtime), then drains them.
    pub async fn next_events(&mut self) -> Result<Vec<DatapathEvent>, DatapathError> {
        if let Events::Plain(_) = self.events {
            let Events::Plain(rb) = std::mem::replace(&mut self.events, Events::Moving) else {
                return Err(be("event ring", "state"));
            };
            // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd
            // (which owns the ring buffer) lives.
            let fd = unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) }
                .map_err(|e| be("event ring poll registration", e.to_string()))?;
            self.events = Events::Async(fd);
        }
        loop {
            let got = self.drain_events()?;
            if !got.is_empty() {
                return Ok(got);
            }
            let Events::Async(fd) = &mut self.events else {
                return Err(be("event ring", "state"));
            };
            let mut guard = fd
                .readable_mut()
                .await
                .map_err(|e| be("event ring poll", e))?;
            guard.clear_ready();
        }
    }

    fn purge_endpoint_policy(&mut self, endpoint: EndpointId) -> Result<(), DatapathError> {
        let keys: Vec<Key<abi::PolicyKey>> = self
            .policy
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().endpoint_id == endpoint.0)
            .collect();
        for k in keys {
            self.policy
                .remove(&k)
                .map_err(|e| be("policy map remove", e))?;
        }
        let keys: Vec<abi::PolicyKey> = self
            .policy_exact
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.endpoint_id == endpoint.0)
            .collect();
        for k in keys {
            self.policy_exact
                .remove(&k)
                .map_err(|e| be("exact policy map remove", e))?;
        }
        self.flags.purge(endpoint.0);
        Ok(())
    }
}

/// The key of an IPv4 host address in the compact host map, if `prefix` is one (the map's key
/// is the address's bytes read as a native-order `u32`).
fn host4(prefix: &IpNet) -> Option<u32> {
    encode::ipcache_host4_key(prefix).map(u32::from_ne_bytes)
}

fn ifindex(ifname: &str) -> Result<u32, DatapathError> {
    let c = CString::new(ifname).map_err(|_| DatapathError::UnknownInterface(ifname.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(DatapathError::UnknownInterface(ifname.into()))
    } else {
        Ok(idx)
    }
}

fn is_exists(e: &aya::programs::ProgramError) -> bool {
    match e {
        aya::programs::ProgramError::TcError(TcError::NetlinkError(n)) => {
            n.to_string().contains("exists") || format!("{n:?}").contains("EEXIST")
        }
        other => other.to_string().contains("exists"),
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

impl Datapath for AyaDatapath {
    fn attach_endpoint(&mut self, endpoint: &EndpointAttachment) -> Result<(), DatapathError> {
        let idx = ifindex(&endpoint.ifname)?;
        // register_ifindex fills in the flags.
        self.register_ifindex(idx, encode::endpoint_info(endpoint))?;
        match tc::qdisc_add_clsact(&endpoint.ifname) {
            Ok(()) => {}
            Err(e) if e.to_string().contains("exists") || format!("{e:?}").contains("17") => {}
            Err(e) => return Err(be("add clsact qdisc", e)),
        }
        for (name, hook) in [
            (abi::program_name::FROM_POD, TcAttachType::Ingress),
            (abi::program_name::TO_POD, TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| be(name, "missing program"))?
                .try_into()
                .map_err(|e| be(name, e))?;
            let opts = TcAttachOptions::Netlink(NlOptions {
                priority: FILTER_PRIORITY,
                handle: FILTER_HANDLE,
                classid: None,
            });
            match prog.attach_with_options(&endpoint.ifname, hook, opts) {
                Ok(id) => {
                    let link = prog.take_link(id).map_err(|e| be("take tc link", e))?;
                    // The filter must outlive this process (restart without interruption);
                    // dropping the link would remove it. Detach removes it by name.
                    std::mem::forget(link);
                }
                // Attached by an earlier process: that filter already runs on the same maps.
                Err(e) if is_exists(&e) => {}
                Err(e) => return Err(be(&format!("attach {name} to {}", endpoint.ifname), e)),
            }
        }
        Ok(())
    }

    fn detach_endpoint(&mut self, endpoint: &EndpointAttachment) -> Result<(), DatapathError> {
        for (name, hook) in [
            (abi::program_name::FROM_POD, TcAttachType::Ingress),
            (abi::program_name::TO_POD, TcAttachType::Egress),
        ] {
            match tc::qdisc_detach_program(&endpoint.ifname, hook, name) {
                Ok(()) => {}
                Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(be(&format!("detach {name}"), e)),
            }
        }
        if let Ok(idx) = ifindex(&endpoint.ifname) {
            match self.endpoints.remove(&idx) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(be("endpoint map remove", e)),
            }
        }
        self.purge_endpoint_policy(endpoint.endpoint_id)
    }

    fn apply_policy_diff(
        &mut self,
        endpoint: EndpointId,
        diff: &MapStateDiff,
    ) -> Result<(), DatapathError> {
        let (mut ups, rems) = encode::policy_diff(endpoint, diff)?;
        // Flags first rise to cover the upserts, and fall only after the removals (see
        // weir_datapath::policy_flags): at no point does a packet skip a lookup it needs.
        let (before, during) = self.flags.stage_upserts(endpoint.0, &mut ups);
        let written = if during != before {
            self.write_endpoint_flags(endpoint.0, during)
        } else {
            Ok(())
        }
        .and_then(|()| self.write_policy_upserts(&ups));
        if let Err(e) = written {
            self.flags.unstage(&ups);
            return Err(e);
        }
        let exact_removals = encode::exact_keys(&rems);
        // SAFETY: as above.
        unsafe { batch::delete_batch(self.policy_exact.map().fd().as_fd(), &exact_removals) }
            .map_err(|e| be("exact policy map remove", e))?;
        for slot in &rems {
            if let PolicySlot::Trie(p, k) = slot {
                match self.policy.remove(&Key::new(*p, *k)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(be("policy map remove", e)),
                }
            }
            self.flags.remove(slot);
        }
        let after = self.flags.flags(endpoint.0);
        if after != during {
            self.write_endpoint_flags(endpoint.0, after)?;
        }
        Ok(())
    }

    fn upsert_ipcache(&mut self, prefix: IpNet, identity: Identity) -> Result<(), DatapathError> {
        let prefix = prefix.trunc();
        let (p, data) = encode::ipcache_key(&prefix);
        let v = abi::IpcacheValue {
            identity: identity.get(),
            ..Default::default()
        };
        // Host addresses go to the hash (a /32 or /128 is always the longest match); the rest
        // to the trie.
        if let Some(a) = host4(&prefix) {
            self.ipcache_hosts4
                .insert(a, v, 0)
                .map_err(|e| be("ipcache host insert", e))
        } else if prefix.prefix_len() == prefix.max_prefix_len() {
            self.ipcache_hosts
                .insert(data, v, 0)
                .map_err(|e| be("ipcache host insert", e))
        } else {
            self.ipcache
                .insert(&Key::new(p, data), v, 0)
                .map_err(|e| be("ipcache insert", e))
        }
    }

    fn remove_ipcache(&mut self, prefix: IpNet) -> Result<(), DatapathError> {
        let prefix = prefix.trunc();
        let (p, data) = encode::ipcache_key(&prefix);
        let r = if let Some(a) = host4(&prefix) {
            self.ipcache_hosts4.remove(&a)
        } else if prefix.prefix_len() == prefix.max_prefix_len() {
            self.ipcache_hosts.remove(&data)
        } else {
            self.ipcache.remove(&Key::new(p, data))
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(be("ipcache remove", e)),
        }
    }

    fn dump_policy(
        &self,
        endpoint: EndpointId,
    ) -> Result<BTreeMap<PolicyKey, EntryAction>, DatapathError> {
        Ok(self
            .dump_policy_entries(endpoint)?
            .into_iter()
            .map(|(k, e)| (k, e.action))
            .collect())
    }

    fn dump_policy_entries(
        &self,
        endpoint: EndpointId,
    ) -> Result<BTreeMap<PolicyKey, InstalledPolicyEntry>, DatapathError> {
        let mut out = BTreeMap::new();
        for item in self.policy.iter() {
            let (k, v) = item.map_err(|e| be("policy map iterate", e))?;
            let (ep, key) = encode::policy_key_from_abi(k.prefix_len(), &k.data());
            if ep == endpoint {
                out.insert(key, encode::policy_entry_from_abi(&v));
            }
        }
        for item in self.policy_exact.iter() {
            let (k, v) = item.map_err(|e| be("exact policy map iterate", e))?;
            let (ep, key) = encode::policy_exact_key_from_abi(&k);
            if ep == endpoint {
                out.insert(key, encode::policy_entry_from_abi(&v));
            }
        }
        Ok(out)
    }

    fn list_ipcache(&self) -> Result<Vec<(IpNet, Identity)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.ipcache.iter() {
            let (k, v) = item.map_err(|e| be("ipcache iterate", e))?;
            if let Some(net) = encode::ipcache_key_from_abi(k.prefix_len(), &k.data()) {
                out.push((net, Identity(v.identity)));
            }
        }
        for item in self.ipcache_hosts4.iter() {
            let (k, v) = item.map_err(|e| be("ipcache IPv4 host iterate", e))?;
            let a = std::net::Ipv4Addr::from(k.to_ne_bytes());
            out.push((IpNet::from(std::net::IpAddr::V4(a)), Identity(v.identity)));
        }
        for item in self.ipcache_hosts.iter() {
            let (k, v) = item.map_err(|e| be("ipcache host iterate", e))?;
            let bits = if k.family == abi::family::V4 { 32 } else { 128 };
            if let Some(net) =
                encode::ipcache_key_from_abi(abi::IPCACHE_FIXED_PREFIX_BITS + bits, &k)
            {
                out.push((net, Identity(v.identity)));
            }
        }
        Ok(out)
    }

    fn list_conntrack(&self) -> Result<Vec<CtRecord>, DatapathError> {
        let mut out = Vec::new();
        for item in self.conntrack.iter() {
            let (k, v) = item.map_err(|e| be("conntrack iterate", e))?;
            if let Some(r) = encode::ct_from_abi(&k, &v) {
                out.push(r);
            }
        }
        for item in self.conntrack4.iter() {
            let (k, v) = item.map_err(|e| be("IPv4 conntrack iterate", e))?;
            out.push(encode::ct4_from_abi(&k, &v));
        }
        Ok(out)
    }

    fn gc_conntrack(&mut self) -> Result<usize, DatapathError> {
        let now = monotonic_ns();
        let expired: Vec<abi::CtKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns <= now)
            .map(|(k, _)| k)
            .collect();
        let mut n = 0;
        for k in &expired {
            if self.conntrack.remove(k).is_ok() {
                n += 1;
            }
        }
        let expired: Vec<abi::CtKey4> = self
            .conntrack4
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns <= now)
            .map(|(k, _)| k)
            .collect();
        for k in &expired {
            if self.conntrack4.remove(k).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    fn drain_events(&mut self) -> Result<Vec<DatapathEvent>, DatapathError> {
        let rb = match &mut self.events {
            Events::Plain(rb) => rb,
            Events::Async(fd) => fd.get_mut(),
            Events::Moving => return Err(be("event ring", "state")),
        };
        let mut out = Vec::new();
        while let Some(item) = rb.next() {
            if item.len() >= std::mem::size_of::<abi::Event>() {
                // SAFETY: the record holds at least size_of::<Event>() bytes written by the
                // program, and Event is plain old data; read_unaligned copes with alignment.
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<abi::Event>()) };
                out.push(encode::event_from_abi(&ev));
            }
        }
        Ok(out)
    }

    fn counters(&self) -> Result<Counters, DatapathError> {
        let mut c = Counters::default();
        for idx in 0..abi::capacity::COUNTERS {
            let vals = self
                .counters
                .get(&idx, 0)
                .map_err(|e| be("counter read", e))?;
            let sum: u64 = vals.iter().copied().fold(0u64, u64::saturating_add);
            match idx {
                abi::counter::FORWARDED => c.forwarded = sum,
                abi::counter::REDIRECTED => c.redirected = sum,
                abi::counter::EVENTS_LOST => c.events_lost = sum,
                _ => {
                    if sum > 0
                        && let Ok(reason) = u8::try_from(idx)
                    {
                        c.drops.insert(reason, sum);
                    }
                }
            }
        }
        Ok(c)
    }
}
