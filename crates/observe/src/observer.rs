//! The observer: the ring, its readers, metrics and loss accounting in one place. Producers
//! (the agent's event task, the proxy sinks) publish flows; readers (GetFlows, tests) read
//! history and follow new events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::proto::flow::{Flow, LostEvent, LostEventSource};
use crate::ring::{DEFAULT_CAPACITY, Event, FlowRing, Read};

/// How the observer is set up.
#[derive(Debug, Clone)]
pub struct ObserverConfig {
    /// Ring capacity (Hubble's default 4095).
    pub capacity: usize,
    /// The node name flows and responses carry.
    pub node_name: String,
}

impl Default for ObserverConfig {
    fn default() -> Self {
        ObserverConfig {
            capacity: DEFAULT_CAPACITY,
            node_name: "weir-node".to_string(),
        }
    }
}

/// Counts shown by `ServerStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ObserverStatus {
    /// Events in the ring.
    pub num_flows: u64,
    /// Ring capacity.
    pub max_flows: u64,
    /// Flows published since start.
    pub seen_flows: u64,
    /// Nanoseconds since start.
    pub uptime_ns: u64,
    /// Events lost before reaching the ring, all sources.
    pub lost_events: u64,
}

/// The flow hub.
#[derive(Debug)]
pub struct Observer {
    ring: Mutex<FlowRing>,
    /// The ring's next sequence number, for followers to wait on.
    tail: watch::Sender<u64>,
    seen: AtomicU64,
    lost: AtomicU64,
    started: Instant,
    node_name: String,
    metrics: Arc<Metrics>,
}

impl Observer {
    /// An observer with its own metrics registry.
    pub fn new(config: ObserverConfig) -> Self {
        Self::with_metrics(config, Arc::new(Metrics::default()))
    }

    /// An observer that records into `metrics`.
    pub fn with_metrics(config: ObserverConfig, metrics: Arc<Metrics>) -> Self {
        let (tail, _) = watch::channel(0);
        Observer {
            ring: Mutex::new(FlowRing::new(config.capacity)),
            tail,
            seen: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            started: Instant::now(),
            node_name: config.node_name,
            metrics,
        }
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The node name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    fn ring(&self) -> MutexGuard<'_, FlowRing> {
        // A panic while holding the lock cannot leave the ring inconsistent (every mutation
        // is a single push), so a poisoned lock is still usable.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes one flow.
    pub fn publish(&self, flow: Flow) {
        self.publish_all(std::iter::once(flow));
    }

    /// Publishes flows in order, waking followers once.
    pub fn publish_all(&self, flows: impl IntoIterator<Item = Flow>) {
        let flows: Vec<Arc<Flow>> = flows.into_iter().map(Arc::new).collect();
        if flows.is_empty() {
            return;
        }
        for f in &flows {
            self.metrics.record_flow(f);
        }
        self.seen.fetch_add(flows.len() as u64, Ordering::Relaxed);
        let next = {
            let mut ring = self.ring();
            for f in flows {
                ring.push(Event::Flow(f));
            }
            ring.next_seq()
        };
        self.tail.send_replace(next);
    }

    /// Records `count` events lost at `source` before they became flows: counted in the
    /// metrics and put in the ring, so every reader sees the gap.
    pub fn publish_lost(&self, source: LostEventSource, count: u64) {
        if count == 0 {
            return;
        }
        self.metrics.record_lost(source, count);
        self.lost.fetch_add(count, Ordering::Relaxed);
        let next = {
            let mut ring = self.ring();
            ring.push(Event::Lost(LostEvent {
                source: source as i32,
                num_events_lost: count,
                cpu: None,
            }));
            ring.next_seq()
        };
        self.tail.send_replace(next);
    }

    /// Counts for `ServerStatus`.
    pub fn status(&self) -> ObserverStatus {
        let ring = self.ring();
        ObserverStatus {
            num_flows: ring.len() as u64,
            max_flows: ring.capacity() as u64,
            seen_flows: self.seen.load(Ordering::Relaxed),
            uptime_ns: u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            lost_events: self.lost.load(Ordering::Relaxed),
        }
    }

    /// A snapshot of the ring, oldest first, with the sequence number after the last event.
    pub fn snapshot(&self) -> (Vec<Event>, u64) {
        let ring = self.ring();
        (
            ring.iter().map(|(_, e)| e.clone()).collect(),
            ring.next_seq(),
        )
    }

    /// Reads up to `max` events from `from` on.
    pub fn read_from(&self, from: u64, max: usize) -> Read {
        self.ring().read_from(from, max)
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.ring().next_seq()
    }

    /// A receiver that changes whenever events are published.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.tail.subscribe()
    }

