//! The binary interface between Weir's eBPF programs and userspace: map keys, map values and
//! event records, shared by the kernel side (compiled for `bpfel-unknown-none`) and the loader.
//!
//! Every type is `#[repr(C)]` with explicit padding fields (always written as zero), and its
//! size and field offsets are checked at compile time, so a C mirror of this file can be written
//! from the assertions alone.
//!
//! Byte order: fields named `*_be` and all addresses are in network byte order (as they appear
//! in the packet); every other integer is in host byte order.
//!
//! LPM trie keys (`POLICY`, `IPCACHE`) are `{prefix_len: u32 (host order), data}` where `data`
//! is [`PolicyKey`] or [`IpcacheKey`]; aya's `lpm_trie::Key<K>` has exactly that layout.
#![no_std]

use core::mem::{align_of, offset_of, size_of};

/// Map names, as the loader finds them in the object file and pins them.
pub mod map_name {
    /// Global policy LPM trie for entries with a partial protocol/port prefix (1–23 bits):
    /// [`PolicyKey`](crate::PolicyKey) → [`PolicyValue`](crate::PolicyValue).
    pub const POLICY: &str = "WEIR_POLICY";
    /// Global policy hash for exact entries (24 bits: protocol and port) and L3-only entries
    /// (0 bits, `direction | POLICY_L3_ONLY`): the common entries, looked up in constant time.
    pub const POLICY_EXACT: &str = "WEIR_POLICY_EXACT";
    /// ipcache LPM trie for prefixes shorter than a host address:
    /// [`IpcacheKey`](crate::IpcacheKey) → [`IpcacheValue`](crate::IpcacheValue).
    pub const IPCACHE: &str = "WEIR_IPCACHE";
    /// ipcache hash for IPv6 host addresses (/128: pods, nodes, learned DNS answers), consulted
    /// first: [`IpcacheKey`](crate::IpcacheKey) → [`IpcacheValue`](crate::IpcacheValue).
    pub const IPCACHE_HOSTS: &str = "WEIR_IPCACHE_HOSTS";
    /// ipcache hash for IPv4 host addresses (/32), consulted first, with the compact key
    /// (hashing 4 bytes instead of 20 is a measurable part of a new connection's cost): the
    /// address's 4 bytes as in the packet, read as a native-order `u32` →
    /// [`IpcacheValue`](crate::IpcacheValue).
    pub const IPCACHE_HOSTS4: &str = "WEIR_HOSTS4";
    /// Endpoint hash: ifindex (`u32`) → [`EndpointInfo`](crate::EndpointInfo).
    pub const ENDPOINTS: &str = "WEIR_ENDPOINTS";
    /// Conntrack LRU hash for IPv6: [`CtKey`](crate::CtKey) → [`CtEntry`](crate::CtEntry).
    pub const CONNTRACK: &str = "WEIR_CT";
    /// Conntrack LRU hash for IPv4, with the compact key (hashing 16 bytes instead of 40 is a
    /// measurable part of a new connection's cost): [`CtKey4`](crate::CtKey4) →
    /// [`CtEntry`](crate::CtEntry).
    pub const CONNTRACK4: &str = "WEIR_CT4";
    /// Fragment tracking LRU hash: [`FragKey`](crate::FragKey) → [`FragValue`](crate::FragValue).
    pub const FRAGS: &str = "WEIR_FRAGS";
    /// Event ring buffer of [`Event`](crate::Event) records.
    pub const EVENTS: &str = "WEIR_EVENTS";
    /// Per-CPU `u64` counters, indexed as described in [`counter`](crate::counter).
    pub const COUNTERS: &str = "WEIR_COUNTERS";
}

/// Program names in the object file.
pub mod program_name {
    /// Attached to tc ingress of the host-side veth: packets leaving the pod (egress policy).
    pub const FROM_POD: &str = "weir_from_pod";
    /// Attached to tc egress of the host-side veth: packets entering the pod (ingress policy).
    pub const TO_POD: &str = "weir_to_pod";
    /// Returns TC_ACT_OK and nothing else: the same-run baseline of verdict-cost benchmarks.
    pub const EMPTY: &str = "weir_empty";
}

