// SPDX-License-Identifier: Apache-2.0
/*
 * Weir's TC programs in C: the same decisions as the Rust programs of weir-datapath-aya
 * (crates/datapath-aya/ebpf/src/program.rs), packet for packet. Parse, look the remote address
 * up in the ipcache, pass established and reply packets through conntrack, apply the
 * two-lookup policy rule to new connections, report on the ring buffer and in counters.
 *
 * Result for tests: cb[0] = drop reason | verdict << 8 | ct state << 16, cb[1] = remote
 * identity; BPF_PROG_TEST_RUN returns both in ctx_out.
 *
 * Maps are pinned by the loader (it sets each map's pin path), so nothing here says how.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weir_abi.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEIR_CAP_POLICY);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_policy_lpm_key);
	__type(value, struct weir_policy_value);
} WEIR_POLICY SEC(".maps");

/* Exact (24-bit) and L3-only entries: constant-time lookups whatever the map size. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_CAP_POLICY_EXACT);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_policy_key);
	__type(value, struct weir_policy_value);
} WEIR_POLICY_EXACT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WEIR_CAP_IPCACHE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_ipcache_lpm_key);
	__type(value, struct weir_ipcache_value);
} WEIR_IPCACHE SEC(".maps");

/* IPv4 host addresses (/32), consulted before the trie; the key is the address as in the
 * packet. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_CAP_IPCACHE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct weir_ipcache_value);
} WEIR_HOSTS4 SEC(".maps");

/* IPv6 host addresses (/128), consulted before the trie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_CAP_IPCACHE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_ipcache_key);
	__type(value, struct weir_ipcache_value);
} WEIR_IPCACHE_HOSTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEIR_CAP_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct weir_endpoint_info);
} WEIR_ENDPOINTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_CAP_CONNTRACK);
	__type(key, struct weir_ct_key);
	__type(value, struct weir_ct_entry);
} WEIR_CT SEC(".maps");

/* IPv4 conntrack with the compact key: hashing 16 bytes instead of 40. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_CAP_CONNTRACK);
	__type(key, struct weir_ct_key4);
	__type(value, struct weir_ct_entry);
} WEIR_CT4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, WEIR_CAP_FRAGS);
	__type(key, struct weir_frag_key);
	__type(value, struct weir_frag_value);
} WEIR_FRAGS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, WEIR_CAP_EVENTS_BYTES);
} WEIR_EVENTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_CAP_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} WEIR_COUNTERS SEC(".maps");

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86dd
#define ETH_P_ARP 0x0806

#define IPPROTO_ICMP_ 1
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_ICMPV6_ 58
#define IPPROTO_SCTP_ 132

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* IPv6 extension headers walked before the L4 header; more than this drops with 156. */
#define MAX_EXT_HEADERS 8

/* Conntrack state reported in cb[0] bits 16..24. */
#define CT_NEW 0
#define CT_ESTABLISHED 1
#define CT_REPLY 2
#define CT_FRAGMENT 3
#define CT_UNTRACKED_PASS 4

#define NS_PER_SEC 1000000000ULL

/* Ring space one event takes: the record plus the 8-byte header, rounded to 8. */
#define EVENT_RECORD_BYTES ((sizeof(struct weir_event) + 8 + 7) & ~7ULL)

/* Parser results besides a drop reason (drop reasons are all above these). */
#define PARSED_IP 0
#define PARSED_NOT_IP 1

/* What the parser learned about a packet. */
struct packet {
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 family;
	__u8 protocol;
	/* Conntrack ports, network order. */
	__u16 sport_be;
	__u16 dport_be;
	/* Port used for the policy lookup (ICMP: type), host order. */
	__u16 policy_port;
	__u8 tcp_flags;
	/* Conntrack applies (TCP, UDP, SCTP, ICMP echo, other protocols). */
	__u8 trackable;
	/* Passes without policy (IPv6 neighbour discovery). */
	__u8 bypass;
	/* 0 = not fragmented, 1 = first fragment of several, 2 = a later fragment. */
	__u8 frag;
	__u32 frag_id;
};

static __always_inline void count(__u32 idx)
{
	__u64 *p = bpf_map_lookup_elem(&WEIR_COUNTERS, &idx);
	if (p)
		*p += 1;
}

/*
 * Reads `len` bytes at `off`: straight from the linear data when they are there (no helper
 * call), else through bpf_skb_load_bytes (non-linear skbs). Non-zero when past the end.
 */
static __always_inline int load(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	/* Offsets are bounded by the parser (a few KiB); the mask tells the verifier so. */
	off &= 0xffff;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + off + len <= end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len) ? -1 : 0;
}

