//! Loading, pinning, attaching and map access.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use libbpf_rs::{
    ErrorKind, MapCore, MapFlags, MapHandle, Object, ObjectBuilder, ProgramMut, RingBuffer,
    RingBufferBuilder, TC_EGRESS, TC_INGRESS, TcHookBuilder,
};
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

use crate::bytes::{bytes, lpm_key, read, split_lpm_key};
use crate::{EBPF_OBJECT, EBPF_OBJECT_NO_ENTRY_COUNTERS};

/// tc filter priority and handle of our filters (fixed, so a later process finds them).
const FILTER_PRIORITY: u32 = 1;
const FILTER_HANDLE: u32 = 1;

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
    /// The object or a program failed to load (libbpf prints the verifier log).
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

/// Records the ring buffer callback collected; [`Datapath::drain_events`] takes them.
type Pending = Arc<Mutex<Vec<abi::Event>>>;

/// The libbpf-backed [`Datapath`]: the C programs of `bpf/weir.bpf.c`.
pub struct LibbpfDatapath {
    obj: Object,
    pin_dir: PathBuf,
    policy: MapHandle,
    policy_exact: MapHandle,
    ipcache: MapHandle,
    ipcache_hosts: MapHandle,
    ipcache_hosts4: MapHandle,
    endpoints: MapHandle,
    conntrack: MapHandle,
    conntrack4: MapHandle,
    counters: MapHandle,
    /// What the policy maps hold, for the endpoints' lookup-skipping flags.
    flags: PolicyFlags,
    events: RingBuffer<'static>,
    pending: Pending,
}

impl std::fmt::Debug for LibbpfDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibbpfDatapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn map_handle(obj: &Object, name: &str) -> Result<MapHandle, LoadError> {
    let map = obj
        .maps()
        .find(|m| m.name() == name)
        .ok_or_else(|| load_err(name, "map missing from object"))?;
    MapHandle::try_from(&map).map_err(|e| load_err(name, e))
}

fn remove_stale(path: &Path) -> Result<(), LoadError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(load_err(&path.display().to_string(), e)),
    }
}

impl LibbpfDatapath {
    /// Loads the programs, creating the maps under `pin_dir` (a directory on a bpffs) or
    /// reopening the ones a previous process pinned there, and pins the programs there too.
    /// Enforcement already attached by a previous process keeps running throughout.
    pub fn load(pin_dir: &Path) -> Result<Self, LoadError> {
        Self::load_object(pin_dir, &EBPF_OBJECT.0)
    }

    /// As [`LibbpfDatapath::load`], with programs built without the per-entry policy
    /// counters: for benchmarks that measure what counting costs, never for enforcement.
    #[doc(hidden)]
    pub fn load_without_entry_counters(pin_dir: &Path) -> Result<Self, LoadError> {
        Self::load_object(pin_dir, &EBPF_OBJECT_NO_ENTRY_COUNTERS.0)
    }

