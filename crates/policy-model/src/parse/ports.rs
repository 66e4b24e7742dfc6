//! `toPorts` (ports, L7 rules) and `icmps`, plus the port syntax NetworkPolicy shares.

use weir_l7_match::{
    DnsRule, HeaderMatch, HttpRule, MismatchAction, PatternError, check_dns_name,
    check_dns_pattern, check_regex,
};

use super::{Errors, optional_list};
use crate::model::{
    Direction, IcmpRule, IpFamily, L7Rules, Port, PortProtocol, PortRule, Protocol, Section,
};
use crate::yaml::Field;

/// Cilium's limit on ports in one port rule.
const MAX_PORTS: usize = 40;

/// Whether `s` is an IANA service name (RFC 6335 §5.1): 1-15 characters of `a-z`, `0-9` and
/// `-`, at least one letter, no hyphen at either end or next to another.
pub(super) fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Parses a port as written (`80`, `'80'`, `http`).
pub(super) fn parse_port(field: &Field<'_>, errors: &mut Errors) -> Option<Port> {
    let text = errors.ok(field.scalar_text())?;
    let port = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u16>().ok().map(Port::Number)
    } else if is_port_name(text) {
        Some(Port::Named(text.to_string()))
    } else {
        None
    };
    if port.is_none() {
        errors.push(field.error(format!("{text:?} is not a port number or name")));
    }
    port
}

/// Parses `endPort` (a number; a quoted number is accepted too).
pub(super) fn parse_end_port(field: &Field<'_>, errors: &mut Errors) -> Option<u16> {
    let text = errors.ok(field.scalar_text())?;
    match text.parse::<i64>() {
        Ok(n) if (0..=65535).contains(&n) => u16::try_from(n).ok(),
        _ => {
            errors.push(field.error(format!("{text:?} is not a valid endPort (0-65535)")));
            None
        }
    }
}

/// Checks a port/endPort pair and returns the normalised `end_port`.
pub(super) fn check_range(
    port: &Port,
    end: Option<(u16, Field<'_>)>,
    errors: &mut Errors,
) -> Option<Option<u16>> {
    let Some((end, field)) = end else {
        return Some(None);
    };
    match port {
        // Go reads `endPort: 0` as "not set".
        _ if end == 0 => Some(None),
        Port::Named(_) => {
            errors.push(field.error("endPort cannot be used with a named port"));
            None
        }
        Port::Number(0) => {
            errors.push(field.error("endPort needs a non-zero port"));
            None
        }
        Port::Number(p) if end < *p => {
            errors.push(field.error(format!("endPort {end} is less than port {p}")));
            None
        }
        Port::Number(p) if end == *p => Some(None),
        Port::Number(_) => Some(Some(end)),
    }
}

/// A parsed `ports[]` entry with the fields needed to report L7 errors against it.
struct ParsedPort<'a> {
    value: PortProtocol,
    entry: Field<'a>,
    protocol: Option<Field<'a>>,
}

fn parse_port_protocol<'a>(item: &Field<'a>, errors: &mut Errors) -> Option<ParsedPort<'a>> {
    let mut m = errors.ok(item.map())?;
    let before = errors.len();
    let port = match m.optional("port") {
        Some(f) => parse_port(&f, errors),
        None => Some(Port::Number(0)),
    };
    let end = m
        .optional("endPort")
        .and_then(|f| parse_end_port(&f, errors).map(|e| (e, f)));
    let protocol_field = m.optional("protocol");
    let protocol = match &protocol_field {
        None => Some(Protocol::Any),
        Some(f) => errors.ok(f.str()).and_then(|s| {
            let upper = s.to_ascii_uppercase();
            match upper.as_str() {
                "TCP" => Some(Protocol::Tcp),
                "UDP" => Some(Protocol::Udp),
                "SCTP" => Some(Protocol::Sctp),
                "ANY" => Some(Protocol::Any),
                "ICMP" | "ICMPV6" | "VRRP" | "IGMP" => {
                    errors.push(f.error(format!(
                        "protocol {s:?} is not supported by Weir (use icmps for ICMP)"
                    )));
                    None
                }
                _ => {
                    errors.push(f.error(format!(
                        "{s:?} is not a protocol (expected TCP, UDP, SCTP or ANY)"
                    )));
                    None
                }
            }
        }),
    };
    errors.extend(m.finish());
    let port = port?;
    let end_port = check_range(&port, end, errors)?;
    if errors.len() != before {
        return None;
    }
    Some(ParsedPort {
        value: PortProtocol {
            port,
            end_port,
            protocol: protocol?,
        },
        entry: item.clone(),
        protocol: protocol_field,
    })
}