    /// A follower reading every event from now on.
    pub fn follow(self: &Arc<Self>) -> Follower {
        let (next, extra) = {
            let ring = self.ring();
            (ring.next_seq(), ring.extra_at(ring.next_seq()))
        };
        Follower {
            observer: self.clone(),
            rx: self.watch(),
            next,
            extra,
        }
    }

    /// A follower starting at sequence number `from`.
    pub fn follow_from(self: &Arc<Self>, from: u64) -> Follower {
        Follower {
            observer: self.clone(),
            rx: self.watch(),
            next: from,
            extra: self.ring().extra_at(from),
        }
    }
}

/// Reads events as they are published. Events overwritten before it read them are reported
/// as a [`LostEvent`] from `HUBBLE_RING_BUFFER`, so delivered plus lost is what was published.
#[derive(Debug)]
pub struct Follower {
    observer: Arc<Observer>,
    rx: watch::Receiver<u64>,
    next: u64,
    /// [`FlowRing::extra_at`] `next`: what a lost-event record it never saw stood for.
    extra: u64,
}

impl Follower {
    /// The next batch (at most `max` events), waiting until there is one. `None` when the
    /// observer is gone.
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Event>> {
        loop {
            // Mark the current value seen before reading, so a publish after the read wakes
            // the wait below.
            self.rx.borrow_and_update();
            let read = self.observer.read_from(self.next, max.max(1));
            self.next = read.next;
            let mut out = Vec::with_capacity(read.events.len() + 1);
            if read.missed > 0 {
                // Overwritten lost-event records count the events they stood for.
                let missed = read
                    .missed
                    .saturating_add(read.extra_at_first.saturating_sub(self.extra));
                self.observer
                    .metrics
                    .record_lost(LostEventSource::HubbleRingBuffer, missed);
                out.push(Event::Lost(LostEvent {
                    source: LostEventSource::HubbleRingBuffer as i32,
                    num_events_lost: missed,
                    cpu: None,
                }));
            }
            self.extra = read.extra_at_next;
            out.extend(read.events.into_iter().map(|(_, e)| e));
            if !out.is_empty() {
                return Some(out);
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(cap: usize) -> Arc<Observer> {
        Arc::new(Observer::new(ObserverConfig {
            capacity: cap,
            node_name: "n".into(),
        }))
    }

    #[test]
    fn status_counts_seen_and_held_flows() {
        let o = obs(2);
        o.publish_all((0..5).map(|_| Flow::default()));
        o.publish_lost(LostEventSource::PerfEventRingBuffer, 3);
        o.publish_lost(LostEventSource::PerfEventRingBuffer, 0);
        let s = o.status();
        assert_eq!((s.num_flows, s.max_flows, s.seen_flows), (2, 2, 5));
        assert_eq!(s.lost_events, 3);
    }

    #[tokio::test]
    async fn an_overwritten_lost_record_still_counts_its_events() {
        let o = obs(4);
        let mut f = o.follow();
        o.publish_all((0..2).map(|_| Flow::default()));
        o.publish_lost(LostEventSource::PerfEventRingBuffer, 1000);
        o.publish_all((0..10).map(|_| Flow::default()));
        let (mut delivered, mut lost) = (0u64, 0u64);
        while delivered + lost < 1012 {
            let Some(batch) = f.next_batch(16).await else {
                break;
            };
            for e in batch {
                match e {
                    Event::Flow(_) => delivered += 1,
                    Event::Lost(l) => lost += l.num_events_lost,
                }
            }
        }
        assert_eq!((delivered, lost), (4, 1008));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivered_plus_lost_equals_published() {
        const N: u64 = 200_000;
        let o = obs(64);
        let mut f = o.follow();
        let producer = {
            let o = o.clone();
            tokio::task::spawn_blocking(move || {
                for _ in 0..N / 100 {
                    o.publish_all((0..100).map(|_| Flow::default()));
                }
            })
        };
        let (mut delivered, mut lost) = (0u64, 0u64);
        while delivered + lost < N {
            let Some(batch) = f.next_batch(16).await else {
                break;
            };
            for e in batch {
                match e {
                    Event::Flow(_) => delivered += 1,
                    Event::Lost(l) => lost += l.num_events_lost,
                }
            }
        }
        assert!(producer.await.is_ok());
        assert_eq!(delivered + lost, N);
    }
}
