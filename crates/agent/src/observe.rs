//! The agent's side of flow observability: the [`FlowContext`] over the [`Manager`], the task
//! that drains datapath events into the [`Observer`] often enough not to lose them, the tasks
//! that turn proxy records into L7 flows, and the agent gauges for the metrics endpoint.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tracing::warn;
use weir_datapath::{Datapath, DatapathEvent, EndpointId};
use weir_dns_proxy::{DnsChannelSink, DnsRecord, NameCache};
use weir_identity::{Identity, ReservedIdentity};
use weir_l7_proxy::{ChannelSink, L7Record};
use weir_observe::proto::flow::LostEventSource;
use weir_observe::{
    AgentStats, ContextSnapshot, DnsNames, EndpointMeta, Enricher, FlowContext, NameIndex, Observer,
};
use weir_policy_compiler::Decision;

use crate::manager::{Endpoint, Manager};

/// How often the datapath's event ring is drained. The ring holds 1 MiB of events (some
/// 16k): at 50k events/s a 5 ms period leaves it almost empty.
pub const DRAIN_PERIOD: Duration = Duration::from_millis(5);

/// The most flows the event task publishes before it lets other tasks (ring readers) run:
/// well under the default ring of 4095.
pub const PUBLISH_CHUNK: usize = 512;

/// Capacity of the queues between the proxies and the observer.
pub const PROXY_QUEUE: usize = 8192;

/// A [`FlowContext`] reading the manager (hold its lock while enriching). Peers are found
/// by address through an index built on the first such question; DNS names through an
/// index of the DNS proxy's name cache, built on the first name question.
pub struct ManagerContext<'a, D: Datapath> {
    manager: &'a Manager<D>,
    by_ip: OnceCell<HashMap<IpAddr, EndpointId>>,
    names: OnceCell<NameIndex>,
}

impl<'a, D: Datapath> ManagerContext<'a, D> {
    /// A context over `manager`'s current state.
    pub fn new(manager: &'a Manager<D>) -> Self {
        ManagerContext {
            manager,
            by_ip: OnceCell::new(),
            names: OnceCell::new(),
        }
    }

    /// The names endpoints learned from DNS answers, as the proxy's cache holds them now.
    pub fn dns_names(&self) -> &NameIndex {
        self.names
            .get_or_init(|| learned_names(&self.manager.proxy_handles().name_cache))
    }

    fn by_ip(&self) -> &HashMap<IpAddr, EndpointId> {
        self.by_ip.get_or_init(|| {
            self.manager
                .endpoints()
                .flat_map(|e| e.spec.addresses.iter().map(|ip| (*ip, e.id)))
                .collect()
        })
    }
}

/// Indexes the DNS proxy's name cache by (endpoint, address). The cache keys endpoints by
/// the proxy's 16-bit id, the low half of the agent's.
pub fn learned_names(cache: &NameCache) -> NameIndex {
    let entries = cache.entries();
    NameIndex::new(
        entries
            .iter()
            .map(|e| (EndpointId(u32::from(e.endpoint)), e.name.as_str(), e.ip)),
    )
}

fn meta(ep: &Endpoint) -> EndpointMeta {
    EndpointMeta {
        id: ep.id.0,
        identity: ep.identity.get(),
        namespace: ep.spec.namespace.clone(),
        pod_name: ep.spec.pod_name.clone(),
        labels: ep.labels.iter().map(ToString::to_string).collect(),
    }
}