/// Parses one `toPorts` entry of a section.
pub(super) fn parse_port_rule(
    item: &Field<'_>,
    section: Section,
    errors: &mut Errors,
) -> Option<PortRule> {
    let mut m = errors.ok(item.map())?;
    let before = errors.len();
    errors.extend(m.unsupported(&[
        "serverNames",
        "originatingTLS",
        "terminatingTLS",
        "listener",
    ]));
    let ports_field = m.optional("ports");
    let mut ports = Vec::new();
    if let Some(pf) = &ports_field
        && let Some(items) = errors.ok(pf.list())
    {
        if items.len() > MAX_PORTS {
            errors.push(pf.error(format!(
                "{} ports in one port rule; at most {MAX_PORTS} are allowed",
                items.len()
            )));
        }
        for it in &items {
            if let Some(p) = parse_port_protocol(it, errors) {
                ports.push(p);
            }
        }
    }
    let l7 = m.optional("rules").and_then(|f| {
        if section.is_deny() {
            errors.push(f.error("L7 rules are not allowed in a deny rule"));
            return None;
        }
        parse_l7(&f, section.direction(), errors)
    });
    errors.extend(m.finish());
    if let Some((l7, rules_field)) = &l7 {
        check_l7_ports(l7, rules_field, &ports, errors);
    }
    if errors.len() != before {
        return None;
    }
    let mut ports: Vec<PortProtocol> = ports.into_iter().map(|p| p.value).collect();
    if ports.is_empty() {
        // No `ports`: every port of every protocol in ANY.
        ports.push(PortProtocol {
            port: Port::Number(0),
            end_port: None,
            protocol: Protocol::Any,
        });
    }
    Some(PortRule {
        ports,
        l7: l7.map(|(r, _)| r),
    })
}

fn check_l7_ports(l7: &L7Rules, rules: &Field<'_>, ports: &[ParsedPort<'_>], errors: &mut Errors) {
    if ports.is_empty() {
        errors.push(rules.error("L7 rules need at least one port in `ports`"));
        return;
    }
    for p in ports {
        let at = p.protocol.as_ref().unwrap_or(&p.entry);
        if matches!(l7, L7Rules::Http(_)) && p.value.protocol != Protocol::Tcp {
            let proto = match p.value.protocol {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
                Protocol::Sctp => "SCTP",
                Protocol::Any => "ANY",
            };
            errors.push(at.error(format!(
                "HTTP rules need protocol TCP, not {proto}{}",
                if p.protocol.is_none() {
                    " (an omitted protocol means ANY)"
                } else {
                    ""
                }
            )));
        }
        if p.value.port == Port::Number(0) {
            errors.push(
                p.entry
                    .error("L7 rules need a specific port, not 0 (all ports)"),
            );
        }
        if p.value.end_port.is_some() {
            errors.push(p.entry.error("L7 rules cannot be used on a port range"));
        }
    }
}