/// Map sizes.
pub mod capacity {
    /// Partial-prefix policy entries over all endpoints.
    pub const POLICY: u32 = 262_144;
    /// Exact and L3-only policy entries over all endpoints.
    pub const POLICY_EXACT: u32 = 262_144;
    /// ipcache prefixes (Cilium's default is 512k; 256k holds a 100k-pod cluster dual-stack).
    pub const IPCACHE: u32 = 262_144;
    /// Endpoints on the node.
    pub const ENDPOINTS: u32 = 4_096;
    /// Conntrack entries, per address family (`CONNTRACK` and `CONNTRACK4` each).
    pub const CONNTRACK: u32 = 262_144;
    /// In-flight fragmented datagrams.
    pub const FRAGS: u32 = 8_192;
    /// Event ring buffer size in bytes (a power of two).
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Number of counter slots.
    pub const COUNTERS: u32 = 256;
}

/// Indices of the `COUNTERS` per-CPU array. Indices 130–255 count drops by [`drop_reason`].
pub mod counter {
    /// Packets forwarded (allowed or established).
    pub const FORWARDED: u32 = 0;
    /// Events that could not be written because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 1;
    /// Packets of connections steered to a proxy.
    pub const REDIRECTED: u32 = 2;
}

/// Policy directions, as seen from the endpoint (the `direction` byte of keys and events).
pub mod direction {
    /// Traffic into the endpoint.
    pub const INGRESS: u8 = 0;
    /// Traffic out of the endpoint.
    pub const EGRESS: u8 = 1;
}

