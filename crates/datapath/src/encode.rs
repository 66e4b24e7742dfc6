//! Translation between compiler/domain types and the kernel ABI (`weir-datapath-abi`).
//! Shared by every kernel backend so that they key maps identically.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weir_datapath_abi as abi;
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, PolicyKey};
use weir_policy_model::Direction;

use crate::{
    CtRecord, DatapathError, DatapathEvent, EndpointAttachment, EndpointId, EventKind,
    InstalledPolicyEntry,
};

/// ABI direction byte.
pub fn direction_to_abi(d: Direction) -> u8 {
    match d {
        Direction::Ingress => abi::direction::INGRESS,
        Direction::Egress => abi::direction::EGRESS,
    }
}

/// Direction from the ABI byte (anything but EGRESS reads as ingress).
pub fn direction_from_abi(d: u8) -> Direction {
    if d == abi::direction::EGRESS {
        Direction::Egress
    } else {
        Direction::Ingress
    }
}

/// The LPM prefix length and key data of a policy entry of `endpoint`.
pub fn policy_key(
    endpoint: EndpointId,
    key: &PolicyKey,
) -> Result<(u32, abi::PolicyKey), DatapathError> {
    if key.prefix_len > 24 {
        return Err(DatapathError::InvalidKey(format!(
            "prefix_len {} > 24",
            key.prefix_len
        )));
    }
    // Zero the bits beyond the prefix, as the trie would ignore them anyway.
    let value = (u32::from(key.protocol) << 16) | u32::from(key.port);
    let mask = if key.prefix_len == 0 {
        0
    } else {
        u32::MAX << (24 - u32::from(key.prefix_len))
    };
    let masked = value & mask & 0x00ff_ffff;
    let data = abi::PolicyKey {
        endpoint_id: endpoint.0,
        identity: key.identity.get(),
        direction: direction_to_abi(key.direction),
        protocol: (masked >> 16) as u8,
        dport_be: ((masked & 0xffff) as u16).to_be(),
    };
    Ok((
        abi::POLICY_FIXED_PREFIX_BITS + u32::from(key.prefix_len),
        data,
    ))
}

/// Where a policy entry lives in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicySlot {
    /// The exact hash (`POLICY_EXACT`), under this key: 24-bit entries as they are, L3-only
    /// entries with [`abi::POLICY_L3_ONLY`] in the direction byte.
    Exact(abi::PolicyKey),
    /// The LPM trie (`POLICY`), under this prefix length and key: partial prefixes.
    Trie(u32, abi::PolicyKey),
}

/// The map and key of a policy entry of `endpoint`.
pub fn policy_slot(endpoint: EndpointId, key: &PolicyKey) -> Result<PolicySlot, DatapathError> {
    let (prefix, mut data) = policy_key(endpoint, key)?;
    Ok(match key.prefix_len {
        24 => PolicySlot::Exact(data),
        0 => {
            data.direction |= abi::POLICY_L3_ONLY;
            PolicySlot::Exact(data)
        }
        _ => PolicySlot::Trie(prefix, data),
    })
}

/// Decodes a key of the exact policy hash back into the endpoint and compiler key.
pub fn policy_exact_key_from_abi(data: &abi::PolicyKey) -> (EndpointId, PolicyKey) {
    let mut d = *data;
    let prefix = if d.direction & abi::POLICY_L3_ONLY != 0 {
        d.direction &= !abi::POLICY_L3_ONLY;
        abi::POLICY_FIXED_PREFIX_BITS
    } else {
        abi::POLICY_FIXED_PREFIX_BITS + 24
    };
    policy_key_from_abi(prefix, &d)
}

/// Decodes a policy trie key back into the endpoint and compiler key.
pub fn policy_key_from_abi(prefix: u32, data: &abi::PolicyKey) -> (EndpointId, PolicyKey) {
    let prefix_len = prefix.saturating_sub(abi::POLICY_FIXED_PREFIX_BITS).min(24) as u8;
    (
        EndpointId(data.endpoint_id),
        PolicyKey {
            identity: Identity(data.identity),
            direction: direction_from_abi(data.direction),
            protocol: data.protocol,
            port: u16::from_be(data.dport_be),
            prefix_len,
        },
    )
}

/// The ABI value of an entry with `prefix_len` specified bits.
pub fn policy_value(action: &EntryAction, prefix_len: u8, cookie: u32) -> abi::PolicyValue {
    let (a, proxy_port, priority) = match *action {
        EntryAction::Allow => (abi::action::ALLOW, 0, 0),
        EntryAction::Deny => (abi::action::DENY, 0, 0),
        EntryAction::Redirect {
            proxy_port,
            priority,
        } => (abi::action::REDIRECT, proxy_port, priority),
    };
    abi::PolicyValue {
        action: a,
        priority,
        proxy_port_be: proxy_port.to_be(),
        prefix_len,
        pad: [0; 3],
        cookie,
        pad2: 0,
        packets: 0,
        bytes: 0,
    }
}

