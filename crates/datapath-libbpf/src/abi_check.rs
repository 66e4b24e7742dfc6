//! The C header (`bpf/weir_abi.h`) and the Rust ABI crate must agree on every struct's size,
//! alignment and field offsets, and on every constant. `build.rs` compiles
//! `bpf/abi_layout.c`, which exports the C side as a table of named values; this test builds
//! the same table from the Rust side and compares them both ways, so a field added, moved or
//! resized on one side only fails here.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_ulong, c_ulonglong};
use std::mem::{align_of, offset_of, size_of};

use weir_datapath_abi as abi;
use weir_datapath_abi::{
    CtEntry, CtKey, CtKey4, EndpointInfo, Event, FragKey, FragValue, IpcacheKey, IpcacheValue,
    PolicyKey, PolicyValue,
};

#[repr(C)]
struct LayoutEntry {
    name: *const c_char,
    value: c_ulonglong,
}

unsafe extern "C" {
    static weir_abi_layout: [LayoutEntry; 0];
    static weir_abi_layout_len: c_ulong;
}

fn c_side() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    // SAFETY: the C file defines both symbols: an array of `weir_abi_layout_len` entries whose
    // names are NUL-terminated string literals.
    unsafe {
        let base = (&raw const weir_abi_layout).cast::<LayoutEntry>();
        for i in 0..weir_abi_layout_len as usize {
            let e = &*base.add(i);
            let name = CStr::from_ptr(e.name).to_string_lossy().into_owned();
            assert!(
                out.insert(name.clone(), e.value).is_none(),
                "duplicate {name}"
            );
        }
    }
    out
}

macro_rules! layout {
    ($t:ident; $($f:ident),*) => {{
        let mut v = vec![
            (format!("{}.size", stringify!($t)), size_of::<$t>() as u64),
            (format!("{}.align", stringify!($t)), align_of::<$t>() as u64),
        ];
        $(v.push((format!("{}.{}", stringify!($t), stringify!($f)), offset_of!($t, $f) as u64));)*
        // Every field must be listed: their sizes must add up to the struct's size (the ABI
        // structs have explicit padding), so a field missing from the list fails here.
        let listed: usize = 0 $(+ field_size(|s: &$t| &s.$f))*;
        assert_eq!(listed, size_of::<$t>(), "{}: fields listed do not cover the struct", stringify!($t));
        v
    }};
}

fn field_size<S, F>(_: impl Fn(&S) -> &F) -> usize {
    size_of::<F>()
}

