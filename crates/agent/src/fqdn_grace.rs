//! Connection grace for learned DNS names: an address whose answer expired keeps its access
//! while the datapath's conntrack still holds a live connection from the endpoint to it, as
//! Cilium keeps the IPs of live connections through its conntrack GC. After the last such
//! connection, the name cache keeps the address for its `idle_grace` (Cilium's
//! `--tofqdns-idle-connection-grace-period`, default 0).
//!
//! The conntrack table is read once per collection, and only when some answer has expired.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::SystemTime;

use weir_datapath::{CtRecord, Datapath, DatapathError};
use weir_dns_proxy::ConnectionActivity;
use weir_l7_proxy::EndpointId;
use weir_policy_model::Direction;

use crate::proxies::ResolverSnapshot;

/// The (endpoint, destination) pairs with a live egress connection, read from conntrack.
#[derive(Debug, Clone, Default)]
pub struct ConntrackActivity {
    live: HashSet<(EndpointId, IpAddr)>,
    /// Every connection counts as live (conntrack could not be read).
    all: bool,
    now: Option<SystemTime>,
}

impl ConntrackActivity {
    /// The live connections among `records` at monotonic time `now_ns` (the conntrack
    /// clock), keyed by the local endpoint that opened them (`endpoints` maps its address).
    /// They are reported active at `now`.
    pub fn from_records<'a>(
        records: impl IntoIterator<Item = &'a CtRecord>,
        endpoints: &ResolverSnapshot,
        now_ns: u64,
        now: SystemTime,
    ) -> Self {
        let live = records
            .into_iter()
            .filter(|r| r.direction == Direction::Egress && r.expires_ns > now_ns)
            .filter_map(|r| Some((endpoints.local_endpoint(r.src)?, canonical(r.dst))))
            .collect();
        ConntrackActivity {
            live,
            all: false,
            now: Some(now),
        }
    }

    /// Reports every address live at `now`: for a round where conntrack could not be read,
    /// so that expiry waits for the next round instead of cutting live connections.
    pub fn everything_live(now: SystemTime) -> Self {
        ConntrackActivity {
            live: HashSet::new(),
            all: true,
            now: Some(now),
        }
    }

    /// Reads `datapath`'s conntrack now.
    pub fn from_datapath(
        datapath: &impl Datapath,
        endpoints: &ResolverSnapshot,
    ) -> Result<Self, DatapathError> {
        let records = datapath.list_conntrack()?;
        Ok(ConntrackActivity::from_records(
            &records,
            endpoints,
            monotonic_ns(),
            SystemTime::now(),
        ))
    }

    /// How many (endpoint, address) pairs have a live connection.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

impl ConnectionActivity for ConntrackActivity {
    fn last_active(&self, endpoint: EndpointId, ip: IpAddr) -> Option<SystemTime> {
        if self.all || self.live.contains(&(endpoint, canonical(ip))) {
            self.now
        } else {
            None
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// CLOCK_MONOTONIC, the clock of conntrack expiry (`bpf_ktime_get_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};
    use weir_dns_proxy::{CacheConfig, NameCache};
    use weir_identity::Identity;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn ct(src: &str, dst: &str, direction: Direction, expires_ns: u64) -> CtRecord {
        CtRecord {
            src: ip(src),
            dst: ip(dst),
            sport: 40000,
            dport: 443,
            protocol: 6,
            direction,
            expires_ns,
            packets: 1,
            bytes: 60,
            flags: 0,
            proxy_port: 0,
        }
    }

    /// An expired name keeps the address its endpoint still talks to, and only that one;
    /// once the connection is gone from conntrack, the address goes (grace 0).
    #[test]
    fn live_connection_keeps_expired_address() {
        let pod = EndpointId(3);
        let other = EndpointId(4);
        let endpoints = ResolverSnapshot::new(
            [
                (ip("10.0.1.1"), pod, Identity(1000)),
                (ip("10.0.1.2"), other, Identity(1001)),
            ],
            [],
            [],
        );
        let cache = NameCache::new(CacheConfig::default());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let api = ip("203.0.113.10");
        let old = ip("203.0.113.11");
        cache.insert(pod, "api.stripe.com.", &[(api, 30), (old, 30)], t0);
        cache.insert(other, "api.stripe.com.", &[(api, 30)], t0);
        let later = t0 + Duration::from_secs(60);
        let now_ns = 5_000_000_000;
        let records = [
            ct("10.0.1.1", "203.0.113.10", Direction::Egress, now_ns + 1),
            // Expired conntrack entry, ingress entry, unknown source: not live.
            ct("10.0.1.1", "203.0.113.11", Direction::Egress, now_ns - 1),
            ct("10.0.1.1", "203.0.113.11", Direction::Ingress, now_ns + 1),
            ct("10.9.9.9", "203.0.113.11", Direction::Egress, now_ns + 1),
        ];
        let activity = ConntrackActivity::from_records(&records, &endpoints, now_ns, later);
        assert_eq!(activity.len(), 1);
        let removed = cache.gc(later, &activity);
        let mut gone: Vec<(u16, IpAddr)> = removed.iter().map(|e| (e.endpoint, e.ip)).collect();
        gone.sort();
        assert_eq!(gone, vec![(3, old), (4, api)]);
        assert_eq!(
            cache.lookup(pod, "api.stripe.com.", later),
            Vec::<IpAddr>::new()
        );
        assert!(cache.contains_ip(api), "kept for the live connection");
        // The connection ended: gone at the next collection.
        let idle = ConntrackActivity::from_records(&[], &endpoints, now_ns, later);
        assert_eq!(cache.gc(later + Duration::from_secs(1), &idle).len(), 1);
        assert!(!cache.contains_ip(api));
    }
}
