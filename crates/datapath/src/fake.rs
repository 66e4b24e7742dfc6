//! An in-memory datapath for unit tests of the layers above. It enforces nothing; it records
//! what the agent asked for and answers [`FakeDatapath::verdict`] with the compiler's `decide`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use weir_identity::{Identity, ReservedIdentity};
use weir_policy_compiler::{
    EntryAction, Flow, MapState, MapStateDiff, PolicyEntry, PolicyKey, decide,
};

use crate::expected_verdict;
use crate::{
    Counters, CtRecord, Datapath, DatapathError, DatapathEvent, EndpointAttachment, EndpointId,
    InstalledPolicyEntry, Verdict,
};

/// In-memory [`Datapath`].
#[derive(Debug, Default)]
pub struct FakeDatapath {
    endpoints: BTreeMap<String, EndpointAttachment>,
    policy: BTreeMap<EndpointId, MapState>,
    ipcache: BTreeMap<IpNet, Identity>,
    /// Packets and bytes decided by each entry (see [`FakeDatapath::count_packet`]).
    entry_counts: BTreeMap<(EndpointId, PolicyKey), (u64, u64)>,
    /// Events the test wants `drain_events` to return.
    pub pending_events: Vec<DatapathEvent>,
}

impl FakeDatapath {
    /// An empty fake.
    pub fn new() -> Self {
        Self::default()
    }

    /// The attached endpoints, by interface name.
    pub fn endpoints(&self) -> &BTreeMap<String, EndpointAttachment> {
        &self.endpoints
    }

    /// The identity the ipcache gives `addr` (longest prefix; world when unknown).
    pub fn identity_of(&self, addr: IpAddr) -> Identity {
        self.ipcache
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or(Identity::from(ReservedIdentity::World))
    }

    /// Plays the kernel's part for the first packet of a new flow of `endpoint`, `bytes` long:
    /// the entry that decides it counts the packet, as the kernel's counters do.
    pub fn count_packet(&mut self, endpoint: EndpointId, flow: &Flow, bytes: u64) -> Verdict {
        let empty = MapState::default();
        let d = decide(self.policy.get(&endpoint).unwrap_or(&empty), flow);
        if let Some(key) = d.key {
            let c = self.entry_counts.entry((endpoint, key)).or_default();
            c.0 = c.0.saturating_add(1);
            c.1 = c.1.saturating_add(bytes);
        }
        d.verdict.into()
    }

    /// The verdict the kernel would give a new flow of `endpoint`.
    pub fn verdict(&self, endpoint: EndpointId, flow: &Flow) -> Verdict {
        match self.policy.get(&endpoint) {
            Some(m) => expected_verdict(m, flow),
            None => expected_verdict(&MapState::default(), flow),
        }
    }
}

impl Datapath for FakeDatapath {
    fn attach_endpoint(&mut self, endpoint: &EndpointAttachment) -> Result<(), DatapathError> {
        self.endpoints
            .insert(endpoint.ifname.clone(), endpoint.clone());
        Ok(())
    }

    fn detach_endpoint(&mut self, endpoint: &EndpointAttachment) -> Result<(), DatapathError> {
        self.endpoints.remove(&endpoint.ifname);
        self.policy.remove(&endpoint.endpoint_id);
        let id = endpoint.endpoint_id;
        self.entry_counts.retain(|(ep, _), _| *ep != id);
        Ok(())
    }

    fn apply_policy_diff(
        &mut self,
        endpoint: EndpointId,
        diff: &MapStateDiff,
    ) -> Result<(), DatapathError> {
        let m = self.policy.entry(endpoint).or_default();
        for (k, e) in &diff.upserts {
            if k.prefix_len > 24 {
                return Err(DatapathError::InvalidKey(format!(
                    "prefix_len {}",
                    k.prefix_len
                )));
            }
            // As the kernel backends: a changed action restarts the entry's counts.
            if let Some(old) = m.entries.insert(*k, e.clone())
                && old.action == e.action
            {
                continue;
            }
            self.entry_counts.remove(&(endpoint, *k));
        }
        for k in &diff.removals {
            m.entries.remove(k);
            self.entry_counts.remove(&(endpoint, *k));
        }
        Ok(())
    }

    fn upsert_ipcache(&mut self, prefix: IpNet, identity: Identity) -> Result<(), DatapathError> {
        self.ipcache.insert(prefix.trunc(), identity);
        Ok(())
    }

    fn remove_ipcache(&mut self, prefix: IpNet) -> Result<(), DatapathError> {
        self.ipcache.remove(&prefix.trunc());
        Ok(())
    }