/// Decodes an ABI value (an unknown action reads as deny: never widen access).
pub fn policy_action_from_abi(v: &abi::PolicyValue) -> EntryAction {
    match v.action {
        abi::action::ALLOW => EntryAction::Allow,
        abi::action::REDIRECT => EntryAction::Redirect {
            proxy_port: u16::from_be(v.proxy_port_be),
            priority: v.priority,
        },
        _ => EntryAction::Deny,
    }
}

/// Decodes an ABI value with its counters.
pub fn policy_entry_from_abi(v: &abi::PolicyValue) -> InstalledPolicyEntry {
    InstalledPolicyEntry {
        action: policy_action_from_abi(v),
        packets: v.packets,
        bytes: v.bytes,
    }
}

/// The LPM prefix length and key data of an ipcache prefix.
pub fn ipcache_key(prefix: &IpNet) -> (u32, abi::IpcacheKey) {
    let mut addr = [0u8; 16];
    let family = match prefix {
        IpNet::V4(n) => {
            addr[..4].copy_from_slice(&n.network().octets());
            abi::family::V4
        }
        IpNet::V6(n) => {
            addr = n.network().octets();
            abi::family::V6
        }
    };
    (
        abi::IPCACHE_FIXED_PREFIX_BITS + u32::from(prefix.prefix_len()),
        abi::IpcacheKey {
            family,
            pad: [0; 3],
            addr,
        },
    )
}

/// The key of `prefix` in the IPv4 host map (`IPCACHE_HOSTS4`): the address's bytes as in
/// the packet, when `prefix` is an IPv4 host address (/32); None for anything else.
pub fn ipcache_host4_key(prefix: &IpNet) -> Option<[u8; 4]> {
    match prefix {
        IpNet::V4(n) if n.prefix_len() == 32 => Some(n.addr().octets()),
        _ => None,
    }
}

/// Decodes an ipcache trie key.
pub fn ipcache_key_from_abi(prefix: u32, key: &abi::IpcacheKey) -> Option<IpNet> {
    let bits = prefix.checked_sub(abi::IPCACHE_FIXED_PREFIX_BITS)?;
    let bits = u8::try_from(bits).ok()?;
    let addr = addr_from_abi(key.family, &key.addr)?;
    match addr {
        IpAddr::V4(a) => Ipv4Net::new(a, bits).ok().map(IpNet::V4),
        IpAddr::V6(a) => Ipv6Net::new(a, bits).ok().map(IpNet::V6),
    }
}

/// An address from its ABI family and bytes.
pub fn addr_from_abi(family: u8, addr: &[u8; 16]) -> Option<IpAddr> {
    match family {
        abi::family::V4 => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        abi::family::V6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

/// Decodes an event record.
pub fn event_from_abi(e: &abi::Event) -> DatapathEvent {
    DatapathEvent {
        timestamp_ns: e.timestamp_ns,
        kind: match e.kind {
            abi::event_kind::DROP => EventKind::Drop,
            abi::event_kind::ALLOW_NEW => EventKind::AllowNew,
            abi::event_kind::REDIRECT_NEW => EventKind::RedirectNew,
            k => EventKind::Unknown(k),
        },
        drop_reason: e.drop_reason,
        direction: direction_from_abi(e.direction),
        protocol: e.protocol,
        src: addr_from_abi(e.family, &e.saddr),
        dst: addr_from_abi(e.family, &e.daddr),
        sport: e.sport,
        dport: e.dport,
        tcp_flags: e.tcp_flags,
        src_identity: Identity(e.src_identity),
        dst_identity: Identity(e.dst_identity),
        endpoint_id: EndpointId(e.endpoint_id),
        ifindex: e.ifindex,
        proxy_port: e.proxy_port,
    }
}

/// Decodes a conntrack entry (None for a corrupt family).
pub fn ct_from_abi(k: &abi::CtKey, v: &abi::CtEntry) -> Option<CtRecord> {
    Some(CtRecord {
        src: addr_from_abi(k.family, &k.saddr)?,
        dst: addr_from_abi(k.family, &k.daddr)?,
        sport: u16::from_be(k.sport_be),
        dport: u16::from_be(k.dport_be),
        protocol: k.protocol,
        direction: direction_from_abi(k.direction),
        expires_ns: v.expires_ns,
        packets: v.packets,
        bytes: v.bytes,
        flags: v.flags,
        proxy_port: v.proxy_port,
    })
}

/// Decodes an IPv4 conntrack entry of the compact map.
pub fn ct4_from_abi(k: &abi::CtKey4, v: &abi::CtEntry) -> CtRecord {
    CtRecord {
        src: IpAddr::V4(Ipv4Addr::from(k.saddr)),
        dst: IpAddr::V4(Ipv4Addr::from(k.daddr)),
        sport: u16::from_be(k.sport_be),
        dport: u16::from_be(k.dport_be),
        protocol: k.protocol,
        direction: direction_from_abi(k.direction),
        expires_ns: v.expires_ns,
        packets: v.packets,
        bytes: v.bytes,
        flags: v.flags,
        proxy_port: v.proxy_port,
    }
}

/// The endpoint map value of an attachment (flags left for the loader to fill in).
pub fn endpoint_info(endpoint: &EndpointAttachment) -> abi::EndpointInfo {
    let mut info = abi::EndpointInfo {
        endpoint_id: endpoint.endpoint_id.0,
        identity: endpoint.identity.get(),
        ..Default::default()
    };
    if let Some(v4) = endpoint.addresses.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    }) {
        info.ipv4 = v4.octets();
    }
    if let Some(v6) = endpoint.addresses.iter().find_map(|a| match a {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    }) {
        info.ipv6 = v6.octets();
    }
    info
}

