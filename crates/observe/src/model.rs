//! Names and numbers of the Hubble flow model that are not in the schema itself: Cilium's
//! monitor event types, drop reason descriptions, and small accessors over [`Flow`].

use crate::proto::flow::{
    DropReason, Flow, FlowType, IpVersion, L7FlowType, Verdict, layer4, layer7,
};

/// Cilium monitor message type of a drop notification (`MessageTypeDrop`).
pub const EVENT_DROP: i32 = 1;
/// Cilium monitor message type of a trace notification (`MessageTypeTrace`).
pub const EVENT_TRACE: i32 = 4;
/// Cilium monitor message type of a policy verdict (`MessageTypePolicyVerdict`).
pub const EVENT_POLICY_VERDICT: i32 = 5;
/// Cilium monitor message type of a proxy access log record (`MessageTypeAccessLog`).
pub const EVENT_L7: i32 = 129;

/// Hubble's `policy_match_type` values (Cilium's `PolicyMatchType`).
pub mod match_type {
    /// No entry matched (default deny).
    pub const NONE: u32 = 0;
    /// Identity only, any protocol and port.
    pub const L3_ONLY: u32 = 1;
    /// Identity, protocol and port.
    pub const L3_L4: u32 = 2;
    /// Any identity, protocol and port.
    pub const L4_ONLY: u32 = 3;
    /// Any identity, any port.
    pub const ALL: u32 = 4;
    /// Identity and protocol, any port.
    pub const L3_PROTO: u32 = 5;
    /// Any identity, protocol only.
    pub const PROTO_ONLY: u32 = 6;
}

/// The human description Hubble prints for a drop reason (`Policy denied`, ...).
pub fn drop_reason_description(reason: u32) -> &'static str {
    match reason {
        132 => "Invalid source ip",
        133 => "Policy denied",
        134 => "Invalid packet",
        135 => "CT: Truncated or invalid header",
        137 => "CT: Unknown L4 protocol",
        139 => "Unsupported L3 protocol",
        142 => "Unknown L4 protocol",
        151 => "Stale or unroutable IP",
        155 => "CT: Map insertion failed",
        157 => "Fragmentation needed",
        165 => "No configuration available to perform policy decision",
        171 => "Invalid identity",
        178 => "Socket lookup failed",
        179 => "Socket assign failed",
        180 => "Proxy redirection not supported for protocol",
        181 => "Policy denied by denylist",
        189 => "Authentication required",
        _ => "Unknown drop reason",
    }
}

/// The enum name of a drop reason (`POLICY_DENIED`), or its number for reasons outside the
/// schema subset.
pub fn drop_reason_name(reason: i32) -> String {
    match DropReason::try_from(reason) {
        Ok(r) => r.as_str_name().to_string(),
        Err(_) => reason.to_string(),
    }
}

/// The enum name of a verdict (`FORWARDED`, ...).
pub fn verdict_name(verdict: i32) -> &'static str {
    Verdict::try_from(verdict).map_or("VERDICT_UNKNOWN", |v| v.as_str_name())
}

/// Whether a drop reason is a policy decision (default deny, deny rule, auth required).
pub fn is_policy_drop(reason: u32) -> bool {
    matches!(reason, 133 | 181 | 189)
}

/// The name of an IP protocol as Hubble's metrics label it.
pub fn l4_protocol_name(flow: &Flow) -> &'static str {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(_)) => "TCP",
        Some(layer4::Protocol::Udp(_)) => "UDP",
        Some(layer4::Protocol::IcmPv4(_)) => "ICMPv4",
        Some(layer4::Protocol::IcmPv6(_)) => "ICMPv6",
        Some(layer4::Protocol::Sctp(_)) => "SCTP",
        None => "",
    }
}

/// Source and destination ports of a TCP, UDP or SCTP flow.
pub fn ports(flow: &Flow) -> Option<(u32, u32)> {
    match flow.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
        layer4::Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
        layer4::Protocol::Sctp(s) => Some((s.source_port, s.destination_port)),
        _ => None,
    }
}

/// The flow's type (L3_L4, L7, ...).
pub fn flow_type(flow: &Flow) -> FlowType {
    FlowType::try_from(flow.r#type).unwrap_or(FlowType::UnknownType)
}

/// The flow's IP version.
pub fn ip_version(flow: &Flow) -> IpVersion {
    flow.ip
        .as_ref()
        .and_then(|ip| IpVersion::try_from(ip.ip_version).ok())
        .unwrap_or(IpVersion::IpNotUsed)
}

/// The L7 flow type (request, response) of an L7 flow.
pub fn l7_type(flow: &Flow) -> L7FlowType {
    flow.l7
        .as_ref()
        .and_then(|l| L7FlowType::try_from(l.r#type).ok())
        .unwrap_or(L7FlowType::UnknownL7Type)
}

/// The HTTP record of an L7 flow.
pub fn http(flow: &Flow) -> Option<&crate::proto::flow::Http> {
    match flow.l7.as_ref()?.record.as_ref()? {
        layer7::Record::Http(h) => Some(h),
        layer7::Record::Dns(_) => None,
    }
}

/// The DNS record of an L7 flow.
pub fn dns(flow: &Flow) -> Option<&crate::proto::flow::Dns> {
    match flow.l7.as_ref()?.record.as_ref()? {
        layer7::Record::Dns(d) => Some(d),
        layer7::Record::Http(_) => None,
    }
}

/// The DNS response code's name, as Hubble's `rcode` metric label spells it.
pub fn dns_rcode_name(rcode: u32) -> &'static str {
    match rcode {
        0 => "No Error",
        1 => "Format Error",
        2 => "Server Failure",
        3 => "Non-Existent Domain",
        4 => "Not Implemented",
        5 => "Query Refused",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_have_hubble_names_and_descriptions() {
        assert_eq!(drop_reason_name(133), "POLICY_DENIED");
        assert_eq!(drop_reason_name(181), "POLICY_DENY");
        assert_eq!(drop_reason_name(250), "250");
        assert_eq!(drop_reason_description(133), "Policy denied");
        assert_eq!(drop_reason_description(181), "Policy denied by denylist");
        assert_eq!(verdict_name(2), "DROPPED");
        assert_eq!(verdict_name(99), "VERDICT_UNKNOWN");
    }

    #[test]
    fn accessors_on_an_empty_flow_answer_nothing() {
        let f = Flow::default();
        assert_eq!(ports(&f), None);
        assert_eq!(l4_protocol_name(&f), "");
        assert!(http(&f).is_none() && dns(&f).is_none());
        assert_eq!(ip_version(&f), IpVersion::IpNotUsed);
    }
}