/* Returns PARSED_IP, PARSED_NOT_IP or a drop reason. */
static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
	__u8 eth[2];
	__u32 l4;

	if (load(skb, 12, eth, 2))
		return WEIR_DROP_INVALID_PACKET;
	__u16 proto = ((__u16)eth[0] << 8) | eth[1];
	__builtin_memset(p, 0, sizeof(*p));
	p->trackable = 1;

	if (proto == ETH_P_IP) {
		__u8 ip[20];
		if (load(skb, ETH_HLEN, ip, 20))
			return WEIR_DROP_INVALID_PACKET;
		__u32 ihl = (__u32)(ip[0] & 0x0f) * 4;
		if ((ip[0] >> 4) != 4 || ihl < 20)
			return WEIR_DROP_INVALID_PACKET;
		p->family = WEIR_FAMILY_V4;
		p->protocol = ip[9];
		__builtin_memcpy(p->saddr, &ip[12], 4);
		__builtin_memcpy(p->daddr, &ip[16], 4);
		__u16 frag = ((__u16)ip[6] << 8) | ip[7];
		p->frag_id = ((__u32)ip[4] << 8) | ip[5];
		if (frag & 0x1fff)
			p->frag = 2;
		else if (frag & 0x2000)
			p->frag = 1;
		l4 = ETH_HLEN + ihl;
	} else if (proto == ETH_P_IPV6) {
		__u8 ip[8];
		if (load(skb, ETH_HLEN, ip, 8))
			return WEIR_DROP_INVALID_PACKET;
		if ((ip[0] >> 4) != 6)
			return WEIR_DROP_INVALID_PACKET;
		p->family = WEIR_FAMILY_V6;
		if (load(skb, ETH_HLEN + 8, p->saddr, 16))
			return WEIR_DROP_INVALID_PACKET;
		if (load(skb, ETH_HLEN + 24, p->daddr, 16))
			return WEIR_DROP_INVALID_PACKET;
		__u8 next = ip[6];
		__u32 off = ETH_HLEN + 40;
		int done = 0;
		/* One more round than headers allowed: the last one reads the L4 protocol. */
#pragma unroll
		for (int i = 0; i <= MAX_EXT_HEADERS; i++) {
			if (next == 0 || next == 43 || next == 60) {
				/* Hop-by-hop, routing, destination options: 8-octet units, minus one. */
				__u8 h[2];
				if (load(skb, off, h, 2))
					return WEIR_DROP_INVALID_PACKET;
				next = h[0];
				off += ((__u32)h[1] + 1) * 8;
			} else if (next == 51) {
				/* Authentication header: 4-octet units, minus two. */
				__u8 h[2];
				if (load(skb, off, h, 2))
					return WEIR_DROP_INVALID_PACKET;
				next = h[0];
				off += ((__u32)h[1] + 2) * 4;
			} else if (next == 44) {
				__u8 h[8];
				if (load(skb, off, h, 8))
					return WEIR_DROP_INVALID_PACKET;
				next = h[0];
				__u16 fo = ((__u16)h[2] << 8) | h[3];
				p->frag_id = ((__u32)h[4] << 24) | ((__u32)h[5] << 16) |
					     ((__u32)h[6] << 8) | h[7];
				if (fo >> 3)
					p->frag = 2;
				else if (fo & 1)
					p->frag = 1;
				off += 8;
			} else {
				done = 1;
				break;
			}
		}
		if (!done)
			return WEIR_DROP_INVALID_EXTHDR;
		p->protocol = next;
		l4 = off;
	} else if (proto == ETH_P_ARP) {
		return PARSED_NOT_IP;
	} else {
		return WEIR_DROP_UNSUPPORTED_L3;
	}

	/* No L4 header in a later fragment. */
	if (p->frag == 2)
		return PARSED_IP;
	switch (p->protocol) {
	case IPPROTO_TCP_: {
		__u8 h[20];
		if (load(skb, l4, h, 20))
			return WEIR_DROP_INVALID_PACKET;
		if ((h[12] >> 4) < 5)
			return WEIR_DROP_INVALID_PACKET;
		__builtin_memcpy(&p->sport_be, &h[0], 2);
		__builtin_memcpy(&p->dport_be, &h[2], 2);
		p->policy_port = ((__u16)h[2] << 8) | h[3];
		p->tcp_flags = h[13];
		break;
	}
	case IPPROTO_UDP_:
	case IPPROTO_SCTP_: {
		__u8 h[8];
		if (load(skb, l4, h, 8))
			return WEIR_DROP_INVALID_PACKET;
		if (p->protocol == IPPROTO_SCTP_) {
			/* SCTP's common header is 12 bytes. */
			__u8 full[12];
			if (load(skb, l4, full, 12))
				return WEIR_DROP_INVALID_PACKET;
		}
		__builtin_memcpy(&p->sport_be, &h[0], 2);
		__builtin_memcpy(&p->dport_be, &h[2], 2);
		p->policy_port = ((__u16)h[2] << 8) | h[3];
		break;
	}
	case IPPROTO_ICMP_:
	case IPPROTO_ICMPV6_: {
		__u8 h[8];
		if (load(skb, l4, h, 8))
			return WEIR_DROP_INVALID_PACKET;
		__u8 ty = h[0];
		__u16 id;
		__builtin_memcpy(&id, &h[4], 2);
		p->policy_port = ty;
		int v6 = p->protocol == IPPROTO_ICMPV6_;
		__u8 request = v6 ? 128 : 8;
		__u8 reply = v6 ? 129 : 0;
		if (ty == request)
			p->sport_be = id;
		else if (ty == reply)
			p->dport_be = id;
		else
			/* Other ICMP types are judged by policy on their type, packet by packet. */
			p->trackable = 0;
		/* Neighbour discovery is link plumbing, always allowed; fragmented ND is not
		 * genuine (RFC 6980) and goes through policy. */
		if (v6 && ty >= 133 && ty <= 137 && p->frag == 0)
			p->bypass = 1;
		break;
	}
	default:
		break;
	}
	return PARSED_IP;
}

