//! Weir's kernel datapath on aya. The TC programs (Rust, in `ebpf/`) run on each endpoint's
//! host-side veth: `weir_from_pod` on tc ingress (packets leaving the pod, egress policy,
//! remote = destination) and `weir_to_pod` on tc egress (packets entering the pod, ingress
//! policy, remote = source). They look the remote address up in the ipcache (unknown = world),
//! pass established and reply packets through conntrack, apply the two-lookup policy rule to
//! new connections, and report drops and new connections on a ring buffer.
//!
//! [`AyaDatapath`] loads the object once, pins maps and programs under a caller-given bpffs
//! directory, and attaches per endpoint with clsact + netlink filters that outlive the process;
//! a new process calling [`AyaDatapath::load`] with the same directory takes the maps over.
//!
//! Choices worth knowing:
//! * Lookups cost the same at any map size: exact (protocol+port) and L3-only policy entries
//!   live in a hash (`WEIR_POLICY_EXACT`), only partial port prefixes in the LPM trie; host
//!   addresses of the ipcache live in hashes (`WEIR_HOSTS4` with a 4-byte key for IPv4,
//!   `WEIR_IPCACHE_HOSTS` for IPv6), shorter prefixes in the trie. Each lookup takes the hash first (its answer is the longest possible match).
//! * Headers are read straight from the linear packet data when they are there, through
//!   `bpf_skb_load_bytes` otherwise; a pure TCP SYN skips the reply conntrack lookup; a full
//!   event ring is detected before reserving (the lost event is counted).
//! * Later IP fragments pass only if their first fragment passed (tracked by source,
//!   destination, protocol and IP id); otherwise they drop with 175.
//! * Truncated or malformed IPv4/IPv6/L4 headers drop with 134, more than 8 IPv6 extension
//!   headers with 156, Ethernet types other than IPv4/IPv6/ARP with 139. ARP passes.
//! * ICMPv6 neighbour discovery (types 133–137) passes without policy, as in Cilium.
//! * ICMP echo is tracked by identifier; other ICMP types (including errors) are judged by
//!   policy on their type for every packet.
//! * Redirect entries mark the packet (`skb->mark = 0x0200 | proxy_port << 16`, Cilium's
//!   `MARK_MAGIC_TO_PROXY`) and record the proxy port in conntrack. For TCP leaving a pod, the
//!   SYN is also assigned (`bpf_sk_assign`) to the proxy's IP_TRANSPARENT listener on that port
//!   in the node namespace; the node must route marked packets locally
//!   (`ip rule add fwmark 0x200/0xf00 lookup 2004; ip route add local 0.0.0.0/0 dev lo table 2004`).
//!   No listener: the SYN drops with 178 (fail closed). Redirects of traffic entering a pod
//!   (tc egress, where `bpf_sk_assign` is unavailable) and of UDP are only marked for now.

mod loader;
/// Ethernet frame builders for test runs (shared with every kernel backend).
pub use weir_datapath::packet;
pub mod replay;
mod testrun;

pub use loader::{AyaDatapath, LoadError};
pub use weir_datapath::testrun::{CtState, HookDirection, TestRunOutcome};

/// The compiled eBPF object, built by `build.rs`.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-datapath-ebpf"));