/// Address families (the `family` byte of keys and events).
pub mod family {
    /// IPv4: the address is in the first 4 bytes, the other 12 are zero.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// [`PolicyValue::action`] values.
pub mod action {
    /// Allow.
    pub const ALLOW: u8 = 0;
    /// Deny (drop reason 181).
    pub const DENY: u8 = 1;
    /// Allow and steer to the proxy port.
    pub const REDIRECT: u8 = 2;
}

/// Drop reasons, numbered as Cilium numbers them (`bpf/lib/common.h`).
pub mod drop_reason {
    /// A packet from an endpoint whose source address is not the endpoint's
    /// (`DROP_INVALID_SIP`): a pod cannot borrow another workload's identity.
    pub const INVALID_SOURCE_IP: u8 = 132;
    /// No policy entry allowed the packet (`DROP_POLICY`).
    pub const POLICY_DENIED: u8 = 133;
    /// Truncated or malformed IPv4/IPv6/L4 header (`DROP_INVALID`).
    pub const INVALID_PACKET: u8 = 134;
    /// Neither IPv4, IPv6 nor ARP (`DROP_UNKNOWN_L3`).
    pub const UNSUPPORTED_L3: u8 = 139;
    /// Too many or malformed IPv6 extension headers (`DROP_INVALID_EXTHDR`).
    pub const INVALID_EXTHDR: u8 = 156;
    /// A non-first fragment whose first fragment was not seen or not allowed
    /// (`DROP_FRAG_NOT_FOUND`).
    pub const FRAG_NOT_FOUND: u8 = 175;
    /// No proxy socket to redirect to (`DROP_PROXY_LOOKUP_FAILED`).
    pub const PROXY_LOOKUP_FAILED: u8 = 178;
    /// Assigning the packet to the proxy socket failed (`DROP_PROXY_SET_FAILED`).
    pub const PROXY_ASSIGN_FAILED: u8 = 179;
    /// A deny entry matched (`DROP_POLICY_DENY`).
    pub const POLICY_DENY: u8 = 181;
}

/// Event kinds ([`Event::kind`]).
pub mod event_kind {
    /// A packet was dropped.
    pub const DROP: u8 = 1;
    /// Policy allowed a new connection (one event per connection: monitor aggregation).
    pub const ALLOW_NEW: u8 = 2;
    /// Policy redirected a new connection to a proxy.
    pub const REDIRECT_NEW: u8 = 3;
}

/// Event verdicts ([`Event::verdict`]), numbered as Hubble's `Verdict`.
pub mod verdict {
    /// Forwarded.
    pub const FORWARDED: u8 = 1;
    /// Dropped.
    pub const DROPPED: u8 = 2;
    /// Redirected to a proxy.
    pub const REDIRECTED: u8 = 5;
}

/// Conntrack entry flags ([`CtEntry::flags`]).
pub mod ct_flag {
    /// A packet was seen in the reply direction.
    pub const SEEN_REPLY: u16 = 1;
    /// The originating side sent FIN.
    pub const TX_CLOSING: u16 = 2;
    /// The replying side sent FIN.
    pub const RX_CLOSING: u16 = 4;
    /// A RST was seen.
    pub const RESET: u16 = 8;
}

/// Conntrack lifetimes in seconds (Cilium's defaults).
pub mod ct_lifetime {
    /// TCP after the reply direction was seen and before any FIN/RST.
    pub const TCP_ESTABLISHED: u64 = 21_600;
    /// TCP before a reply (Cilium's `--bpf-ct-timeout-regular-tcp-syn`).
    pub const TCP_SYN: u64 = 60;
    /// TCP once either side sent FIN or RST (Cilium's `--bpf-ct-timeout-regular-tcp-fin`):
    /// a closed connection stops counting as live, e.g. for an expired DNS name's address.
    pub const TCP_CLOSING: u64 = 10;
    /// UDP, SCTP, ICMP echo and other protocols.
    pub const OTHER: u64 = 60;
}

/// Reserved identity for addresses the ipcache does not know.
pub const IDENTITY_WORLD: u32 = 2;

/// The bits of the skb mark that hold one of the `MARK_MAGIC_*` values (Cilium's layout).
pub const MARK_MAGIC_MASK: u32 = 0x0F00;

/// skb mark set on packets steered to a proxy: `MARK_MAGIC_TO_PROXY | proxy_port << 16`.
/// Packets entering a pod are sent back into the ingress of the pod's host-side interface
/// with this mark (a hairpin), where `weir_from_pod` assigns them to the proxy; pods cannot
/// forge it, as the kernel clears the mark of packets crossing a network namespace.
pub const MARK_MAGIC_TO_PROXY: u32 = 0x0200;

/// skb mark (`SO_MARK`) of the ingress proxy's connections to the endpoint whose ingress
/// policy it has just enforced: `weir_to_pod` passes them without a second policy lookup
/// (which would redirect them to the proxy again).
pub const MARK_MAGIC_FROM_INGRESS_PROXY: u32 = 0x0A00;

/// skb mark (`SO_MARK`) of the egress proxy's upstream connections, carrying the client's
/// identity ([`egress_proxy_mark`]): the destination's ingress policy judges that identity,
/// not the node's.
pub const MARK_MAGIC_FROM_EGRESS_PROXY: u32 = 0x0B00;

/// The mark for an egress proxy connection on behalf of `identity` (24 bits): the low 16 bits
/// in the mark's top half, bits 16..24 in its low byte, the magic in between.
pub const fn egress_proxy_mark(identity: u32) -> u32 {
    MARK_MAGIC_FROM_EGRESS_PROXY | ((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF)
}

/// The identity carried by an [`egress_proxy_mark`].
pub const fn egress_proxy_identity(mark: u32) -> u32 {
    (mark >> 16) | ((mark & 0xFF) << 16)
}

/// [`EndpointInfo::flags`]: which kinds of policy entries the endpoint has, so that the program
/// skips the lookups that cannot match. Each direction has its own byte: the bits below shifted
/// left by `DIRECTION_SHIFT * direction`. A set bit with no entry behind it only costs a lookup;
/// a clear bit with an entry behind it would change verdicts, so userspace sets bits before
/// writing entries and clears them only after removing the last one.
pub mod endpoint_flag {
    /// Identity-specific entries with protocol and port (the exact hash).
    pub const ID_EXACT: u32 = 1 << 0;
    /// Identity-specific entries with a partial protocol/port prefix (the trie).
    pub const ID_PARTIAL: u32 = 1 << 1;
    /// Identity-specific L3-only entries (the exact hash, `POLICY_L3_ONLY`).
    pub const ID_L3_ONLY: u32 = 1 << 2;
    /// ANY-identity entries with protocol and port.
    pub const ANY_EXACT: u32 = 1 << 3;
    /// ANY-identity entries with a partial protocol/port prefix.
    pub const ANY_PARTIAL: u32 = 1 << 4;
    /// ANY-identity L3-only entries.
    pub const ANY_L3_ONLY: u32 = 1 << 5;
    /// Shift of a direction's byte: `flag << (DIRECTION_SHIFT * direction)`.
    pub const DIRECTION_SHIFT: u32 = 8;
}

/// Set in [`PolicyKey::direction`] of an L3-only entry (prefix 0) in the exact policy hash.
pub const POLICY_L3_ONLY: u8 = 0x80;

/// Bits of the policy LPM prefix that cover endpoint, identity and direction.
pub const POLICY_FIXED_PREFIX_BITS: u32 = 72;
/// Bits of the ipcache LPM prefix that cover family and padding.
pub const IPCACHE_FIXED_PREFIX_BITS: u32 = 32;

/// Data part of a policy LPM trie key. The LPM prefix always covers `endpoint_id`, `identity`
/// and `direction` (72 bits), then 0–24 bits of `protocol` and `dport_be`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyKey {
    /// Endpoint the entry belongs to.
    pub endpoint_id: u32,
    /// Remote identity; 0 = any.
    pub identity: u32,
    /// [`direction`].
    pub direction: u8,
    /// IP protocol; 0 when the prefix does not cover it.
    pub protocol: u8,
    /// Destination port (ICMP type for ICMP), network order; bits beyond the prefix are zero.
    pub dport_be: u16,
}

/// Policy map value (both policy maps).
///
/// `packets` and `bytes` count the packets whose policy decision this entry made (allowed or
/// redirected new connections, denied packets), on the policy path only, so packets of
/// established connections (conntrack hits) are not counted. Entries of the exact hash are
/// counted with atomic adds; entries of the LPM trie with plain adds (a trie value follows the
/// 12-byte key in the kernel's node, 4 bytes off 8-byte alignment, where an atomic could
/// straddle a cache line), so their counts can miss increments when several CPUs decide by
/// the same entry at once. Userspace writes them as zero; rewriting an entry restarts its
/// counts.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    /// [`action`].
    pub action: u8,
    /// Proxy listener priority (higher wins among redirects).
    pub priority: u8,
    /// Proxy port, network order; 0 unless `action` is [`action::REDIRECT`].
    pub proxy_port_be: u16,
    /// Bits of protocol+port the entry specifies (0–24); breaks ties between the two lookups.
    pub prefix_len: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// Opaque rule cookie for policy logs.
    pub cookie: u32,
    /// Zero.
    pub pad2: u32,
    /// Packets this entry decided (see the type's documentation).
    pub packets: u64,
    /// Bytes (`skb->len`) of those packets.
    pub bytes: u64,
}

