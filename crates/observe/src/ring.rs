//! The bounded in-memory ring of recent events. Every event gets a sequence number; a reader
//! that falls behind learns exactly how many events were overwritten before it read them.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::proto::flow::{Flow, LostEvent};

/// Hubble's default ring capacity.
pub const DEFAULT_CAPACITY: usize = 4095;

/// One entry of the ring.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A flow.
    Flow(Arc<Flow>),
    /// Events lost before they reached the ring.
    Lost(LostEvent),
}

/// What a reader got: events from its position on, and how many it missed.
#[derive(Debug, Default)]
pub struct Read {
    /// Events overwritten before this reader saw them.
    pub missed: u64,
    /// `(sequence number, event)`, oldest first.
    pub events: Vec<(u64, Event)>,
    /// Where the reader continues.
    pub next: u64,
    /// [`FlowRing::extra_at`] the oldest held event when the read was made.
    pub extra_at_first: u64,
    /// [`FlowRing::extra_at`] `next`.
    pub extra_at_next: u64,
}

/// A fixed-capacity ring: the oldest event is overwritten when it is full.
#[derive(Debug)]
pub struct FlowRing {
    capacity: usize,
    entries: VecDeque<Event>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    /// Per entry, [`FlowRing::extra_at`] its sequence number.
    extra_before: VecDeque<u64>,
    /// The same after the newest entry.
    total_extra: u64,
}

/// How many events beyond one an entry stands for: a lost-event record counts its events.
fn extra(event: &Event) -> u64 {
    match event {
        Event::Flow(_) => 0,
        Event::Lost(l) => l.num_events_lost.saturating_sub(1),
    }
}

impl FlowRing {
    /// A ring holding at most `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        FlowRing {
            capacity,
            entries: VecDeque::with_capacity(capacity.min(1 << 16)),
            first_seq: 0,
            extra_before: VecDeque::with_capacity(capacity.min(1 << 16)),
            total_extra: 0,
        }
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many events the ring holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The sequence number the next pushed event gets.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }

    /// The oldest sequence number still held.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Appends an event, overwriting the oldest when full; returns its sequence number.
    pub fn push(&mut self, event: Event) -> u64 {
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
            self.extra_before.pop_front();
            self.first_seq += 1;
        }
        self.extra_before.push_back(self.total_extra);
        self.total_extra = self.total_extra.saturating_add(extra(&event));
        self.entries.push_back(event);
        self.next_seq() - 1
    }

    /// How many events beyond one per entry the entries before sequence number `seq` stood
    /// for (lost-event records count their events), for `seq` from the oldest held entry to
    /// [`FlowRing::next_seq`]; earlier numbers answer as the oldest held entry. A reader
    /// that missed entries from `a` to `b` missed `b - a + extra_at(b) - extra_at(a)` events.
    pub fn extra_at(&self, seq: u64) -> u64 {
        let offset = usize::try_from(seq.saturating_sub(self.first_seq)).unwrap_or(usize::MAX);
        self.extra_before
            .get(offset)
            .copied()
            .unwrap_or(self.total_extra)
    }

    /// Up to `max` events from sequence number `from` on.
    pub fn read_from(&self, from: u64, max: usize) -> Read {
        let missed = self.first_seq.saturating_sub(from);
        let start = from.max(self.first_seq);
        let offset = usize::try_from(start - self.first_seq).unwrap_or(usize::MAX);
        let events: Vec<(u64, Event)> = self
            .entries
            .iter()
            .skip(offset)
            .take(max)
            .enumerate()
            .map(|(i, e)| (start + i as u64, e.clone()))
            .collect();
        let next = (start + events.len() as u64)
            .min(self.next_seq())
            .max(start);
        Read {
            missed,
            events,
            next,
            extra_at_first: self.extra_at(self.first_seq),
            extra_at_next: self.extra_at(next),
        }
    }

    /// Every held event, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, &Event)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (self.first_seq + i as u64, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u32) -> Event {
        Event::Flow(Arc::new(Flow {
            drop_reason: n,
            ..Flow::default()
        }))
    }

    #[test]
    fn overwrites_oldest_and_reports_what_a_reader_missed() {
        let mut r = FlowRing::new(3);
        for i in 0..5 {
            r.push(flow(i));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.first_seq(), 2);
        let read = r.read_from(0, 10);
        assert_eq!(read.missed, 2);
        assert_eq!(read.events.len(), 3);
        assert_eq!(read.events.first().map(|e| e.0), Some(2));
        assert_eq!(read.next, 5);
        let again = r.read_from(read.next, 10);
        assert_eq!((again.missed, again.events.len(), again.next), (0, 0, 5));
    }

    #[test]
    fn overwritten_lost_records_count_their_events() {
        let mut r = FlowRing::new(2);
        r.push(flow(0));
        r.push(Event::Lost(LostEvent {
            source: 1,
            num_events_lost: 10,
            cpu: None,
        }));
        r.push(flow(2));
        r.push(flow(3));
        assert_eq!((r.extra_at(0), r.extra_at(2), r.extra_at(4)), (9, 9, 9));
        let read = r.read_from(0, 10);
        // Entries 0 and 1 were missed: one flow and ten lost events.
        assert_eq!(read.missed + read.extra_at_first, 11);
        assert_eq!(read.extra_at_next, 9);
    }

    #[test]
    fn zero_capacity_is_one_and_reads_past_the_end_are_empty() {
        let mut r = FlowRing::new(0);
        r.push(flow(1));
        r.push(flow(2));
        assert_eq!(r.capacity(), 1);
        assert_eq!(r.read_from(u64::MAX, 5).events.len(), 0);
        assert_eq!(r.read_from(1, 0).events.len(), 0);
    }
}