static __always_inline __u32 lookup_identity(__u8 fam, const __u8 *addr)
{
	struct weir_ipcache_value *v;
	/* A host entry is the longest possible match: no need for the trie. */
	if (fam == WEIR_FAMILY_V4) {
		__u32 a;
		__builtin_memcpy(&a, addr, 4);
		v = bpf_map_lookup_elem(&WEIR_HOSTS4, &a);
		if (v)
			return v->identity;
	}
	struct weir_ipcache_lpm_key k;
	__builtin_memset(&k, 0, sizeof(k));
	k.data.family = fam;
	__builtin_memcpy(k.data.addr, addr, 16);
	if (fam != WEIR_FAMILY_V4) {
		v = bpf_map_lookup_elem(&WEIR_IPCACHE_HOSTS, &k.data);
		if (v)
			return v->identity;
	}
	k.prefixlen = WEIR_IPCACHE_FIXED_PREFIX_BITS + (fam == WEIR_FAMILY_V4 ? 32 : 128);
	v = bpf_map_lookup_elem(&WEIR_IPCACHE, &k);
	return v ? v->identity : WEIR_IDENTITY_WORLD;
}

static __always_inline __u32 remote_identity(struct __sk_buff *skb, const struct packet *p,
					     __u8 dir, __u32 mark)
{
	__u32 remote;
	if (dir == WEIR_DIR_EGRESS)
		remote = lookup_identity(p->family, p->daddr);
	else if ((mark & WEIR_MARK_MAGIC_MASK) == WEIR_MARK_MAGIC_FROM_EGRESS_PROXY)
		/* The egress proxy forwarding for a client: judge the client, not the node. */
		remote = WEIR_EGRESS_PROXY_IDENTITY(mark);
	else
		remote = lookup_identity(p->family, p->saddr);
	skb->cb[1] = remote;
	return remote;
}

/*
 * The longest entry of `identity` covering the packet: an exact (24-bit) entry from the hash,
 * else the longest partial prefix from the trie, else the L3-only entry from the hash. `kinds`
 * (ID_EXACT, ID_PARTIAL, ID_L3_ONLY bits) says which of the three the endpoint has at all for
 * this class of identity; the others are skipped. Returns the map value (NULL: none), not a
 * copy: the entry that decides also counts the packet.
 */
static __always_inline struct weir_policy_value *lookup_entry(__u32 endpoint_id, __u32 identity,
							       __u8 dir, __u8 protocol, __u16 port,
							       __u32 kinds, int *from_trie)
{
	struct weir_policy_lpm_key k = {
		.prefixlen = WEIR_POLICY_FIXED_PREFIX_BITS + 24,
		.data = {
			.endpoint_id = endpoint_id,
			.identity = identity,
			.direction = dir,
			.protocol = protocol,
			.dport_be = bpf_htons(port),
		},
	};
	struct weir_policy_value *v = NULL;
	if (kinds & WEIR_EP_ID_EXACT)
		v = bpf_map_lookup_elem(&WEIR_POLICY_EXACT, &k.data);
	if (!v && (kinds & WEIR_EP_ID_PARTIAL)) {
		v = bpf_map_lookup_elem(&WEIR_POLICY, &k);
		*from_trie = v != NULL;
	}
	if (!v && (kinds & WEIR_EP_ID_L3_ONLY)) {
		k.data.direction = dir | WEIR_POLICY_L3_ONLY;
		k.data.protocol = 0;
		k.data.dport_be = 0;
		v = bpf_map_lookup_elem(&WEIR_POLICY_EXACT, &k.data);
	}
	return v;
}