/// Policy map upserts in ABI form.
pub type SlotUpserts = Vec<(PolicySlot, abi::PolicyValue)>;

/// A policy diff in ABI form: upserts and removals, all keys encoded before anything is
/// written, so that a bad key changes nothing.
pub fn policy_diff(
    endpoint: EndpointId,
    diff: &weir_policy_compiler::MapStateDiff,
) -> Result<(SlotUpserts, Vec<PolicySlot>), DatapathError> {
    let mut ups = Vec::with_capacity(diff.upserts.len());
    for (k, e) in &diff.upserts {
        ups.push((
            policy_slot(endpoint, k)?,
            policy_value(&e.action, k.prefix_len, 0),
        ));
    }
    let mut rems = Vec::with_capacity(diff.removals.len());
    for k in &diff.removals {
        rems.push(policy_slot(endpoint, k)?);
    }
    Ok((ups, rems))
}

/// The exact-map keys among `slots` (removed in one batch).
pub fn exact_keys(slots: &[PolicySlot]) -> Vec<abi::PolicyKey> {
    slots
        .iter()
        .filter_map(|slot| match slot {
            PolicySlot::Exact(k) => Some(*k),
            PolicySlot::Trie(..) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_key_round_trips_and_masks() {
        let k = PolicyKey {
            identity: Identity(300),
            direction: Direction::Egress,
            protocol: 6,
            port: 8080,
            prefix_len: 24,
        };
        let (p, d) = policy_key(EndpointId(7), &k).unwrap();
        assert_eq!(p, 96);
        assert_eq!(d.dport_be.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(policy_key_from_abi(p, &d), (EndpointId(7), k));
        let wide = PolicyKey {
            prefix_len: 8,
            port: 0,
            ..k
        };
        let (p, d) = policy_key(EndpointId(7), &wide).unwrap();
        assert_eq!((p, d.protocol, d.dport_be), (80, 6, 0));
        assert!(
            policy_key(
                EndpointId(7),
                &PolicyKey {
                    prefix_len: 25,
                    ..k
                }
            )
            .is_err()
        );
    }

    #[test]
    fn policy_slots_route_by_prefix_and_round_trip() {
        let k = |prefix_len, protocol, port| PolicyKey {
            identity: Identity(300),
            direction: Direction::Egress,
            protocol,
            port,
            prefix_len,
        };
        for key in [k(24, 6, 80), k(0, 0, 0)] {
            let PolicySlot::Exact(d) = policy_slot(EndpointId(3), &key).unwrap() else {
                panic!("{key:?} not exact");
            };
            assert_eq!(policy_exact_key_from_abi(&d), (EndpointId(3), key));
        }
        let l3 = policy_slot(EndpointId(3), &k(0, 0, 0)).unwrap();
        let exact = policy_slot(EndpointId(3), &k(24, 0, 0)).unwrap();
        assert_ne!(
            l3, exact,
            "L3-only and protocol-0/port-0 exact keys must differ"
        );
        assert!(matches!(
            policy_slot(EndpointId(3), &k(8, 6, 0)).unwrap(),
            PolicySlot::Trie(80, _)
        ));
    }

    #[test]
    fn ipcache_key_round_trips() {
        for s in ["10.1.2.0/24", "0.0.0.0/0", "fd00::/64", "fd00::1/128"] {
            let n: IpNet = s.parse().unwrap();
            let (p, k) = ipcache_key(&n);
            assert_eq!(ipcache_key_from_abi(p, &k), Some(n));
        }
    }
}