/// Data part of an ipcache LPM trie key. The prefix covers `family` and `pad` (32 bits) and then
/// the address bits.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpcacheKey {
    /// [`family`].
    pub family: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// Address, network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}

/// ipcache value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpcacheValue {
    /// Security identity of the prefix.
    pub identity: u32,
    /// Tunnel endpoint (future: multi-node).
    pub tunnel_endpoint: [u8; 16],
    /// Encryption key index (future).
    pub encrypt_key: u8,
    /// Flags (future).
    pub flags: u8,
    /// Zero.
    pub pad: [u8; 2],
}

/// Endpoint map value, keyed by the host-side veth ifindex (`u32`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointInfo {
    /// Endpoint id (key part of its policy entries).
    pub endpoint_id: u32,
    /// The endpoint's own security identity.
    pub identity: u32,
    /// [`endpoint_flag`] bits, maintained by the loader from the endpoint's policy entries.
    pub flags: u32,
    /// The endpoint's IPv4 address, network order: IPv4 packets leaving the endpoint must
    /// come from it. All zero: not checked (no IPv4 address known).
    pub ipv4: [u8; 4],
    /// The endpoint's IPv6 address: IPv6 packets leaving the endpoint must come from it (or
    /// from a link-local or the unspecified address, for neighbour discovery). All zero: not
    /// checked.
    pub ipv6: [u8; 16],
}