/* The identity-specific kinds of entries, ANY's shifted down onto them (lookup_entry's `kinds`). */
#define EP_KINDS 7u
#define EP_ANY_SHIFT 3

/*
 * The two-lookup rule: identity-specific and ANY, deny first, then redirect (higher priority),
 * then the longer protocol/port prefix, ties to the identity-specific entry. `ep_flags` (the
 * endpoint's endpoint_flag bits) skips lookups of kinds the endpoint has none of. The entry
 * that decides counts the packet (`len` bytes). Returns 0 and the proxy port (0 = plain allow)
 * in `proxy_port`, or a drop reason.
 */
static __always_inline int decide(__u32 endpoint_id, __u32 ep_flags, __u32 remote, __u8 dir,
				  __u8 protocol, __u16 port, __u64 len, __u16 *proxy_port)
{
	struct weir_policy_value *a = NULL, *b = NULL, *chosen;
	int a_trie = 0, b_trie = 0;
	__u32 f = ep_flags >> (dir ? WEIR_EP_DIRECTION_SHIFT : 0);
	__u32 id_kinds = f & EP_KINDS;
	__u32 any_kinds = (f >> EP_ANY_SHIFT) & EP_KINDS;
	if (id_kinds)
		a = lookup_entry(endpoint_id, remote, dir, protocol, port, id_kinds, &a_trie);
	if (any_kinds)
		b = lookup_entry(endpoint_id, 0, dir, protocol, port, any_kinds, &b_trie);
	/* Tested one by one: clang would otherwise test `a | b`, pointer arithmetic the verifier
	 * rejects. */
	if (!a) {
		if (!b)
			return WEIR_DROP_POLICY_DENIED;
		chosen = b;
	} else if (!b) {
		chosen = a;
	} else if (a->action == WEIR_ACTION_DENY) {
		chosen = a;
	} else if (b->action == WEIR_ACTION_DENY) {
		chosen = b;
	} else {
		int ar = a->action == WEIR_ACTION_REDIRECT;
		int br = b->action == WEIR_ACTION_REDIRECT;
		if (ar && !br)
			chosen = a;
		else if (br && !ar)
			chosen = b;
		else if (ar && br && a->priority != b->priority)
			chosen = a->priority > b->priority ? a : b;
		else if (b->prefix_len > a->prefix_len)
			chosen = b;
		else
			chosen = a;
	}
	/* One atomic add pair, on the policy path only (new connections and denies). Values of
	 * the LPM trie sit 4 bytes off 8-byte alignment (after the 12-byte key in the trie's
	 * node), where an atomic can straddle a cache line (a bus lock): those entries count with
	 * plain adds, exact under one CPU, approximate when several CPUs decide by the same entry
	 * at once. Compiled out only in the benchmark's same-run baseline object. */
#ifndef WEIR_NO_ENTRY_COUNTERS
	if (chosen == a ? a_trie : b_trie) {
		chosen->packets += 1;
		chosen->bytes += len;
	} else {
		__sync_fetch_and_add(&chosen->packets, 1);
		__sync_fetch_and_add(&chosen->bytes, len);
	}
#endif
	__u8 act = chosen->action;
	if (act == WEIR_ACTION_ALLOW) {
		*proxy_port = 0;
		return 0;
	}
	if (act == WEIR_ACTION_REDIRECT) {
		*proxy_port = bpf_ntohs(chosen->proxy_port_be);
		return 0;
	}
	return WEIR_DROP_POLICY_DENY;
}