/// Parses `rules`; `None` when it holds no L7 rule at all (as Cilium treats `rules: {}`).
fn parse_l7<'a>(
    field: &Field<'a>,
    direction: Direction,
    errors: &mut Errors,
) -> Option<(L7Rules, Field<'a>)> {
    let mut m = errors.ok(field.map())?;
    errors.extend(m.unsupported(&["kafka", "l7proto", "l7"]));
    let http = optional_list(&mut m, "http", errors);
    let dns = optional_list(&mut m, "dns", errors);
    errors.extend(m.finish());
    let http = http.filter(|l| !l.is_empty());
    let dns = dns.filter(|l| !l.is_empty());
    match (http, dns) {
        (Some(_), Some(_)) => {
            errors.push(
                field.error("only one kind of L7 rule (http or dns) is allowed per port rule"),
            );
            None
        }
        (Some(items), None) => {
            let rules = items
                .iter()
                .filter_map(|it| parse_http_rule(it, errors))
                .collect();
            Some((L7Rules::Http(rules), field.clone()))
        }
        (None, Some(items)) => {
            if direction == Direction::Ingress {
                errors.push(field.error("DNS rules are not allowed on ingress"));
                return None;
            }
            let rules = items
                .iter()
                .filter_map(|it| parse_dns_rule(it, errors))
                .collect();
            Some((L7Rules::Dns(rules), field.clone()))
        }
        (None, None) => None,
    }
}

fn regex_field(f: Option<Field<'_>>, errors: &mut Errors) -> Option<String> {
    let f = f?;
    let s = errors.ok(f.str())?;
    if let Err(e) = check_regex(s) {
        let msg = match e {
            // regex-syntax prefixes its messages with "error: ".
            PatternError::Regex(m) => format!("invalid regex: {}", m.trim_start_matches("error: ")),
            other => other.to_string(),
        };
        errors.push(f.error(format!("{s:?}: {msg}")));
        return None;
    }
    Some(s.to_string())
}

fn parse_http_rule(item: &Field<'_>, errors: &mut Errors) -> Option<HttpRule> {
    let mut m = errors.ok(item.map())?;
    let before = errors.len();
    let method = regex_field(m.optional("method"), errors);
    let path = regex_field(m.optional("path"), errors);
    let host = regex_field(m.optional("host"), errors);
    let mut headers = Vec::new();
    for h in optional_list(&mut m, "headers", errors).unwrap_or_default() {
        let Some(s) = errors.ok(h.str()) else {
            continue;
        };
        let (name, value) = match s.split_once(':') {
            Some((n, v)) => (n.trim(), Some(v.strip_prefix(' ').unwrap_or(v).to_string())),
            None => (s.trim(), None),
        };
        if name.is_empty() {
            errors.push(h.error(format!("{s:?} has no header name")));
            continue;
        }
        headers.push(HeaderMatch {
            name: name.to_string(),
            value,
            mismatch: MismatchAction::Fail,
        });
    }
    for hm in optional_list(&mut m, "headerMatches", errors).unwrap_or_default() {
        if let Some(h) = parse_header_match(&hm, errors) {
            headers.push(h);
        }
    }
    errors.extend(m.finish());
    (errors.len() == before).then_some(HttpRule {
        method,
        path,
        host,
        headers,
    })
}

fn parse_header_match(item: &Field<'_>, errors: &mut Errors) -> Option<HeaderMatch> {
    let mut m = errors.ok(item.map())?;
    let before = errors.len();
    errors.extend(m.unsupported(&["secret"]));
    let name = errors
        .ok(m.required("name"))
        .and_then(|f| match errors.ok(f.str()) {
            Some("") => {
                errors.push(f.error("must not be empty"));
                None
            }
            other => other,
        });
    let value = m.optional("value").and_then(|f| errors.ok(f.str()));
    let mismatch = match m.optional("mismatch") {
        None => Some(MismatchAction::Fail),
        Some(f) => errors.ok(f.str()).and_then(|s| match s {
            "" => Some(MismatchAction::Fail),
            "LOG" => Some(MismatchAction::Log),
            "ADD" => Some(MismatchAction::Add),
            "DELETE" => Some(MismatchAction::Delete),
            "REPLACE" => Some(MismatchAction::Replace),
            other => {
                errors.push(f.error(format!(
                    "{other:?} is not a mismatch action (expected LOG, ADD, DELETE or REPLACE)"
                )));
                None
            }
        }),
    };
    errors.extend(m.finish());
    if errors.len() != before {
        return None;
    }
    Some(HeaderMatch {
        name: name?.to_string(),
        value: value.map(str::to_string),
        mismatch: mismatch?,
    })
}

