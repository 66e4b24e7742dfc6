//! DNS names of addresses, as endpoints learned them from DNS answers (the DNS proxy's FQDN
//! cache): Hubble's `source_names` and `destination_names`.
//!
//! Like Hubble, a name is per endpoint: a flow's destination names are the names its *source*
//! endpoint resolved to the destination address, and its source names the names its
//! *destination* endpoint resolved to the source address. An address nobody on the node
//! resolved has no names, even if some other cache knows it.

use std::collections::HashMap;
use std::net::IpAddr;

use weir_datapath::EndpointId;

/// A read-only view of the names endpoints learned for addresses from DNS answers.
pub trait DnsNames {
    /// The names `endpoint` resolved to `ip`, without the trailing dot, sorted; empty when it
    /// resolved none to it.
    fn names_of(&self, endpoint: EndpointId, ip: IpAddr) -> Vec<String>;
}

/// No endpoint learned any name (no DNS proxy, or an empty cache).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNames;

impl DnsNames for NoNames {
    fn names_of(&self, _endpoint: EndpointId, _ip: IpAddr) -> Vec<String> {
        Vec::new()
    }
}

/// Names by (endpoint, address), built once from a cache's (endpoint, name, address) facts:
/// one hash lookup per question instead of a walk over the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameIndex {
    by_ip: HashMap<(EndpointId, IpAddr), Vec<String>>,
}

impl NameIndex {
    /// Indexes `(endpoint, name, address)` facts. Names are shown without their trailing dot,
    /// as Hubble shows them; duplicates collapse.
    pub fn new<'a>(facts: impl IntoIterator<Item = (EndpointId, &'a str, IpAddr)>) -> Self {
        let mut by_ip: HashMap<(EndpointId, IpAddr), Vec<String>> = HashMap::new();
        for (endpoint, name, ip) in facts {
            let name = name.strip_suffix('.').unwrap_or(name);
            if name.is_empty() {
                continue;
            }
            by_ip
                .entry((endpoint, ip))
                .or_default()
                .push(name.to_string());
        }
        for names in by_ip.values_mut() {
            names.sort();
            names.dedup();
        }
        NameIndex { by_ip }
    }

    /// Whether no name is known.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

impl DnsNames for NameIndex {
    fn names_of(&self, endpoint: EndpointId, ip: IpAddr) -> Vec<String> {
        self.by_ip.get(&(endpoint, ip)).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34));

    #[test]
    fn names_are_per_endpoint_sorted_and_without_the_trailing_dot() {
        let idx = NameIndex::new([
            (EndpointId(7), "www.example.com.", IP),
            (EndpointId(7), "example.com.", IP),
            (EndpointId(7), "example.com", IP),
            (EndpointId(8), "other.test.", IP),
            (EndpointId(7), ".", IP),
        ]);
        assert_eq!(
            idx.names_of(EndpointId(7), IP),
            vec!["example.com", "www.example.com"]
        );
        assert_eq!(idx.names_of(EndpointId(8), IP), vec!["other.test"]);
        assert!(idx.names_of(EndpointId(9), IP).is_empty());
        assert!(
            idx.names_of(EndpointId(7), IpAddr::V4(Ipv4Addr::LOCALHOST))
                .is_empty()
        );
        assert!(NoNames.names_of(EndpointId(7), IP).is_empty());
        assert!(NameIndex::new([]).is_empty());
    }
}