    fn load_object(pin_dir: &Path, object: &[u8]) -> Result<Self, LoadError> {
        std::fs::create_dir_all(pin_dir).map_err(|source| LoadError::PinDir {
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let mut open = ObjectBuilder::default()
            .open_memory(object)
            .map_err(|e| load_err("eBPF object", e))?;
        // libbpf reuses a map already pinned at its pin path (after checking that its type,
        // sizes and flags match) and pins the ones it creates.
        for mut map in open.maps_mut() {
            let name = map.name().to_string_lossy().into_owned();
            map.set_pin_path(pin_dir.join(&name))
                .map_err(|e| load_err(&name, e))?;
        }
        let obj = open.load().map_err(|e| load_err("eBPF object", e))?;
        for mut prog in obj.progs_mut() {
            let name = prog.name().to_string_lossy().into_owned();
            let pin = pin_dir.join(&name);
            // Replace an older pin: filters keep their own program reference.
            remove_stale(&pin)?;
            prog.pin(&pin).map_err(|e| load_err(&name, e))?;
        }
        for name in [
            abi::program_name::FROM_POD,
            abi::program_name::TO_POD,
            abi::program_name::EMPTY,
        ] {
            if !obj.progs().any(|p| p.name() == name) {
                return Err(load_err(name, "missing from object"));
            }
        }
        let pending: Pending = Arc::default();
        let events = {
            let ring = obj
                .maps()
                .find(|m| m.name() == abi::map_name::EVENTS)
                .ok_or_else(|| load_err(abi::map_name::EVENTS, "map missing from object"))?;
            let sink = pending.clone();
            let mut b = RingBufferBuilder::new();
            b.add(&ring, move |data: &[u8]| {
                if let Some(ev) = read::<abi::Event>(data)
                    && let Ok(mut v) = sink.lock()
                {
                    v.push(ev);
                }
                0
            })
            .map_err(|e| load_err("event ring", e))?;
            b.build().map_err(|e| load_err("event ring", e))?
        };
        let mut dp = Self {
            policy: map_handle(&obj, abi::map_name::POLICY)?,
            policy_exact: map_handle(&obj, abi::map_name::POLICY_EXACT)?,
            ipcache: map_handle(&obj, abi::map_name::IPCACHE)?,
            ipcache_hosts: map_handle(&obj, abi::map_name::IPCACHE_HOSTS)?,
            ipcache_hosts4: map_handle(&obj, abi::map_name::IPCACHE_HOSTS4)?,
            endpoints: map_handle(&obj, abi::map_name::ENDPOINTS)?,
            conntrack: map_handle(&obj, abi::map_name::CONNTRACK)?,
            conntrack4: map_handle(&obj, abi::map_name::CONNTRACK4)?,
            counters: map_handle(&obj, abi::map_name::COUNTERS)?,
            flags: PolicyFlags::new(),
            obj,
            pin_dir: pin_dir.to_path_buf(),
            events,
            pending,
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
        for (k, v) in entries(&self.policy)? {
            if let (Some((p, d)), Some(v)) = (
                split_lpm_key::<abi::PolicyKey>(&k),
                read::<abi::PolicyValue>(&v),
            ) {
                flags.insert_value(PolicySlot::Trie(p, d), &v);
            }
        }
        for (k, v) in entries(&self.policy_exact)? {
            if let (Some(d), Some(v)) = (read::<abi::PolicyKey>(&k), read::<abi::PolicyValue>(&v)) {
                flags.insert_value(PolicySlot::Exact(d), &v);
            }
        }
        self.flags = flags;
        for (k, v) in entries(&self.endpoints)? {
            if let Some(info) = read::<abi::EndpointInfo>(&v) {
                let want = self.flags.flags(info.endpoint_id);
                if want != info.flags {
                    let info = abi::EndpointInfo {
                        flags: want,
                        ..info
                    };
                    self.endpoints
                        .update(&k, bytes(&info), MapFlags::ANY)
                        .map_err(|e| be("endpoint map update", e))?;
                }
            }
        }
        Ok(())
    }

    /// Writes `flags` into every endpoint map entry of `endpoint_id`.
    fn write_endpoint_flags(&mut self, endpoint_id: u32, flags: u32) -> Result<(), DatapathError> {
        for (k, v) in entries(&self.endpoints)? {
            if let Some(info) = read::<abi::EndpointInfo>(&v)
                && info.endpoint_id == endpoint_id
                && info.flags != flags
            {
                let info = abi::EndpointInfo { flags, ..info };
                self.endpoints
                    .update(&k, bytes(&info), MapFlags::ANY)
                    .map_err(|e| be("endpoint map update", e))?;
            }
        }
        Ok(())
    }

    /// Writes policy upserts: exact entries (most of a policy) in one batched system call,
    /// trie entries one by one (the trie has no batch operations).
    fn write_policy_upserts(
        &self,
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
        unsafe { batch::update_batch(self.policy_exact.as_fd(), &exact_keys, &exact_values) }
            .map_err(|e| be("exact policy map insert", e))?;
        for (slot, v) in ups {
            let PolicySlot::Trie(p, k) = slot else {
                continue;
            };
            self.policy
                .update(&lpm_key(*p, k), bytes(v), MapFlags::ANY)
                .map_err(|e| be("policy map insert", e))?;
        }
        Ok(())
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub(crate) fn program(&self, name: &str) -> Result<ProgramMut<'_>, DatapathError> {
        // `progs_mut` takes `&self`; test runs need the `Mut` flavour.
        self.obj
            .progs_mut()
            .find(|p| p.name() == name)
            .ok_or_else(|| be(name, "missing program"))
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
            .update(bytes(&ifindex), bytes(&info), MapFlags::ANY)
            .map_err(|e| be("endpoint map insert", e))
    }

    /// Forgets the endpoint recorded for `ifindex` (packets there pass unjudged).
    pub fn unregister_ifindex(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        delete(&self.endpoints, bytes(&ifindex), "endpoint map remove")
    }

    /// Waits up to `timeout` for events, then drains them.
    pub fn poll_events(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Vec<DatapathEvent>, DatapathError> {
        self.events
            .poll(timeout)
            .map_err(|e| be("event ring poll", e))?;
        self.drain_events()
    }

    fn purge_endpoint_policy(&mut self, endpoint: EndpointId) -> Result<(), DatapathError> {
        let keys: Vec<Vec<u8>> = self
            .policy
            .keys()
            .filter(|k| {
                split_lpm_key::<abi::PolicyKey>(k).is_some_and(|(_, d)| d.endpoint_id == endpoint.0)
            })
            .collect();
        for k in keys {
            delete(&self.policy, &k, "policy map remove")?;
        }
        let keys: Vec<Vec<u8>> = self
            .policy_exact
            .keys()
            .filter(|k| read::<abi::PolicyKey>(k).is_some_and(|d| d.endpoint_id == endpoint.0))
            .collect();
        for k in keys {
            delete(&self.policy_exact, &k, "exact policy map remove")?;
        }
        self.flags.purge(endpoint.0);
        Ok(())
    }
}

/// Deletes `key`; a missing key is not an error.
fn delete(map: &MapHandle, key: &[u8], context: &str) -> Result<(), DatapathError> {
    match map.delete(key) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(be(context, e)),
    }
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

/// Raw key and value bytes of map entries.
type RawEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Every entry of a map.
fn entries(map: &MapHandle) -> Result<RawEntries, DatapathError> {
    let mut out = Vec::new();
    for k in map.keys() {
        // An entry deleted between the key walk and the lookup is simply gone.
        if let Some(v) = map
            .lookup(&k, MapFlags::ANY)
            .map_err(|e| be("map lookup", e))?
        {
            out.push((k, v));
        }
    }
    Ok(out)
}

impl Datapath for LibbpfDatapath {
    fn attach_endpoint(&mut self, endpoint: &EndpointAttachment) -> Result<(), DatapathError> {
        let idx = ifindex(&endpoint.ifname)?;
        // register_ifindex fills in the flags.
        self.register_ifindex(idx, encode::endpoint_info(endpoint))?;
        let Ok(tc_ifindex) = i32::try_from(idx) else {
            return Err(DatapathError::UnknownInterface(endpoint.ifname.clone()));
        };
        for (name, point) in [
            (abi::program_name::FROM_POD, TC_INGRESS),
            (abi::program_name::TO_POD, TC_EGRESS),
        ] {
            let prog = self.program(name)?;
            let mut hook = TcHookBuilder::new(prog.as_fd())
                .ifindex(tc_ifindex)
                .replace(true)
                .handle(FILTER_HANDLE)
                .priority(FILTER_PRIORITY)
                .hook(point);
            // The clsact qdisc may already exist (an earlier attach, or another process).
            match hook.create() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(be("add clsact qdisc", e)),
            }
            // `replace`: a filter left by an earlier process is swapped for this process's
            // program, which runs on the same pinned maps. The filter outlives the process.
            hook.attach()
                .map_err(|e| be(&format!("attach {name} to {}", endpoint.ifname), e))?;
        }
        Ok(())
    }

    fn detach_endpoint(&mut self, endpoint: &EndpointAttachment) -> Result<(), DatapathError> {
        if let Ok(idx) = ifindex(&endpoint.ifname) {
            let tc_ifindex = i32::try_from(idx).unwrap_or(0);
            for (name, point) in [
                (abi::program_name::FROM_POD, TC_INGRESS),
                (abi::program_name::TO_POD, TC_EGRESS),
            ] {
                let prog = self.program(name)?;
                let mut hook = TcHookBuilder::new(prog.as_fd())
                    .ifindex(tc_ifindex)
                    .handle(FILTER_HANDLE)
                    .priority(FILTER_PRIORITY)
                    .hook(point);
                match hook.detach() {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) if e.kind() == ErrorKind::InvalidInput => {}
                    Err(e) => return Err(be(&format!("detach {name}"), e)),
                }
            }
            self.unregister_ifindex(idx)?;
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
        unsafe { batch::delete_batch(self.policy_exact.as_fd(), &exact_removals) }
            .map_err(|e| be("exact policy map remove", e))?;
        for slot in &rems {
            if let PolicySlot::Trie(p, k) = slot {
                delete(&self.policy, &lpm_key(*p, k), "policy map remove")?;
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
        if let Some(a) = encode::ipcache_host4_key(&prefix) {
            self.ipcache_hosts4
                .update(&a, bytes(&v), MapFlags::ANY)
                .map_err(|e| be("ipcache host insert", e))
        } else if prefix.prefix_len() == prefix.max_prefix_len() {
            self.ipcache_hosts
                .update(bytes(&data), bytes(&v), MapFlags::ANY)
                .map_err(|e| be("ipcache host insert", e))
        } else {
            self.ipcache
                .update(&lpm_key(p, &data), bytes(&v), MapFlags::ANY)
                .map_err(|e| be("ipcache insert", e))
        }
    }

    fn remove_ipcache(&mut self, prefix: IpNet) -> Result<(), DatapathError> {
        let prefix = prefix.trunc();
        let (p, data) = encode::ipcache_key(&prefix);
        if let Some(a) = encode::ipcache_host4_key(&prefix) {
            delete(&self.ipcache_hosts4, &a, "ipcache remove")
        } else if prefix.prefix_len() == prefix.max_prefix_len() {
            delete(&self.ipcache_hosts, bytes(&data), "ipcache remove")
        } else {
            delete(&self.ipcache, &lpm_key(p, &data), "ipcache remove")
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
        for (k, v) in entries(&self.policy)? {
            let (Some((p, data)), Some(v)) = (
                split_lpm_key::<abi::PolicyKey>(&k),
                read::<abi::PolicyValue>(&v),
            ) else {
                continue;
            };
            let (ep, key) = encode::policy_key_from_abi(p, &data);
            if ep == endpoint {
                out.insert(key, encode::policy_entry_from_abi(&v));
            }
        }
        for (k, v) in entries(&self.policy_exact)? {
            let (Some(k), Some(v)) = (read::<abi::PolicyKey>(&k), read::<abi::PolicyValue>(&v))
            else {
                continue;
            };
            let (ep, key) = encode::policy_exact_key_from_abi(&k);
            if ep == endpoint {
                out.insert(key, encode::policy_entry_from_abi(&v));
            }
        }
        Ok(out)
    }

    fn list_ipcache(&self) -> Result<Vec<(IpNet, Identity)>, DatapathError> {
        let mut out = Vec::new();
        for (k, v) in entries(&self.ipcache)? {
            if let (Some((p, data)), Some(v)) = (
                split_lpm_key::<abi::IpcacheKey>(&k),
                read::<abi::IpcacheValue>(&v),
            ) && let Some(net) = encode::ipcache_key_from_abi(p, &data)
            {
                out.push((net, Identity(v.identity)));
            }
        }
        for (k, v) in entries(&self.ipcache_hosts4)? {
            if let (Ok(a), Some(v)) = (
                <[u8; 4]>::try_from(k.as_slice()),
                read::<abi::IpcacheValue>(&v),
            ) {
                let a = std::net::Ipv4Addr::from(a);
                out.push((IpNet::from(std::net::IpAddr::V4(a)), Identity(v.identity)));
            }
        }
        for (k, v) in entries(&self.ipcache_hosts)? {
            if let (Some(k), Some(v)) = (read::<abi::IpcacheKey>(&k), read::<abi::IpcacheValue>(&v))
            {
                let bits = if k.family == abi::family::V4 { 32 } else { 128 };
                if let Some(net) =
                    encode::ipcache_key_from_abi(abi::IPCACHE_FIXED_PREFIX_BITS + bits, &k)
                {
                    out.push((net, Identity(v.identity)));
                }
            }
        }
        Ok(out)
    }

    fn list_conntrack(&self) -> Result<Vec<CtRecord>, DatapathError> {
        let mut out = Vec::new();
        for (k, v) in entries(&self.conntrack)? {
            if let (Some(k), Some(v)) = (read::<abi::CtKey>(&k), read::<abi::CtEntry>(&v))
                && let Some(r) = encode::ct_from_abi(&k, &v)
            {
                out.push(r);
            }
        }
        for (k, v) in entries(&self.conntrack4)? {
            if let (Some(k), Some(v)) = (read::<abi::CtKey4>(&k), read::<abi::CtEntry>(&v)) {
                out.push(encode::ct4_from_abi(&k, &v));
            }
        }
        Ok(out)
    }

    fn gc_conntrack(&mut self) -> Result<usize, DatapathError> {
        let now = monotonic_ns();
        let mut n = 0;
        for map in [&self.conntrack, &self.conntrack4] {
            let expired: Vec<Vec<u8>> = entries(map)?
                .into_iter()
                .filter(|(_, v)| read::<abi::CtEntry>(v).is_some_and(|e| e.expires_ns <= now))
                .map(|(k, _)| k)
                .collect();
            for k in &expired {
                if map.delete(k).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn drain_events(&mut self) -> Result<Vec<DatapathEvent>, DatapathError> {
        self.events
            .consume()
            .map_err(|e| be("event ring consume", e))?;
        let raw = match self.pending.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => return Err(be("event ring", "callback panicked")),
        };
        Ok(raw.iter().map(encode::event_from_abi).collect())
    }

    fn counters(&self) -> Result<Counters, DatapathError> {
        let mut c = Counters::default();
        for idx in 0..abi::capacity::COUNTERS {
            let vals = self
                .counters
                .lookup_percpu(bytes(&idx), MapFlags::ANY)
                .map_err(|e| be("counter read", e))?
                .unwrap_or_default();
            let sum = vals
                .iter()
                .filter_map(|b| read::<u64>(b))
                .fold(0u64, u64::saturating_add);
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
