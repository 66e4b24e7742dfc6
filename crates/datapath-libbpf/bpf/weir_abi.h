/* SPDX-License-Identifier: Apache-2.0 */
/*
 * C mirror of crates/datapath-abi (weir-datapath-abi): map names, key/value layouts and
 * constants shared by the C TC programs and userspace. Every struct has explicit padding and
 * the same size, alignment and field offsets as its Rust twin; the crate's `abi_layout` test
 * compares both sides field by field, and the static asserts below catch a drift at compile
 * time on the C side alone.
 *
 * Byte order: fields named *_be and all addresses are network order; every other integer is
 * host order.
 */
#ifndef WEIR_ABI_H
#define WEIR_ABI_H

#include <linux/types.h>

/* Map capacities (capacity::*). */
#define WEIR_CAP_POLICY 262144
#define WEIR_CAP_POLICY_EXACT 262144
#define WEIR_CAP_IPCACHE 262144
#define WEIR_CAP_ENDPOINTS 4096
#define WEIR_CAP_CONNTRACK 262144
#define WEIR_CAP_FRAGS 8192
#define WEIR_CAP_EVENTS_BYTES (1 << 20)
#define WEIR_CAP_COUNTERS 256

/* Counter slots (counter::*); slots 130-255 count drops by reason. */
#define WEIR_COUNTER_FORWARDED 0
#define WEIR_COUNTER_EVENTS_LOST 1
#define WEIR_COUNTER_REDIRECTED 2

/* direction::* */
#define WEIR_DIR_INGRESS 0
#define WEIR_DIR_EGRESS 1

/* family::* */
#define WEIR_FAMILY_V4 4
#define WEIR_FAMILY_V6 6

/* action::* */
#define WEIR_ACTION_ALLOW 0
#define WEIR_ACTION_DENY 1
#define WEIR_ACTION_REDIRECT 2

/* drop_reason::* (Cilium's numbering) */
#define WEIR_DROP_INVALID_SOURCE_IP 132
#define WEIR_DROP_POLICY_DENIED 133
#define WEIR_DROP_INVALID_PACKET 134
#define WEIR_DROP_UNSUPPORTED_L3 139
#define WEIR_DROP_INVALID_EXTHDR 156
#define WEIR_DROP_FRAG_NOT_FOUND 175
#define WEIR_DROP_PROXY_LOOKUP_FAILED 178
#define WEIR_DROP_PROXY_ASSIGN_FAILED 179
#define WEIR_DROP_POLICY_DENY 181

/* event_kind::* */
#define WEIR_EVENT_DROP 1
#define WEIR_EVENT_ALLOW_NEW 2
#define WEIR_EVENT_REDIRECT_NEW 3

/* verdict::* (Hubble's numbering) */
#define WEIR_VERDICT_FORWARDED 1
#define WEIR_VERDICT_DROPPED 2
#define WEIR_VERDICT_REDIRECTED 5

/* ct_flag::* */
#define WEIR_CT_SEEN_REPLY 1
#define WEIR_CT_TX_CLOSING 2
#define WEIR_CT_RX_CLOSING 4
#define WEIR_CT_RESET 8

/* ct_lifetime::* (seconds) */
#define WEIR_CT_LIFETIME_TCP_ESTABLISHED 21600ULL
#define WEIR_CT_LIFETIME_TCP_SYN 60ULL
#define WEIR_CT_LIFETIME_TCP_CLOSING 10ULL
#define WEIR_CT_LIFETIME_OTHER 60ULL