/// Conntrack key: the tuple as the packet that created the entry carried it, plus the policy
/// direction of the hook that created it (so the two endpoints of a node-local flow keep
/// separate entries and each still evaluates its own policy).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    /// Source address, network order.
    pub saddr: [u8; 16],
    /// Destination address, network order.
    pub daddr: [u8; 16],
    /// Source port (ICMP echo: identifier for requests, 0 for replies), network order.
    pub sport_be: u16,
    /// Destination port (ICMP echo: 0 for requests, identifier for replies), network order.
    pub dport_be: u16,
    /// IP protocol.
    pub protocol: u8,
    /// [`family`].
    pub family: u8,
    /// [`direction`] of the creating hook.
    pub direction: u8,
    /// Zero.
    pub pad: u8,
}

/// Compact conntrack key of an IPv4 flow (the `CONNTRACK4` map): the same tuple and direction as
/// [`CtKey`], in 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtKey4 {
    /// Source address, network order.
    pub saddr: [u8; 4],
    /// Destination address, network order.
    pub daddr: [u8; 4],
    /// Source port (as in [`CtKey::sport_be`]), network order.
    pub sport_be: u16,
    /// Destination port (as in [`CtKey::dport_be`]), network order.
    pub dport_be: u16,
    /// IP protocol.
    pub protocol: u8,
    /// [`direction`] of the creating hook.
    pub direction: u8,
    /// Zero.
    pub pad: [u8; 2],
}

/// Conntrack value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtEntry {
    /// Expiry on the `bpf_ktime_get_ns` clock (CLOCK_MONOTONIC), nanoseconds.
    pub expires_ns: u64,
    /// Packets seen (both directions; updated without atomics, so approximate).
    pub packets: u64,
    /// Bytes seen (both directions; approximate).
    pub bytes: u64,
    /// [`ct_flag`] bits.
    pub flags: u16,
    /// Proxy port of a redirected connection, host order; 0 = none.
    pub proxy_port: u16,
    /// Zero.
    pub pad: [u8; 4],
}

/// Key of an in-flight fragmented datagram.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    /// Source address, network order.
    pub saddr: [u8; 16],
    /// Destination address, network order.
    pub daddr: [u8; 16],
    /// IP identification (IPv4: 16 bits, zero-extended; IPv6: fragment header id), raw.
    pub id: u32,
    /// IP protocol.
    pub protocol: u8,
    /// [`family`].
    pub family: u8,
    /// Zero.
    pub pad: [u8; 2],
}

/// The L4 ports of a fragmented datagram, learned from its first fragment.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FragValue {
    /// Source port, network order.
    pub sport_be: u16,
    /// Destination port, network order.
    pub dport_be: u16,
}

