//! The name cache: per endpoint, which names resolved to which IPs, until when.
//!
//! The proxy records every allowed answer here (after the learner accepted it). The agent
//! garbage-collects it ([`NameCache::gc`]) to close access when answers expire, lists it for
//! `weir fqdn cache list`, and saves it across restarts. Times are wall-clock (milliseconds
//! since the Unix epoch) so a saved cache means the same thing after a restart.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use weir_l7_proxy::EndpointId;

/// Cache limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Answers live at least this long (Cilium's `--tofqdns-min-ttl`; 0 honours the TTL).
    pub min_ttl: Duration,
    /// At most this many IPs per (endpoint, name); the oldest are evicted beyond it
    /// (Cilium's `--tofqdns-endpoint-max-ip-per-hostname`).
    pub max_ips_per_name: usize,
    /// How long an expired IP is kept after a connection to it was last seen live (Cilium's
    /// `--tofqdns-idle-connection-grace-period`, default 0). Whatever its value, an expired IP
    /// stays while [`ConnectionActivity`] reports a live connection to it at each
    /// [`NameCache::gc`]: like Cilium, expiry never cuts an open connection.
    pub idle_grace: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            min_ttl: Duration::ZERO,
            max_ips_per_name: 1000,
            idle_grace: Duration::ZERO,
        }
    }
}

/// One (endpoint, name, IP) fact, as listed, collected and saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The endpoint that asked.
    pub endpoint: u16,
    /// The name (lower-case, trailing dot).
    pub name: String,
    /// One address it resolved to.
    pub ip: IpAddr,
    /// When it was (last) learned, ms since the Unix epoch.
    pub learned_ms: u64,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
}

impl CacheEntry {
    /// When it expires.
    pub fn expires(&self) -> SystemTime {
        from_ms(self.expires_ms)
    }
}

/// One row of `weir fqdn cache list`: a name as one endpoint sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRow {
    /// The endpoint.
    pub endpoint: u16,
    /// The name.
    pub name: String,
    /// Its addresses with their expiry (ms since the Unix epoch), by address.
    pub ips: Vec<(IpAddr, u64)>,
    /// The latest expiry among them (ms since the Unix epoch).
    pub expires_ms: u64,
}

/// Tells the garbage collector when connections to an IP were last active, so an expired
/// IP with live connections keeps its access (the agent reads its datapath's conntrack).
pub trait ConnectionActivity: Send + Sync {
    /// When a connection from `endpoint` to `ip` was last seen live (a live connection:
    /// now); `None` if there is none. The cache remembers the latest time it was told, so a
    /// source that only knows about live connections suffices for the grace period.
    fn last_active(&self, endpoint: EndpointId, ip: IpAddr) -> Option<SystemTime>;
}

/// No connection is ever active: expired entries go at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoConnections;

impl ConnectionActivity for NoConnections {
    fn last_active(&self, _endpoint: EndpointId, _ip: IpAddr) -> Option<SystemTime> {
        None
    }
}

/// Errors saving or loading the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The JSON did not (de)serialise.
    #[error("name cache JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Reading or writing the file failed.
    #[error("name cache file: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy)]
struct IpState {
    learned_ms: u64,
    expires_ms: u64,
    /// When a connection to it was last reported live after it expired, 0 if never.
    alive_ms: u64,
}

type Names = HashMap<String, BTreeMap<IpAddr, IpState>>;

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<EndpointId, Names>,
    /// Entries pushed out by the per-name cap, until the next [`NameCache::gc`] reports them.
    evicted: Vec<CacheEntry>,
}

/// The name cache. Thread-safe; every operation takes a short lock.
#[derive(Debug, Default)]
pub struct NameCache {
    config: CacheConfig,
    state: Mutex<State>,
}

/// The saved form.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    entries: Vec<CacheEntry>,
}

const SAVE_VERSION: u32 = 1;