    fn dump_policy(
        &self,
        endpoint: EndpointId,
    ) -> Result<BTreeMap<PolicyKey, EntryAction>, DatapathError> {
        Ok(self
            .policy
            .get(&endpoint)
            .map(|m| {
                m.entries
                    .iter()
                    .map(|(k, e): (&PolicyKey, &PolicyEntry)| (*k, e.action))
            })
            .into_iter()
            .flatten()
            .collect())
    }

    fn dump_policy_entries(
        &self,
        endpoint: EndpointId,
    ) -> Result<BTreeMap<PolicyKey, InstalledPolicyEntry>, DatapathError> {
        Ok(self
            .dump_policy(endpoint)?
            .into_iter()
            .map(|(k, action)| {
                let (packets, bytes) = self
                    .entry_counts
                    .get(&(endpoint, k))
                    .copied()
                    .unwrap_or_default();
                (
                    k,
                    InstalledPolicyEntry {
                        action,
                        packets,
                        bytes,
                    },
                )
            })
            .collect())
    }

    fn list_ipcache(&self) -> Result<Vec<(IpNet, Identity)>, DatapathError> {
        Ok(self.ipcache.iter().map(|(n, i)| (*n, *i)).collect())
    }

    fn list_conntrack(&self) -> Result<Vec<CtRecord>, DatapathError> {
        Ok(Vec::new())
    }

    fn gc_conntrack(&mut self) -> Result<usize, DatapathError> {
        Ok(0)
    }

    fn drain_events(&mut self) -> Result<Vec<DatapathEvent>, DatapathError> {
        Ok(std::mem::take(&mut self.pending_events))
    }

    fn counters(&self) -> Result<Counters, DatapathError> {
        Ok(Counters::default())
    }
}

#[cfg(test)]
mod tests {

    use weir_policy_model::Direction;

    use super::*;

    #[test]
    fn fake_applies_diffs_and_answers() {
        let mut dp = FakeDatapath::new();
        let ep = EndpointAttachment {
            ifname: "lxc1".into(),
            endpoint_id: EndpointId(1),
            identity: Identity(1000),
            addresses: Vec::new(),
        };
        dp.attach_endpoint(&ep).unwrap();
        dp.upsert_ipcache("10.0.0.0/24".parse().unwrap(), Identity(300))
            .unwrap();
        assert_eq!(dp.identity_of("10.0.0.9".parse().unwrap()), Identity(300));
        assert_eq!(dp.identity_of("10.0.1.9".parse().unwrap()), Identity(2));
        let key = PolicyKey {
            identity: Identity(300),
            direction: Direction::Ingress,
            protocol: 6,
            port: 80,
            prefix_len: 24,
        };
        let diff = MapStateDiff {
            upserts: vec![(
                key,
                PolicyEntry {
                    action: EntryAction::Allow,
                    derived_from: Default::default(),
                },
            )],
            removals: vec![],
        };
        dp.apply_policy_diff(EndpointId(1), &diff).unwrap();
        let flow = Flow {
            remote: Identity(300),
            direction: Direction::Ingress,
            protocol: 6,
            port: 80,
        };
        assert_eq!(dp.verdict(EndpointId(1), &flow), Verdict::Allow);
        assert_eq!(dp.dump_policy(EndpointId(1)).unwrap().len(), 1);
        // The deciding entry counts; an unchanged upsert keeps the counts, a change resets.
        assert_eq!(dp.count_packet(EndpointId(1), &flow, 60), Verdict::Allow);
        let other = Flow { port: 81, ..flow };
        assert_eq!(
            dp.count_packet(EndpointId(1), &other, 60),
            Verdict::Drop { reason: 133 }
        );
        let counts = |dp: &FakeDatapath| {
            let e = dp.dump_policy_entries(EndpointId(1)).unwrap()[&key];
            (e.packets, e.bytes)
        };
        assert_eq!(counts(&dp), (1, 60));
        dp.apply_policy_diff(EndpointId(1), &diff).unwrap();
        assert_eq!(counts(&dp), (1, 60));
        let mut deny = diff.clone();
        deny.upserts[0].1.action = EntryAction::Deny;
        dp.apply_policy_diff(EndpointId(1), &deny).unwrap();
        assert_eq!(counts(&dp), (0, 0));
        dp.detach_endpoint(&ep).unwrap();
        assert_eq!(
            dp.verdict(EndpointId(1), &flow),
            Verdict::Drop { reason: 133 }
        );
    }
}