#define WEIR_IDENTITY_WORLD 2
#define WEIR_MARK_MAGIC_MASK 0x0F00
#define WEIR_MARK_MAGIC_TO_PROXY 0x0200
#define WEIR_MARK_MAGIC_FROM_INGRESS_PROXY 0x0A00
#define WEIR_MARK_MAGIC_FROM_EGRESS_PROXY 0x0B00
/* The identity an egress proxy mark carries (see datapath-abi's egress_proxy_mark). */
#define WEIR_EGRESS_PROXY_IDENTITY(mark) (((mark) >> 16) | (((mark) & 0xFF) << 16))
/* endpoint_flag::* (per direction: shifted left by WEIR_EP_DIRECTION_SHIFT * direction) */
#define WEIR_EP_ID_EXACT (1u << 0)
#define WEIR_EP_ID_PARTIAL (1u << 1)
#define WEIR_EP_ID_L3_ONLY (1u << 2)
#define WEIR_EP_ANY_EXACT (1u << 3)
#define WEIR_EP_ANY_PARTIAL (1u << 4)
#define WEIR_EP_ANY_L3_ONLY (1u << 5)
#define WEIR_EP_DIRECTION_SHIFT 8
#define WEIR_POLICY_L3_ONLY 0x80
#define WEIR_POLICY_FIXED_PREFIX_BITS 72
#define WEIR_IPCACHE_FIXED_PREFIX_BITS 32

struct weir_policy_key {
	__u32 endpoint_id;
	__u32 identity;
	__u8 direction;
	__u8 protocol;
	__u16 dport_be;
};

struct weir_policy_value {
	__u8 action;
	__u8 priority;
	__u16 proxy_port_be;
	__u8 prefix_len;
	__u8 pad[3];
	__u32 cookie;
	__u32 pad2;
	/* Packets and bytes this entry decided; the programs add atomically. */
	__u64 packets;
	__u64 bytes;
};

struct weir_ipcache_key {
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct weir_ipcache_value {
	__u32 identity;
	__u8 tunnel_endpoint[16];
	__u8 encrypt_key;
	__u8 flags;
	__u8 pad[2];
};

struct weir_endpoint_info {
	__u32 endpoint_id;
	__u32 identity;
	__u32 flags;
	__u8 ipv4[4];
	__u8 ipv6[16];
};

struct weir_ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport_be;
	__u16 dport_be;
	__u8 protocol;
	__u8 family;
	__u8 direction;
	__u8 pad;
};

struct weir_ct_key4 {
	__u8 saddr[4];
	__u8 daddr[4];
	__u16 sport_be;
	__u16 dport_be;
	__u8 protocol;
	__u8 direction;
	__u8 pad[2];
};

struct weir_ct_entry {
	__u64 expires_ns;
	__u64 packets;
	__u64 bytes;
	__u16 flags;
	__u16 proxy_port;
	__u8 pad[4];
};

struct weir_frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;
	__u8 protocol;
	__u8 family;
	__u8 pad[2];
};

struct weir_frag_value {
	__u16 sport_be;
	__u16 dport_be;
};

struct weir_event {
	__u64 timestamp_ns;
	__u8 kind;
	__u8 verdict;
	__u8 drop_reason;
	__u8 direction;
	__u8 family;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 pad;
	__u16 sport;
	__u16 dport;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 endpoint_id;
	__u32 ifindex;
	__u16 proxy_port;
	__u8 pad2[2];
	__u8 saddr[16];
	__u8 daddr[16];
};

/* LPM trie keys: {prefix length (host order), data}. */
struct weir_policy_lpm_key {
	__u32 prefixlen;
	struct weir_policy_key data;
};

struct weir_ipcache_lpm_key {
	__u32 prefixlen;
	struct weir_ipcache_key data;
};

_Static_assert(sizeof(struct weir_policy_key) == 12, "policy key");
_Static_assert(sizeof(struct weir_policy_value) == 32, "policy value");
_Static_assert(sizeof(struct weir_ipcache_key) == 20, "ipcache key");
_Static_assert(sizeof(struct weir_ipcache_value) == 24, "ipcache value");
_Static_assert(sizeof(struct weir_endpoint_info) == 32, "endpoint info");
_Static_assert(sizeof(struct weir_ct_key) == 40, "ct key");
_Static_assert(sizeof(struct weir_ct_key4) == 16, "ct key v4");
_Static_assert(sizeof(struct weir_ct_entry) == 32, "ct entry");
_Static_assert(sizeof(struct weir_frag_key) == 40, "frag key");
_Static_assert(sizeof(struct weir_frag_value) == 4, "frag value");
_Static_assert(sizeof(struct weir_event) == 72, "event");

#endif /* WEIR_ABI_H */