/// Parses a `{matchName | matchPattern}` entry (`rules.dns` and `toFQDNs`).
pub(super) fn parse_dns_rule(item: &Field<'_>, errors: &mut Errors) -> Option<DnsRule> {
    let mut m = errors.ok(item.map())?;
    let name = m.optional("matchName");
    let pattern = m.optional("matchPattern");
    errors.extend(m.finish());
    match (name, pattern) {
        (Some(_), Some(_)) => {
            errors.push(item.error("only one of matchName and matchPattern may be set"));
            None
        }
        (None, None) => {
            errors.push(item.error("one of matchName or matchPattern is required"));
            None
        }
        (Some(f), None) => {
            let s = errors.ok(f.str())?;
            if let Err(e) = check_dns_name(s) {
                errors.push(f.error(format!("{s:?}: {e}")));
                return None;
            }
            Some(DnsRule::MatchName(s.to_string()))
        }
        (None, Some(f)) => {
            let s = errors.ok(f.str())?;
            if let Err(e) = check_dns_pattern(s) {
                errors.push(f.error(format!("{s:?}: {e}")));
                return None;
            }
            Some(DnsRule::MatchPattern(s.to_string()))
        }
    }
}

/// ICMP type names (Cilium accepts these in place of numbers), per family.
const ICMPV4_TYPES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("RouterSolicitation", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

const ICMPV6_TYPES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

/// Parses one `icmps` entry: `{fields: [{type, family}]}`.
pub(super) fn parse_icmp_rule(item: &Field<'_>, errors: &mut Errors) -> Vec<IcmpRule> {
    let Some(mut m) = errors.ok(item.map()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in optional_list(&mut m, "fields", errors).unwrap_or_default() {
        if let Some(r) = parse_icmp_field(&f, errors) {
            out.push(r);
        }
    }
    errors.extend(m.finish());
    out
}

fn parse_icmp_field(item: &Field<'_>, errors: &mut Errors) -> Option<IcmpRule> {
    let mut m = errors.ok(item.map())?;
    let family = match m.optional("family") {
        None => Some(IpFamily::V4),
        Some(f) => match errors.ok(f.str())? {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            other => {
                errors.push(f.error(format!(
                    "{other:?} is not an ICMP family (expected IPv4 or IPv6)"
                )));
                None
            }
        },
    };
    let type_field = errors.ok(m.required("type"));
    errors.extend(m.finish());
    let (family, tf) = (family?, type_field?);
    let text = errors.ok(tf.scalar_text())?;
    let table = match family {
        IpFamily::V4 => ICMPV4_TYPES,
        IpFamily::V6 => ICMPV6_TYPES,
    };
    let icmp_type = text
        .parse::<u8>()
        .ok()
        .or_else(|| table.iter().find(|(n, _)| *n == text).map(|(_, t)| *t));
    match icmp_type {
        Some(icmp_type) => Some(IcmpRule { family, icmp_type }),
        None => {
            let fam = if family == IpFamily::V4 {
                "IPv4"
            } else {
                "IPv6"
            };
            errors.push(tf.error(format!(
                "{text:?} is not an {fam} ICMP type (a number 0-255 or a name such as EchoRequest)"
            )));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        for ok in ["http", "https", "dns-tcp", "a", "h2c", "x1-y2"] {
            assert!(is_port_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-http",
            "http-",
            "ht--tp",
            "HTTP",
            "123",
            "abcdefghijklmnop",
            "a_b",
        ] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }
}