/* Writes an event straight into the ring buffer; `p` is NULL for unparsed packets. */
static __always_inline void emit(const struct weir_endpoint_info *ep, __u32 ifindex, __u8 dir,
				 const struct packet *p, __u32 remote, __u8 kind, __u8 reason,
				 __u16 proxy_port)
{
	/* A full ring fails every reservation, and a failed reservation still takes the ring's
	 * lock: check the free space first, locklessly. */
	__u64 used = bpf_ringbuf_query(&WEIR_EVENTS, BPF_RB_AVAIL_DATA);
	if (used + EVENT_RECORD_BYTES > WEIR_CAP_EVENTS_BYTES) {
		count(WEIR_COUNTER_EVENTS_LOST);
		return;
	}
	struct weir_event *e = bpf_ringbuf_reserve(&WEIR_EVENTS, sizeof(*e), 0);
	if (!e) {
		count(WEIR_COUNTER_EVENTS_LOST);
		return;
	}
	e->timestamp_ns = bpf_ktime_get_ns();
	e->kind = kind;
	e->verdict = kind == WEIR_EVENT_DROP	     ? WEIR_VERDICT_DROPPED
		     : kind == WEIR_EVENT_REDIRECT_NEW ? WEIR_VERDICT_REDIRECTED
						       : WEIR_VERDICT_FORWARDED;
	e->drop_reason = reason;
	e->direction = dir;
	e->pad = 0;
	e->endpoint_id = ep->endpoint_id;
	e->ifindex = ifindex;
	e->proxy_port = proxy_port;
	e->pad2[0] = 0;
	e->pad2[1] = 0;
	if (p) {
		e->family = p->family;
		e->protocol = p->protocol;
		e->tcp_flags = p->tcp_flags;
		e->sport = bpf_ntohs(p->sport_be);
		e->dport = p->policy_port;
		__builtin_memcpy(e->saddr, p->saddr, 16);
		__builtin_memcpy(e->daddr, p->daddr, 16);
		if (dir == WEIR_DIR_EGRESS) {
			e->src_identity = ep->identity;
			e->dst_identity = remote;
		} else {
			e->src_identity = remote;
			e->dst_identity = ep->identity;
		}
	} else {
		e->family = 0;
		e->protocol = 0;
		e->tcp_flags = 0;
		e->sport = 0;
		e->dport = 0;
		e->src_identity = 0;
		e->dst_identity = 0;
		__builtin_memset(e->saddr, 0, 16);
		__builtin_memset(e->daddr, 0, 16);
	}
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int pass(struct __sk_buff *skb, __u16 proxy_port, __u32 state)
{
	__u32 v;
	if (proxy_port) {
		skb->mark = WEIR_MARK_MAGIC_TO_PROXY | ((__u32)proxy_port << 16);
		count(WEIR_COUNTER_REDIRECTED);
		v = WEIR_VERDICT_REDIRECTED;
	} else {
		count(WEIR_COUNTER_FORWARDED);
		v = WEIR_VERDICT_FORWARDED;
	}
	skb->cb[0] = (v << 8) | (state << 16);
	return TC_ACT_OK;
}

static __always_inline int drop_packet(struct __sk_buff *skb, const struct weir_endpoint_info *ep,
				       __u32 ifindex, __u8 dir, const struct packet *p,
				       __u32 remote, __u8 reason)
{
	count(reason);
	skb->cb[0] = (__u32)reason | ((__u32)WEIR_VERDICT_DROPPED << 8);
	emit(ep, ifindex, dir, p, remote, WEIR_EVENT_DROP, reason, 0);
	return TC_ACT_SHOT;
}

static __always_inline void ct_update(struct weir_ct_entry *e, int reply, __u8 protocol,
				      __u8 tcp_flags, __u64 len, __u64 now)
{
	__u64 lifetime;
	e->packets += 1;
	e->bytes += len;
	if (reply)
		e->flags |= WEIR_CT_SEEN_REPLY;
	if (protocol == IPPROTO_TCP_) {
		if (tcp_flags & TCP_RST)
			e->flags |= WEIR_CT_RESET;
		if (tcp_flags & TCP_FIN)
			e->flags |= reply ? WEIR_CT_RX_CLOSING : WEIR_CT_TX_CLOSING;
		int closing = e->flags & (WEIR_CT_RESET | WEIR_CT_TX_CLOSING | WEIR_CT_RX_CLOSING);
		if (closing)
			lifetime = WEIR_CT_LIFETIME_TCP_CLOSING;
		else if (!(e->flags & WEIR_CT_SEEN_REPLY))
			lifetime = WEIR_CT_LIFETIME_TCP_SYN;
		else
			lifetime = WEIR_CT_LIFETIME_TCP_ESTABLISHED;
	} else {
		lifetime = WEIR_CT_LIFETIME_OTHER;
	}
	e->expires_ns = now + lifetime * NS_PER_SEC;
}

/* The conntrack key of `p` as seen by the hook (`reverse` = the key the opposite hook created
 * for the other direction of the flow). */
static __always_inline void set_ct_key(struct weir_ct_key *k, const struct packet *p, __u8 dir,
				       int reverse)
{
	if (reverse) {
		__builtin_memcpy(k->saddr, p->daddr, 16);
		__builtin_memcpy(k->daddr, p->saddr, 16);
		k->sport_be = p->dport_be;
		k->dport_be = p->sport_be;
		k->direction = dir ^ 1;
	} else {
		__builtin_memcpy(k->saddr, p->saddr, 16);
		__builtin_memcpy(k->daddr, p->daddr, 16);
		k->sport_be = p->sport_be;
		k->dport_be = p->dport_be;
		k->direction = dir;
	}
	k->protocol = p->protocol;
	k->family = p->family;
	k->pad = 0;
}

/* The compact IPv4 key of `p`, as set_ct_key. */
static __always_inline void set_ct_key4(struct weir_ct_key4 *k, const struct packet *p, __u8 dir,
					int reverse)
{
	if (reverse) {
		__builtin_memcpy(k->saddr, p->daddr, 4);
		__builtin_memcpy(k->daddr, p->saddr, 4);
		k->sport_be = p->dport_be;
		k->dport_be = p->sport_be;
		k->direction = dir ^ 1;
	} else {
		__builtin_memcpy(k->saddr, p->saddr, 4);
		__builtin_memcpy(k->daddr, p->daddr, 4);
		k->sport_be = p->sport_be;
		k->dport_be = p->dport_be;
		k->direction = dir;
	}
	k->protocol = p->protocol;
	k->pad[0] = 0;
	k->pad[1] = 0;
}

/* The conntrack entry of `p` (`reverse`: see set_ct_key), from its family's map. */
static __always_inline struct weir_ct_entry *ct_lookup(const struct packet *p, __u8 dir,
						       int reverse)
{
	if (p->family == WEIR_FAMILY_V4) {
		struct weir_ct_key4 k;
		set_ct_key4(&k, p, dir, reverse);
		return bpf_map_lookup_elem(&WEIR_CT4, &k);
	}
	struct weir_ct_key k;
	set_ct_key(&k, p, dir, reverse);
	return bpf_map_lookup_elem(&WEIR_CT, &k);
}

/* Records a new connection; a full LRU map evicts, and an insert error leaves the flow
 * untracked but allowed. */
static __always_inline void ct_create(const struct packet *p, __u8 dir,
				      const struct weir_ct_entry *entry)
{
	if (p->family == WEIR_FAMILY_V4) {
		struct weir_ct_key4 k;
		set_ct_key4(&k, p, dir, 0);
		bpf_map_update_elem(&WEIR_CT4, &k, entry, BPF_ANY);
		return;
	}
	struct weir_ct_key k;
	set_ct_key(&k, p, dir, 0);
	bpf_map_update_elem(&WEIR_CT, &k, entry, BPF_ANY);
}

/* The fragment-tracking key of `p`; built only for fragments (most packets are not). */
static __always_inline void set_frag_key(struct weir_frag_key *fk, const struct packet *p)
{
	__builtin_memcpy(fk->saddr, p->saddr, 16);
	__builtin_memcpy(fk->daddr, p->daddr, 16);
	fk->id = p->frag_id;
	fk->protocol = p->protocol;
	fk->family = p->family;
	fk->pad[0] = 0;
	fk->pad[1] = 0;
}

static __always_inline void remember_fragment(const struct packet *p)
{
	if (p->frag == 1) {
		struct weir_frag_key fk;
		struct weir_frag_value v = {.sport_be = p->sport_be, .dport_be = p->dport_be};
		set_frag_key(&fk, p);
		bpf_map_update_elem(&WEIR_FRAGS, &fk, &v, BPF_ANY);
	}
}

/* Forgets the first fragment of a datagram that was dropped. */
static __always_inline void forget_fragment(const struct packet *p)
{
	if (p->frag == 1) {
		struct weir_frag_key fk;
		set_frag_key(&fk, p);
		bpf_map_delete_elem(&WEIR_FRAGS, &fk);
	}
}

/* steer_to_proxy's answer when the packet must go back into the interface's ingress. */
#define STEER_HAIRPIN 0x100

/*
 * Steers a redirected packet to the local proxy on `proxy_port`, or fails closed (returns a
 * drop reason). TCP leaving a pod: the SYN is assigned to the proxy's listener, later packets
 * are only marked (policy routing and the stack's socket lookup find the connection). UDP
 * leaving a pod: every datagram is assigned. TCP and UDP entering a pod: STEER_HAIRPIN (no
 * socket assignment on tc egress; see hairpin()). Anything else cannot be steered: dropped
 * rather than delivered unchecked.
 */
static __always_inline int steer_to_proxy(struct __sk_buff *skb, const struct packet *p, __u8 dir,
					  __u16 proxy_port)
{
	if (!proxy_port)
		return 0;
	int udp = p->protocol == IPPROTO_UDP_;
	if (!udp && p->protocol != IPPROTO_TCP_)
		return WEIR_DROP_PROXY_LOOKUP_FAILED;
	if (dir != WEIR_DIR_EGRESS)
		return STEER_HAIRPIN;
	if (!udp && (p->tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN)
		return 0;
	struct bpf_sock_tuple t;
	__u32 n;
	__builtin_memset(&t, 0, sizeof(t));
	if (p->family == WEIR_FAMILY_V4) {
		__builtin_memcpy(&t.ipv4.saddr, p->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, p->daddr, 4);
		t.ipv4.sport = p->sport_be;
		t.ipv4.dport = bpf_htons(proxy_port);
		n = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, p->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, p->daddr, 16);
		t.ipv6.sport = p->sport_be;
		t.ipv6.dport = bpf_htons(proxy_port);
		n = sizeof(t.ipv6);
	}
	struct bpf_sock *sk = udp ? bpf_sk_lookup_udp(skb, &t, n, BPF_F_CURRENT_NETNS, 0)
				  : bpf_sk_lookup_tcp(skb, &t, n, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return WEIR_DROP_PROXY_LOOKUP_FAILED;
	long r = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return r ? WEIR_DROP_PROXY_ASSIGN_FAILED : 0;
}

/*
 * Sends a packet entering a pod, redirected by the pod's ingress policy, back into the
 * ingress of the same host-side interface marked for the proxy: weir_from_pod assigns it to
 * the proxy's socket and the node delivers it locally.
 */
static __always_inline int hairpin(struct __sk_buff *skb, const struct weir_endpoint_info *ep,
				   __u32 ifindex, __u16 proxy_port, __u32 state)
{
	/* On tc egress the Ethernet source is this interface's own address; as the destination
	 * too, it makes the stack take the packet as addressed to the node. */
	__u8 mac[6];
	if (bpf_skb_load_bytes(skb, 6, mac, 6) || bpf_skb_store_bytes(skb, 0, mac, 6, 0))
		return drop_packet(skb, ep, ifindex, WEIR_DIR_INGRESS, NULL, 0,
				   WEIR_DROP_PROXY_ASSIGN_FAILED);
	pass(skb, proxy_port, state);
	return bpf_redirect(ifindex, BPF_F_INGRESS);
}

/* A packet leaving an endpoint carries one of its addresses, or a source IPv6 neighbour
 * discovery uses (link-local, unspecified); an address family the endpoint has no address
 * in is not checked. */
static __always_inline int source_is_endpoints(const struct weir_endpoint_info *ep,
					       const struct packet *pkt)
{
	if (pkt->family == WEIR_FAMILY_V4) {
		__u32 want, got;
		__builtin_memcpy(&want, ep->ipv4, 4);
		__builtin_memcpy(&got, pkt->saddr, 4);
		return want == 0 || want == got;
	}
	__u64 w0, w1, g0, g1;
	__builtin_memcpy(&w0, ep->ipv6, 8);
	__builtin_memcpy(&w1, ep->ipv6 + 8, 8);
	__builtin_memcpy(&g0, pkt->saddr, 8);
	__builtin_memcpy(&g1, pkt->saddr + 8, 8);
	if ((w0 | w1) == 0 || (w0 == g0 && w1 == g1) || (g0 | g1) == 0)
		return 1;
	/* fe80::/10 */
	return pkt->saddr[0] == 0xfe && (pkt->saddr[1] & 0xc0) == 0x80;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	struct weir_endpoint_info *epp = bpf_map_lookup_elem(&WEIR_ENDPOINTS, &ifindex);
	if (!epp)
		return TC_ACT_OK;
	struct weir_endpoint_info ep = *epp;
	struct packet pkt;

	int parsed = parse(skb, &pkt);
	if (parsed == PARSED_NOT_IP)
		return TC_ACT_OK;
	if (parsed != PARSED_IP)
		return drop_packet(skb, &ep, ifindex, dir, NULL, 0, (__u8)parsed);

	__u32 mark = skb->mark;
	if (dir == WEIR_DIR_EGRESS && (mark & WEIR_MARK_MAGIC_MASK) == WEIR_MARK_MAGIC_TO_PROXY) {
		/* Hairpinned by weir_to_pod: the destination's policy redirected it; hand it to
		 * the proxy without judging it as if it left this pod. */
		int r = steer_to_proxy(skb, &pkt, WEIR_DIR_EGRESS, (__u16)(mark >> 16));
		if (r)
			return drop_packet(skb, &ep, ifindex, WEIR_DIR_INGRESS, NULL, 0, (__u8)r);
		return TC_ACT_OK;
	}
	/* The ingress proxy's own connection to the endpoint it just checked the request for. */
	int from_ingress_proxy = dir == WEIR_DIR_INGRESS &&
				 (mark & WEIR_MARK_MAGIC_MASK) == WEIR_MARK_MAGIC_FROM_INGRESS_PROXY;

	if (pkt.bypass)
		return pass(skb, 0, CT_UNTRACKED_PASS);

	if (dir == WEIR_DIR_EGRESS && !source_is_endpoints(&ep, &pkt)) {
		__u32 remote = remote_identity(skb, &pkt, dir, mark);
		return drop_packet(skb, &ep, ifindex, dir, &pkt, remote,
				   WEIR_DROP_INVALID_SOURCE_IP);
	}

	if (pkt.frag == 2) {
		/* A later fragment passes only if its first fragment passed. */
		struct weir_frag_key fk;
		set_frag_key(&fk, &pkt);
		if (bpf_map_lookup_elem(&WEIR_FRAGS, &fk))
			return pass(skb, 0, CT_FRAGMENT);
		__u32 remote = remote_identity(skb, &pkt, dir, mark);
		return drop_packet(skb, &ep, ifindex, dir, &pkt, remote,
				   WEIR_DROP_FRAG_NOT_FOUND);
	}

	/* Conntrack lifetimes are seconds: the coarse clock is precise enough. */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u64 len = skb->len;
	int syn_only = pkt.protocol == IPPROTO_TCP_ &&
		       (pkt.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	if (pkt.trackable) {
		struct weir_ct_entry *e = ct_lookup(&pkt, dir, 0);
		if (e) {
			int closing = e->flags &
				      (WEIR_CT_RESET | WEIR_CT_TX_CLOSING | WEIR_CT_RX_CLOSING);
			if (e->expires_ns > now && !(syn_only && closing)) {
				ct_update(e, 0, pkt.protocol, pkt.tcp_flags, len, now);
				__u16 proxy = e->proxy_port;
				remember_fragment(&pkt);
				int reason = steer_to_proxy(skb, &pkt, dir, proxy);
				if (reason == STEER_HAIRPIN)
					return hairpin(skb, &ep, ifindex, proxy, CT_ESTABLISHED);
				if (reason)
					return drop_packet(skb, &ep, ifindex, dir, NULL, 0, reason);
				return pass(skb, proxy, CT_ESTABLISHED);
			}
		}
		/* A pure SYN opens a connection: it is never a reply, so skip that lookup. */
		if (!syn_only) {
			e = ct_lookup(&pkt, dir, 1);
			if (e && e->expires_ns > now) {
				ct_update(e, 1, pkt.protocol, pkt.tcp_flags, len, now);
				remember_fragment(&pkt);
				return pass(skb, 0, CT_REPLY);
			}
		}
	}

	/* New connection: only now is the remote identity needed. */
	__u32 remote = remote_identity(skb, &pkt, dir, mark);
	__u16 proxy_port = 0;
	int reason = from_ingress_proxy ? 0
					: decide(ep.endpoint_id, ep.flags, remote, dir,
						 pkt.protocol, pkt.policy_port, len, &proxy_port);
	if (reason) {
		forget_fragment(&pkt);
		return drop_packet(skb, &ep, ifindex, dir, &pkt, remote, reason);
	}
	/* Steer first: a connection the proxy cannot take is dropped and leaves neither a
	 * conntrack entry nor a fragment record behind for its later packets to ride on. */
	int steer = steer_to_proxy(skb, &pkt, dir, proxy_port);
	reason = steer == STEER_HAIRPIN ? 0 : steer;
	if (reason) {
		forget_fragment(&pkt);
		return drop_packet(skb, &ep, ifindex, dir, &pkt, remote, reason);
	}
	if (pkt.trackable) {
		struct weir_ct_entry entry;
		__builtin_memset(&entry, 0, sizeof(entry));
		entry.proxy_port = proxy_port;
		ct_update(&entry, 0, pkt.protocol, pkt.tcp_flags, len, now);
		ct_create(&pkt, dir, &entry);
	}
	remember_fragment(&pkt);
	emit(&ep, ifindex, dir, &pkt, remote,
	     proxy_port ? WEIR_EVENT_REDIRECT_NEW : WEIR_EVENT_ALLOW_NEW, 0, proxy_port);
	if (steer == STEER_HAIRPIN)
		return hairpin(skb, &ep, ifindex, proxy_port, CT_NEW);
	return pass(skb, proxy_port, CT_NEW);
}

/* tc ingress of the host-side veth: packets leaving the pod (egress policy). */
SEC("tc")
int weir_from_pod(struct __sk_buff *skb)
{
	return handle(skb, WEIR_DIR_EGRESS);
}

/* tc egress of the host-side veth: packets entering the pod (ingress policy). */
SEC("tc")
int weir_to_pod(struct __sk_buff *skb)
{
	return handle(skb, WEIR_DIR_INGRESS);
}

/* Does nothing: the baseline of verdict-cost benchmarks (test-run harness overhead). */
SEC("tc")
int weir_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