fn rust_side() -> BTreeMap<String, u64> {
    let structs = [
        layout!(PolicyKey; endpoint_id, identity, direction, protocol, dport_be),
        layout!(PolicyValue; action, priority, proxy_port_be, prefix_len, pad, cookie, pad2, packets, bytes),
        layout!(IpcacheKey; family, pad, addr),
        layout!(IpcacheValue; identity, tunnel_endpoint, encrypt_key, flags, pad),
        layout!(EndpointInfo; endpoint_id, identity, flags, ipv4, ipv6),
        layout!(CtKey; saddr, daddr, sport_be, dport_be, protocol, family, direction, pad),
        layout!(CtKey4; saddr, daddr, sport_be, dport_be, protocol, direction, pad),
        layout!(CtEntry; expires_ns, packets, bytes, flags, proxy_port, pad),
        layout!(FragKey; saddr, daddr, id, protocol, family, pad),
        layout!(FragValue; sport_be, dport_be),
        layout!(Event; timestamp_ns, kind, verdict, drop_reason, direction, family, protocol, tcp_flags, pad, sport, dport, src_identity, dst_identity, endpoint_id, ifindex, proxy_port, pad2, saddr, daddr),
    ];
    let consts: [(&str, u64); 57] = [
        ("capacity::POLICY", u64::from(abi::capacity::POLICY)),
        (
            "capacity::POLICY_EXACT",
            u64::from(abi::capacity::POLICY_EXACT),
        ),
        ("capacity::IPCACHE", u64::from(abi::capacity::IPCACHE)),
        ("capacity::ENDPOINTS", u64::from(abi::capacity::ENDPOINTS)),
        ("capacity::CONNTRACK", u64::from(abi::capacity::CONNTRACK)),
        ("capacity::FRAGS", u64::from(abi::capacity::FRAGS)),
        (
            "capacity::EVENTS_BYTES",
            u64::from(abi::capacity::EVENTS_BYTES),
        ),
        ("capacity::COUNTERS", u64::from(abi::capacity::COUNTERS)),
        ("counter::FORWARDED", u64::from(abi::counter::FORWARDED)),
        ("counter::EVENTS_LOST", u64::from(abi::counter::EVENTS_LOST)),
        ("counter::REDIRECTED", u64::from(abi::counter::REDIRECTED)),
        ("direction::INGRESS", u64::from(abi::direction::INGRESS)),
        ("direction::EGRESS", u64::from(abi::direction::EGRESS)),
        ("family::V4", abi::family::V4 as u64),
        ("family::V6", abi::family::V6 as u64),
        ("action::ALLOW", u64::from(abi::action::ALLOW)),
        ("action::DENY", u64::from(abi::action::DENY)),
        ("action::REDIRECT", u64::from(abi::action::REDIRECT)),
        (
            "drop_reason::INVALID_SOURCE_IP",
            u64::from(abi::drop_reason::INVALID_SOURCE_IP),
        ),
        (
            "drop_reason::POLICY_DENIED",
            u64::from(abi::drop_reason::POLICY_DENIED),
        ),
        (
            "drop_reason::INVALID_PACKET",
            u64::from(abi::drop_reason::INVALID_PACKET),
        ),
        (
            "drop_reason::UNSUPPORTED_L3",
            abi::drop_reason::UNSUPPORTED_L3 as u64,
        ),
        (
            "drop_reason::INVALID_EXTHDR",
            u64::from(abi::drop_reason::INVALID_EXTHDR),
        ),
        (
            "drop_reason::FRAG_NOT_FOUND",
            u64::from(abi::drop_reason::FRAG_NOT_FOUND),
        ),
        (
            "drop_reason::PROXY_LOOKUP_FAILED",
            u64::from(abi::drop_reason::PROXY_LOOKUP_FAILED),
        ),
        (
            "drop_reason::PROXY_ASSIGN_FAILED",
            u64::from(abi::drop_reason::PROXY_ASSIGN_FAILED),
        ),
        (
            "drop_reason::POLICY_DENY",
            u64::from(abi::drop_reason::POLICY_DENY),
        ),
        ("event_kind::DROP", u64::from(abi::event_kind::DROP)),
        (
            "event_kind::ALLOW_NEW",
            u64::from(abi::event_kind::ALLOW_NEW),
        ),
        (
            "event_kind::REDIRECT_NEW",
            u64::from(abi::event_kind::REDIRECT_NEW),
        ),
        ("verdict::FORWARDED", u64::from(abi::verdict::FORWARDED)),
        ("verdict::DROPPED", u64::from(abi::verdict::DROPPED)),
        ("verdict::REDIRECTED", u64::from(abi::verdict::REDIRECTED)),
        ("ct_flag::SEEN_REPLY", u64::from(abi::ct_flag::SEEN_REPLY)),
        ("ct_flag::TX_CLOSING", u64::from(abi::ct_flag::TX_CLOSING)),
        ("ct_flag::RX_CLOSING", u64::from(abi::ct_flag::RX_CLOSING)),
        ("ct_flag::RESET", u64::from(abi::ct_flag::RESET)),
        (
            "ct_lifetime::TCP_ESTABLISHED",
            abi::ct_lifetime::TCP_ESTABLISHED,
        ),
        ("ct_lifetime::TCP_SYN", abi::ct_lifetime::TCP_SYN),
        ("ct_lifetime::TCP_CLOSING", abi::ct_lifetime::TCP_CLOSING),
        ("ct_lifetime::OTHER", abi::ct_lifetime::OTHER),
        ("IDENTITY_WORLD", u64::from(abi::IDENTITY_WORLD)),
        ("MARK_MAGIC_TO_PROXY", u64::from(abi::MARK_MAGIC_TO_PROXY)),
        ("MARK_MAGIC_MASK", u64::from(abi::MARK_MAGIC_MASK)),
        (
            "MARK_MAGIC_FROM_INGRESS_PROXY",
            u64::from(abi::MARK_MAGIC_FROM_INGRESS_PROXY),
        ),
        (
            "MARK_MAGIC_FROM_EGRESS_PROXY",
            u64::from(abi::MARK_MAGIC_FROM_EGRESS_PROXY),
        ),
        (
            "EGRESS_PROXY_IDENTITY(0x12345678)",
            u64::from(abi::egress_proxy_identity(0x1234_5678)),
        ),
        (
            "endpoint_flag::ID_EXACT",
            u64::from(abi::endpoint_flag::ID_EXACT),
        ),
        (
            "endpoint_flag::ID_PARTIAL",
            u64::from(abi::endpoint_flag::ID_PARTIAL),
        ),
        (
            "endpoint_flag::ID_L3_ONLY",
            u64::from(abi::endpoint_flag::ID_L3_ONLY),
        ),
        (
            "endpoint_flag::ANY_EXACT",
            u64::from(abi::endpoint_flag::ANY_EXACT),
        ),
        (
            "endpoint_flag::ANY_PARTIAL",
            u64::from(abi::endpoint_flag::ANY_PARTIAL),
        ),
        (
            "endpoint_flag::ANY_L3_ONLY",
            u64::from(abi::endpoint_flag::ANY_L3_ONLY),
        ),
        (
            "endpoint_flag::DIRECTION_SHIFT",
            u64::from(abi::endpoint_flag::DIRECTION_SHIFT),
        ),
        ("POLICY_L3_ONLY", abi::POLICY_L3_ONLY as u64),
        (
            "POLICY_FIXED_PREFIX_BITS",
            u64::from(abi::POLICY_FIXED_PREFIX_BITS),
        ),
        (
            "IPCACHE_FIXED_PREFIX_BITS",
            u64::from(abi::IPCACHE_FIXED_PREFIX_BITS),
        ),
    ];
    let mut out: BTreeMap<String, u64> = structs.into_iter().flatten().collect();
    out.extend(consts.into_iter().map(|(k, v)| (k.to_string(), v)));
    out
}

#[test]
fn c_and_rust_abi_agree() {
    let c = c_side();
    let rust = rust_side();
    let mut diffs = Vec::new();
    for (k, v) in &rust {
        match c.get(k) {
            Some(cv) if cv == v => {}
            Some(cv) => diffs.push(format!("{k}: Rust {v}, C {cv}")),
            None => diffs.push(format!("{k}: missing on the C side")),
        }
    }
    for k in c.keys().filter(|k| !rust.contains_key(*k)) {
        diffs.push(format!("{k}: missing on the Rust side"));
    }
    assert!(diffs.is_empty(), "ABI drift:\n{}", diffs.join("\n"));
    assert!(rust.len() > 100, "only {} entries compared", rust.len());
}