fn to_ms(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

impl NameCache {
    /// An empty cache.
    pub fn new(config: CacheConfig) -> Self {
        NameCache {
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// The limits.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The TTL an answer's TTL becomes (raised to the minimum).
    pub fn effective_ttl(&self, ttl: u32) -> u32 {
        let min = u32::try_from(self.config.min_ttl.as_secs()).unwrap_or(u32::MAX);
        ttl.max(min)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent data (every update is
        // a plain insert/remove), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `name` resolved to `ips` (address, TTL seconds, already
    /// [effective](Self::effective_ttl)) for `endpoint` at `now`. An IP already known keeps
    /// the later expiry. Beyond the per-name cap the least recently learned IPs are evicted;
    /// they are returned, and reported again by the next [`gc`](Self::gc).
    pub fn insert(
        &self,
        endpoint: EndpointId,
        name: &str,
        ips: &[(IpAddr, u32)],
        now: SystemTime,
    ) -> Vec<CacheEntry> {
        let now_ms = to_ms(now);
        let cap = self.config.max_ips_per_name.max(1);
        let mut state = self.lock();
        let names = state.endpoints.entry(endpoint).or_default();
        // A known name (the common case: the same names are asked again and again) costs
        // no allocation.
        if !names.contains_key(name) {
            names.insert(name.to_owned(), BTreeMap::new());
        }
        let Some(per_name) = names.get_mut(name) else {
            return Vec::new();
        };
        for &(ip, ttl) in ips {
            let expires_ms = now_ms.saturating_add(u64::from(ttl).saturating_mul(1000));
            let e = per_name.entry(ip).or_insert(IpState {
                learned_ms: now_ms,
                expires_ms,
                alive_ms: 0,
            });
            e.learned_ms = now_ms;
            e.expires_ms = e.expires_ms.max(expires_ms);
        }
        let mut evicted = Vec::new();
        if per_name.len() > cap {
            let mut by_age: Vec<(u64, IpAddr)> =
                per_name.iter().map(|(ip, s)| (s.learned_ms, *ip)).collect();
            by_age.sort();
            let excess = per_name.len() - cap;
            for (_, ip) in by_age.into_iter().take(excess) {
                if let Some(s) = per_name.remove(&ip) {
                    evicted.push(CacheEntry {
                        endpoint: endpoint.0,
                        name: name.to_owned(),
                        ip,
                        learned_ms: s.learned_ms,
                        expires_ms: s.expires_ms,
                    });
                }
            }
        }
        state.evicted.extend(evicted.iter().cloned());
        evicted
    }

    /// The unexpired IPs of `name` for `endpoint`.
    pub fn lookup(&self, endpoint: EndpointId, name: &str, now: SystemTime) -> Vec<IpAddr> {
        let now_ms = to_ms(now);
        let state = self.lock();
        state
            .endpoints
            .get(&endpoint)
            .and_then(|n| n.get(name))
            .map(|ips| {
                ips.iter()
                    .filter(|(_, s)| s.expires_ms > now_ms)
                    .map(|(ip, _)| *ip)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every entry, sorted by endpoint, name and IP.
    pub fn entries(&self) -> Vec<CacheEntry> {
        let state = self.lock();
        let mut out: Vec<CacheEntry> = state
            .endpoints
            .iter()
            .flat_map(|(ep, names)| {
                names.iter().flat_map(move |(name, ips)| {
                    ips.iter().map(move |(ip, s)| CacheEntry {
                        endpoint: ep.0,
                        name: name.clone(),
                        ip: *ip,
                        learned_ms: s.learned_ms,
                        expires_ms: s.expires_ms,
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| (a.endpoint, &a.name, a.ip).cmp(&(b.endpoint, &b.name, b.ip)));
        out
    }

    /// The entries that have expired at `now` (whether or not the grace period keeps them).
    pub fn expired(&self, now: SystemTime) -> Vec<CacheEntry> {
        let now_ms = to_ms(now);
        self.entries()
            .into_iter()
            .filter(|e| e.expires_ms <= now_ms)
            .collect()
    }

    /// Whether any entry has expired at `now` (a cheap check before reading conntrack).
    pub fn has_expired(&self, now: SystemTime) -> bool {
        let now_ms = to_ms(now);
        let state = self.lock();
        state.endpoints.values().any(|names| {
            names
                .values()
                .any(|ips| ips.values().any(|s| s.expires_ms <= now_ms))
        }) || !state.evicted.is_empty()
    }

    /// Removes expired entries with no live connection and none for longer than the grace
    /// period (per `activity`, asked only about expired entries), and returns them with any
    /// entries evicted by the per-name cap since the last call. The agent then withdraws
    /// access for IPs that [`contains_ip`](Self::contains_ip) no longer reports.
    pub fn gc(&self, now: SystemTime, activity: &dyn ConnectionActivity) -> Vec<CacheEntry> {
        let now_ms = to_ms(now);
        let grace_ms = u64::try_from(self.config.idle_grace.as_millis()).unwrap_or(u64::MAX);
        let mut state = self.lock();
        let mut removed = std::mem::take(&mut state.evicted);
        for (ep, names) in state.endpoints.iter_mut() {
            for (name, ips) in names.iter_mut() {
                ips.retain(|ip, s| {
                    if s.expires_ms > now_ms {
                        return true;
                    }
                    if let Some(t) = activity.last_active(*ep, *ip) {
                        s.alive_ms = s.alive_ms.max(to_ms(t));
                    }
                    let alive = s.alive_ms != 0 && s.alive_ms.saturating_add(grace_ms) >= now_ms;
                    if !alive {
                        removed.push(CacheEntry {
                            endpoint: ep.0,
                            name: name.clone(),
                            ip: *ip,
                            learned_ms: s.learned_ms,
                            expires_ms: s.expires_ms,
                        });
                    }
                    alive
                });
            }
            names.retain(|_, ips| !ips.is_empty());
        }
        state.endpoints.retain(|_, names| !names.is_empty());
        removed
    }

    /// Whether any endpoint's entry still holds `ip`.
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let state = self.lock();
        state
            .endpoints
            .values()
            .any(|names| names.values().any(|ips| ips.contains_key(&ip)))
    }

    /// The names `ip` is known by (any endpoint), sorted: for flows' destination names.
    pub fn names_for_ip(&self, ip: IpAddr) -> Vec<String> {
        let state = self.lock();
        let mut out: Vec<String> = state
            .endpoints
            .values()
            .flat_map(|names| {
                names
                    .iter()
                    .filter(|(_, ips)| ips.contains_key(&ip))
                    .map(|(n, _)| n.clone())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Drops everything learned for an endpoint (it was deleted); returns what was dropped.
    pub fn remove_endpoint(&self, endpoint: EndpointId) -> Vec<CacheEntry> {
        let all = self.entries();
        self.lock().endpoints.remove(&endpoint);
        all.into_iter()
            .filter(|e| e.endpoint == endpoint.0)
            .collect()
    }

    /// The rows of `weir fqdn cache list`, sorted by endpoint and name.
    pub fn list(&self) -> Vec<CacheRow> {
        let mut rows: Vec<CacheRow> = Vec::new();
        for e in self.entries() {
            match rows.last_mut() {
                Some(r) if r.endpoint == e.endpoint && r.name == e.name => {
                    r.ips.push((e.ip, e.expires_ms));
                    r.expires_ms = r.expires_ms.max(e.expires_ms);
                }
                _ => rows.push(CacheRow {
                    endpoint: e.endpoint,
                    name: e.name,
                    ips: vec![(e.ip, e.expires_ms)],
                    expires_ms: e.expires_ms,
                }),
            }
        }
        rows
    }

    /// The cache as JSON.
    pub fn to_json(&self) -> Result<String, CacheError> {
        Ok(serde_json::to_string(&Saved {
            version: SAVE_VERSION,
            entries: self.entries(),
        })?)
    }

    /// A cache from [`to_json`](Self::to_json)'s output. Entries are kept as saved (expired
    /// ones too: the agent's first [`gc`](Self::gc) decides, with connection activity).
    pub fn from_json(config: CacheConfig, json: &str) -> Result<Self, CacheError> {
        let saved: Saved = serde_json::from_str(json)?;
        let cache = NameCache::new(config);
        {
            let mut state = cache.lock();
            for e in saved.entries {
                state
                    .endpoints
                    .entry(EndpointId(e.endpoint))
                    .or_default()
                    .entry(e.name)
                    .or_default()
                    .insert(
                        e.ip,
                        IpState {
                            learned_ms: e.learned_ms,
                            expires_ms: e.expires_ms,
                            alive_ms: 0,
                        },
                    );
            }
        }
        Ok(cache)
    }

    /// Writes the cache to `path` atomically (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), CacheError> {
        let json = self.to_json()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Reads a cache saved by [`save`](Self::save).
    pub fn load(config: CacheConfig, path: &Path) -> Result<Self, CacheError> {
        NameCache::from_json(config, &std::fs::read_to_string(path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn ttl_expiry_and_min_ttl() {
        let c = NameCache::new(CacheConfig {
            min_ttl: Duration::from_secs(10),
            ..CacheConfig::default()
        });
        assert_eq!(c.effective_ttl(3), 10);
        assert_eq!(c.effective_ttl(300), 300);
        let ep = EndpointId(7);
        c.insert(ep, "a.com.", &[(ip(1), c.effective_ttl(3))], at(0));
        assert_eq!(c.lookup(ep, "a.com.", at(9)), vec![ip(1)]);
        assert!(c.lookup(ep, "a.com.", at(10)).is_empty());
        assert!(c.expired(at(5)).is_empty());
        assert_eq!(c.expired(at(10)).len(), 1);
        let gone = c.gc(at(10), &NoConnections);
        assert_eq!(gone.len(), 1);
        assert!(!c.contains_ip(ip(1)));
        assert!(c.list().is_empty());
    }

    #[test]
    fn refresh_keeps_later_expiry() {
        let c = NameCache::new(CacheConfig::default());
        let ep = EndpointId(1);
        c.insert(ep, "a.", &[(ip(1), 100)], at(0));
        c.insert(ep, "a.", &[(ip(1), 5)], at(10));
        assert_eq!(c.lookup(ep, "a.", at(50)), vec![ip(1)]);
    }

    #[test]
    fn cap_evicts_oldest() {
        let c = NameCache::new(CacheConfig {
            max_ips_per_name: 2,
            ..CacheConfig::default()
        });
        let ep = EndpointId(1);
        c.insert(ep, "a.", &[(ip(1), 100)], at(0));
        c.insert(ep, "a.", &[(ip(2), 100)], at(1));
        let ev = c.insert(ep, "a.", &[(ip(3), 100)], at(2));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].ip, ip(1));
        assert_eq!(c.lookup(ep, "a.", at(3)), vec![ip(2), ip(3)]);
        // Reported once more by gc, then forgotten.
        assert_eq!(c.gc(at(3), &NoConnections).len(), 1);
        assert!(c.gc(at(3), &NoConnections).is_empty());
    }

    struct Active(SystemTime);
    impl ConnectionActivity for Active {
        fn last_active(&self, _: EndpointId, _: IpAddr) -> Option<SystemTime> {
            Some(self.0)
        }
    }

    #[test]
    fn grace_keeps_active_connections() {
        let c = NameCache::new(CacheConfig {
            idle_grace: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        let ep = EndpointId(1);
        c.insert(ep, "a.", &[(ip(1), 10)], at(0));
        // Expired, but a connection was active 30 s ago: kept.
        assert!(c.gc(at(100), &Active(at(70))).is_empty());
        assert!(c.contains_ip(ip(1)));
        // Idle for longer than the grace period: removed.
        assert_eq!(c.gc(at(200), &Active(at(70))).len(), 1);
    }

    /// With no grace period (Cilium's default), an expired IP stays exactly while a
    /// connection is live, and goes at the first collection after.
    #[test]
    fn zero_grace_keeps_only_live_connections() {
        let c = NameCache::new(CacheConfig::default());
        let ep = EndpointId(1);
        c.insert(ep, "a.", &[(ip(1), 10), (ip(2), 10)], at(0));
        assert!(!c.has_expired(at(5)));
        assert!(c.has_expired(at(10)));
        struct Live(IpAddr, SystemTime);
        impl ConnectionActivity for Live {
            fn last_active(&self, _: EndpointId, ip: IpAddr) -> Option<SystemTime> {
                (ip == self.0).then_some(self.1)
            }
        }
        let gone = c.gc(at(20), &Live(ip(1), at(20)));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].ip, ip(2));
        assert!(c.contains_ip(ip(1)));
        assert!(c.gc(at(21), &Live(ip(1), at(21))).is_empty());
        assert_eq!(c.gc(at(22), &NoConnections).len(), 1);
        assert!(!c.contains_ip(ip(1)));
    }

    /// A grace period counts from the last time a connection was seen live, even when the
    /// activity source has forgotten it since (conntrack entries are deleted when closed).
    #[test]
    fn grace_counts_from_last_live_sighting() {
        let c = NameCache::new(CacheConfig {
            idle_grace: Duration::from_secs(30),
            ..CacheConfig::default()
        });
        let ep = EndpointId(1);
        c.insert(ep, "a.", &[(ip(1), 10)], at(0));
        assert!(c.gc(at(50), &Active(at(50))).is_empty());
        assert!(c.gc(at(79), &NoConnections).is_empty());
        assert_eq!(c.gc(at(81), &NoConnections).len(), 1);
    }

    #[test]
    fn json_round_trip_and_listing() {
        let c = NameCache::new(CacheConfig::default());
        c.insert(EndpointId(2), "b.", &[(ip(2), 30), (ip(3), 60)], at(0));
        c.insert(EndpointId(1), "a.", &[(ip(1), 30)], at(0));
        let json = c.to_json().unwrap_or_default();
        let back = NameCache::from_json(CacheConfig::default(), &json);
        assert!(back.is_ok(), "{json}");
        let back = back.unwrap_or_default();
        assert_eq!(back.entries(), c.entries());
        let rows = back.list();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "a.");
        assert_eq!(rows[1].ips.len(), 2);
        assert_eq!(rows[1].expires_ms, to_ms(at(60)));
        assert_eq!(back.names_for_ip(ip(3)), vec!["b.".to_string()]);
        assert!(NameCache::from_json(CacheConfig::default(), "{").is_err());
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("fqdn.json");
        assert!(c.save(&path).is_ok());
        let loaded = NameCache::load(CacheConfig::default(), &path);
        assert_eq!(loaded.map(|l| l.entries()).ok(), Some(c.entries()));
        assert_eq!(back.remove_endpoint(EndpointId(2)).len(), 2);
        assert_eq!(back.entries().len(), 1);
    }
}