impl<D: Datapath> FlowContext for ManagerContext<'_, D> {
    fn local_endpoint(&self, id: EndpointId) -> Option<EndpointMeta> {
        self.manager.endpoint(id).map(meta)
    }

    fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointMeta> {
        let id = self.by_ip().get(&ip)?;
        self.manager.endpoint(*id).map(meta)
    }

    fn identity_labels(&self, identity: Identity) -> Vec<String> {
        if let Some(info) = self.manager.compiler().identities().get(identity) {
            return info.labels.iter().map(ToString::to_string).collect();
        }
        ReservedIdentity::from_identity(identity)
            .map(|r| r.labels().iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    fn decide(&self, endpoint: EndpointId, flow: &weir_policy_compiler::Flow) -> Option<Decision> {
        self.manager
            .endpoint(endpoint)
            .map(|e| e.policy.decide(flow))
    }

    fn names_of(&self, endpoint: EndpointId, ip: IpAddr) -> Vec<String> {
        self.dns_names().names_of(endpoint, ip)
    }
}

/// Datapath events and what enriching them needs, taken under the manager lock.
#[derive(Debug, Default)]
pub struct Captured {
    /// The events, in the datapath's order.
    pub events: Vec<DatapathEvent>,
    /// The manager's answers for them.
    pub context: ContextSnapshot,
    /// The datapath's lost-event total, when it could be read.
    pub lost: Option<u64>,
}

/// The observer, its enricher and the agent's policy-regeneration timings.
#[derive(Debug)]
pub struct AgentObserver {
    /// Where flows go.
    pub observer: Arc<Observer>,
    /// Builds flows.
    pub enricher: Enricher,
    regen_nanos: AtomicU64,
    regenerations: AtomicU64,
}

impl AgentObserver {
    /// Wraps an observer; flows carry `node_name`.
    pub fn new(observer: Arc<Observer>, node_name: &str) -> Self {
        AgentObserver {
            observer,
            enricher: Enricher::new(node_name),
            regen_nanos: AtomicU64::new(0),
            regenerations: AtomicU64::new(0),
        }
    }

    /// Records how long applying one batch of policy changes took.
    pub fn record_regeneration(&self, took: Duration) {
        self.regen_nanos.store(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.regenerations.fetch_add(1, Ordering::Relaxed);
    }

    /// Drains the datapath once and enriches its events into flows; returns them with the
    /// datapath's lost-event total. [`AgentObserver::capture`] then [`AgentObserver::enrich`].
    pub fn drain<D: Datapath>(
        &self,
        manager: &mut Manager<D>,
    ) -> (Vec<weir_observe::proto::flow::Flow>, Option<u64>) {
        let captured = self.capture(manager);
        let lost = captured.lost;
        (self.enrich(&captured), lost)
    }

    /// The part of a drain that needs the manager (call it under the manager lock): takes the
    /// datapath's events and answers every question enriching them asks, once per distinct
    /// question.
    pub fn capture<D: Datapath>(&self, manager: &mut Manager<D>) -> Captured {
        let events = match manager.datapath_mut().drain_events() {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "draining datapath events");
                Vec::new()
            }
        };
        let lost = manager.datapath().counters().ok().map(|c| c.events_lost);
        let context = if events.is_empty() {
            ContextSnapshot::default()
        } else {
            ContextSnapshot::capture(&ManagerContext::new(manager), &events)
        };
        Captured {
            events,
            context,
            lost,
        }
    }

    /// The flows of captured events (no lock needed).
    pub fn enrich(&self, captured: &Captured) -> Vec<weir_observe::proto::flow::Flow> {
        self.enricher
            .datapath_flows(&captured.context, &captured.events)
    }

    /// The agent gauges from the manager's current state.
    pub fn agent_stats<D: Datapath>(&self, manager: &Manager<D>) -> AgentStats {
        AgentStats {
            endpoints: manager.endpoints().count() as u64,
            identities: manager.compiler().identities().len() as u64,
            policy_revision: manager.compiler().repository().revision().0,
            policy_map_entries: manager
                .endpoints()
                .map(|e| e.policy.map_state.len() as u64)
                .sum(),
            last_regeneration_seconds: self.regen_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            regenerations: self.regenerations.load(Ordering::Relaxed),
        }
    }
}

/// Publishes the growth of a monotonically increasing loss counter.
fn publish_loss(observer: &Observer, source: LostEventSource, last: &mut Option<u64>, now: u64) {
    if let Some(prev) = *last {
        observer.publish_lost(source, now.saturating_sub(prev));
    } else if now > 0 {
        // Losses before the agent started reading (a restart) are reported once too.
        observer.publish_lost(source, now);
    }
    *last = Some(now);
}