/// An event record on the ring buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Event {
    /// `bpf_ktime_get_ns` at the verdict.
    pub timestamp_ns: u64,
    /// [`event_kind`].
    pub kind: u8,
    /// [`verdict`].
    pub verdict: u8,
    /// [`drop_reason`], 0 when not dropped.
    pub drop_reason: u8,
    /// [`direction`] of the policy that was applied.
    pub direction: u8,
    /// [`family`].
    pub family: u8,
    /// IP protocol.
    pub protocol: u8,
    /// TCP flags byte (FIN=1, SYN=2, RST=4, PSH=8, ACK=16, URG=32, ECE=64, CWR=128).
    pub tcp_flags: u8,
    /// Zero.
    pub pad: u8,
    /// Source port, host order (ICMP: 0).
    pub sport: u16,
    /// Destination port, host order (ICMP: the type).
    pub dport: u16,
    /// Source identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// Endpoint the hook belongs to.
    pub endpoint_id: u32,
    /// ifindex of the host-side veth.
    pub ifindex: u32,
    /// Proxy port, host order; 0 = none.
    pub proxy_port: u16,
    /// Zero.
    pub pad2: [u8; 2],
    /// Source address, network order.
    pub saddr: [u8; 16],
    /// Destination address, network order.
    pub daddr: [u8; 16],
}

// Layout checks: these are the ABI.
const _: () = {
    assert!(size_of::<PolicyKey>() == 12);
    assert!(offset_of!(PolicyKey, identity) == 4);
    assert!(offset_of!(PolicyKey, direction) == 8);
    assert!(offset_of!(PolicyKey, protocol) == 9);
    assert!(offset_of!(PolicyKey, dport_be) == 10);
    assert!(size_of::<PolicyValue>() == 32);
    assert!(align_of::<PolicyValue>() == 8);
    assert!(offset_of!(PolicyValue, proxy_port_be) == 2);
    assert!(offset_of!(PolicyValue, prefix_len) == 4);
    assert!(offset_of!(PolicyValue, cookie) == 8);
    assert!(offset_of!(PolicyValue, pad2) == 12);
    assert!(offset_of!(PolicyValue, packets) == 16);
    assert!(offset_of!(PolicyValue, bytes) == 24);
    assert!(size_of::<IpcacheKey>() == 20);
    assert!(offset_of!(IpcacheKey, addr) == 4);
    assert!(size_of::<IpcacheValue>() == 24);
    assert!(offset_of!(IpcacheValue, tunnel_endpoint) == 4);
    assert!(offset_of!(IpcacheValue, encrypt_key) == 20);
    assert!(size_of::<EndpointInfo>() == 32);
    assert!(offset_of!(EndpointInfo, ipv4) == 12);
    assert!(offset_of!(EndpointInfo, ipv6) == 16);
    assert!(size_of::<CtKey>() == 40);
    assert!(offset_of!(CtKey, sport_be) == 32);
    assert!(offset_of!(CtKey, protocol) == 36);
    assert!(offset_of!(CtKey, direction) == 38);
    assert!(size_of::<CtKey4>() == 16);
    assert!(offset_of!(CtKey4, sport_be) == 8);
    assert!(offset_of!(CtKey4, protocol) == 12);
    assert!(offset_of!(CtKey4, direction) == 13);
    assert!(size_of::<CtEntry>() == 32);
    assert!(offset_of!(CtEntry, flags) == 24);
    assert!(size_of::<FragKey>() == 40);
    assert!(size_of::<FragValue>() == 4);
    assert!(size_of::<Event>() == 72);
    assert!(offset_of!(Event, sport) == 16);
    assert!(offset_of!(Event, src_identity) == 20);
    assert!(offset_of!(Event, ifindex) == 32);
    assert!(offset_of!(Event, proxy_port) == 36);
    assert!(offset_of!(Event, saddr) == 40);
    assert!(offset_of!(Event, daddr) == 56);
};

#[cfg(feature = "aya")]
mod pod {
    // SAFETY: every type is #[repr(C)], has no implicit padding (checked above) and any bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::IpcacheKey {}
    unsafe impl aya::Pod for super::IpcacheValue {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtKey4 {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::Event {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_proxy_mark_round_trips_24_bit_identities() {
        for id in [0, 1, 2, 0xFFFF, 0x1_0000, 0x12_3456, 0xFF_FFFF] {
            let mark = egress_proxy_mark(id);
            assert_eq!(mark & MARK_MAGIC_MASK, MARK_MAGIC_FROM_EGRESS_PROXY);
            assert_eq!(egress_proxy_identity(mark), id);
        }
    }
}