/// The event task: drains the datapath every [`DRAIN_PERIOD`] and refreshes the agent
/// gauges every second.
pub fn spawn_event_pump<D: Datapath + Send + 'static>(
    manager: Arc<Mutex<Manager<D>>>,
    obs: Arc<AgentObserver>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_lost: Option<u64> = None;
        let mut last_stats = Instant::now() - Duration::from_secs(2);
        let mut tick = tokio::time::interval(DRAIN_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The lock is held for the drain and the lookups only; flows are built after.
            let (captured, stats) = {
                let mut m = manager.lock().await;
                let captured = obs.capture(&mut m);
                let stats =
                    (last_stats.elapsed() >= Duration::from_secs(1)).then(|| obs.agent_stats(&m));
                (captured, stats)
            };
            if let Some(lost) = captured.lost {
                publish_loss(
                    &obs.observer,
                    LostEventSource::PerfEventRingBuffer,
                    &mut last_lost,
                    lost,
                );
            }
            // After a stall (the thread descheduled, a slow tick) one drain can hold more
            // events than the flow ring: publish it in slices and let readers on this thread
            // read each one before the next overwrites it.
            for chunk in captured.events.chunks(PUBLISH_CHUNK) {
                let flows = obs.enricher.datapath_flows(&captured.context, chunk);
                obs.observer.publish_all(flows);
                tokio::task::yield_now().await;
            }
            if let Some(s) = stats {
                obs.observer.metrics().set_agent_stats(s);
                last_stats = Instant::now();
            }
        }
    })
}

/// The HTTP proxy's sink and the task that turns its records into L7 flows.
pub fn spawn_http_pump<D: Datapath + Send + 'static>(
    manager: Arc<Mutex<Manager<D>>>,
    obs: Arc<AgentObserver>,
) -> (Arc<ChannelSink>, JoinHandle<()>) {
    let (sink, rx) = ChannelSink::new(PROXY_QUEUE);
    let sink = Arc::new(sink);
    let dropped = sink.clone();
    let task = tokio::spawn(pump(
        rx,
        manager,
        obs,
        move || dropped.dropped(),
        |obs, ctx, rec: L7Record| obs.enricher.http_flows(ctx, &rec),
    ));
    (sink, task)
}

/// The DNS proxy's sink and the task that turns its records into DNS flows.
pub fn spawn_dns_pump<D: Datapath + Send + 'static>(
    manager: Arc<Mutex<Manager<D>>>,
    obs: Arc<AgentObserver>,
) -> (Arc<DnsChannelSink>, JoinHandle<()>) {
    let (sink, rx) = DnsChannelSink::new(PROXY_QUEUE);
    let sink = Arc::new(sink);
    let dropped = sink.clone();
    let task = tokio::spawn(pump(
        rx,
        manager,
        obs,
        move || dropped.dropped(),
        |obs, ctx, rec: DnsRecord| vec![obs.enricher.dns_flow(ctx, &rec)],
    ));
    (sink, task)
}

async fn pump<D, R, F>(
    mut rx: mpsc::Receiver<R>,
    manager: Arc<Mutex<Manager<D>>>,
    obs: Arc<AgentObserver>,
    dropped: impl Fn() -> u64,
    to_flows: F,
) where
    D: Datapath + Send + 'static,
    F: Fn(&AgentObserver, &ManagerContext<'_, D>, R) -> Vec<weir_observe::proto::flow::Flow>,
{
    let mut last_dropped = Some(0);
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let flows: Vec<_> = {
            let m = manager.lock().await;
            let ctx = ManagerContext::new(&m);
            batch
                .drain(..)
                .flat_map(|r| to_flows(&obs, &ctx, r))
                .collect()
        };
        obs.observer.publish_all(flows);
        publish_loss(
            &obs.observer,
            LostEventSource::ObserverEventsQueue,
            &mut last_dropped,
            dropped(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::SystemTime;
    use weir_dns_proxy::CacheConfig;

    #[test]
    fn the_name_index_reads_the_dns_proxys_cache_per_endpoint() {
        let cache = NameCache::new(CacheConfig::default());
        let ip = IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34));
        let now = SystemTime::now();
        cache.insert(
            weir_l7_proxy::EndpointId(5),
            "example.com.",
            &[(ip, 60)],
            now,
        );
        cache.insert(
            weir_l7_proxy::EndpointId(5),
            "www.example.com.",
            &[(ip, 60)],
            now,
        );
        cache.insert(
            weir_l7_proxy::EndpointId(6),
            "other.test.",
            &[(ip, 60)],
            now,
        );
        let names = learned_names(&cache);
        assert_eq!(
            names.names_of(EndpointId(5), ip),
            ["example.com", "www.example.com"]
        );
        assert_eq!(names.names_of(EndpointId(6), ip), ["other.test"]);
        assert!(names.names_of(EndpointId(7), ip).is_empty());
    }
}
