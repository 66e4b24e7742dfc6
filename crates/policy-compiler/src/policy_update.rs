//! One changed policy → the map diff, without recompiling the endpoint: only the keys the
//! policy's old and new contributions produce are folded again, plus the keys covered by a
//! deny that changed. Cases where the change reaches further (enforcement flips, L7 ports,
//! egress named ports) fall back to a full compile.

use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;

use weir_identity::Identity;
use weir_policy_model::{Direction, PolicyName};

use crate::compile::{
    Builder, Compiler, Contribution, EndpointInfo, EndpointPolicy, Item, L4, NO_RULE, Plan, fold,
};
use crate::l7::{L7Contribution, L7Peers};
use crate::mapstate::{
    EntryAction, MapStateDiff, PREFIX_LENGTHS, PolicyEntry, PolicyKey, port_mask,
};
use crate::peers::PeerEvaluator;

/// The items of `key` in `items` (sorted by key).
fn items_of<'a>(items: &'a [Item], key: &PolicyKey) -> &'a [Item] {
    let lo = items.partition_point(|i| i.key < *key);
    let hi = items.partition_point(|i| i.key <= *key);
    items.get(lo..hi).unwrap_or(&[])
}

/// The entry of `key` after deny resolution, from the items and the pre-resolution deny keys.
fn resolved(
    items: &[Item],
    rules: &[Arc<Contribution>],
    deny_keys: &BTreeSet<PolicyKey>,
    key: &PolicyKey,
) -> Option<PolicyEntry> {
    let group = items_of(items, key);
    if group.is_empty() {
        return None;
    }
    let raw = fold(group, rules);
    if raw.action.is_deny() {
        return Some(raw);
    }
    let n = if key.identity == Identity::ANY { 1 } else { 2 };
    let mut derived_from = BTreeSet::new();
    let mut hit = false;
    for id in [Identity::ANY, key.identity].into_iter().take(n) {
        for &p in PREFIX_LENGTHS.iter().filter(|&&p| p <= key.prefix_len) {
            let dk = PolicyKey::new(id, key.direction, key.protocol, key.port, p);
            if deny_keys.contains(&dk) {
                hit = true;
                derived_from.extend(fold(items_of(items, &dk), rules).derived_from);
            }
        }
    }
    Some(if hit {
        PolicyEntry {
            action: EntryAction::Deny,
            derived_from,
        }
    } else {
        raw
    })
}

fn has_l7(c: &Contribution) -> bool {
    match &c.l4 {
        L4::Fixed(keys) => keys.iter().any(|k| k.l7.is_some()),
        L4::PerPeer(..) => true,
    }
}

impl Compiler {
    /// Brings `policy` up to date after the policy `name` was added, changed or removed
    /// (call [`Compiler::upsert_policy`] / [`Compiler::remove_policy`] first); every other
    /// policy and every identity must be as `policy` was compiled or last updated. Only the
    /// keys that policy produces (before or after) are recomputed; a change that flips
    /// enforcement, touches L7 rules or egress named ports recompiles the endpoint. Returns
    /// the map change.
    pub fn update_policy(
        &self,
        ep: &EndpointInfo,
        policy: &mut EndpointPolicy,
        name: &PolicyName,
    ) -> MapStateDiff {
        let old_plan = policy.plan.clone();
        if old_plan.never
            || old_plan.endpoint.as_ref() != Some(ep)
            || old_plan.needs_full_recompile()
        {
            return self.recompile(ep, policy);
        }
        let start: usize = old_plan.policies.range(..name).map(|(_, p)| p.len).sum();
        let old_len = old_plan.policies.get(name).map_or(0, |p| p.len);
        let end = start + old_len;
        let mut new_own = Vec::new();
        let part = self
            .repo
            .get(name)
            .and_then(|p| self.plan_policy(p, ep, &mut new_own));
        let mut plan = Plan {
            never: old_plan.never,
            enforced: old_plan.enforced,
            selected_by: Default::default(),
            contributions: Vec::new(),
            policies: old_plan.policies.clone(),
            endpoint: old_plan.endpoint.clone(),
        };
        match part {
            Some(p) => plan.policies.insert(name.clone(), p),
            None => plan.policies.remove(name),
        };
        plan.summarise(self.config.enforcement);
        let old_own = old_plan.contributions.get(start..end).unwrap_or(&[]);
        if plan.enforced != old_plan.enforced
            || old_own.iter().chain(&new_own).any(|c| has_l7(c))
            || old_plan.contributions.len() < end
        {
            return self.recompile(ep, policy);
        }
        let new_len = new_own.len();
        let shift = |r: u32| -> u32 {
            let r = r as usize;
            if r >= end {
                u32::try_from(r - old_len + new_len).unwrap_or(NO_RULE)
            } else {
                r as u32
            }
        };
        plan.contributions = old_plan.contributions.get(..start).unwrap_or(&[]).to_vec();
        plan.contributions.extend(new_own.iter().cloned());
        plan.contributions.extend(
            old_plan
                .contributions
                .get(end..)
                .unwrap_or(&[])
                .iter()
                .cloned(),
        );

        // The new contributions' items, with their global indices.
        let mut b = Builder::default();
        let mut eval = PeerEvaluator::new(&self.identities, &self.config.cluster_name);
        let mut selected: Vec<Option<Rc<[Identity]>>> = Vec::new();
        for (j, c) in new_own.iter().enumerate() {
            let ids = c.peers.as_ref().map(|peers| match peers.as_slice() {
                [one] => eval.eval(one),
                many => {
                    let mut v: Vec<Identity> =
                        many.iter().flat_map(|p| eval.eval(p).to_vec()).collect();
                    v.sort_unstable();
                    v.dedup();
                    v.into()
                }
            });
            selected.push(ids.clone());
            let L4::Fixed(keys) = &c.l4 else { continue };
            match &ids {
                None => self.add_keys(&mut b, c, start + j, Identity::ANY, keys),
                Some(ids) => {
                    for &id in ids.iter() {
                        self.add_keys(&mut b, c, start + j, id, keys);
                    }
                }
            }
        }
        let mut added = b.items;
        added.sort_unstable_by_key(|i| (i.key, i.rule));

        // Touched keys, and the merged items.
        let own = |i: &Item| i.rule != NO_RULE && (start..end).contains(&(i.rule as usize));
        let mut touched: BTreeSet<PolicyKey> = added.iter().map(|i| i.key).collect();
        touched.extend(policy.items.iter().filter(|i| own(i)).map(|i| i.key));
        let mut merged = Vec::with_capacity(policy.items.len() + added.len());
        let mut add_iter = added.into_iter().peekable();
        for i in policy.items.iter().filter(|i| !own(i)) {
            let i = Item {
                rule: if i.rule == NO_RULE {
                    NO_RULE
                } else {
                    shift(i.rule)
                },
                ..*i
            };
            while let Some(a) = add_iter.next_if(|a| (a.key, a.rule) < (i.key, i.rule)) {
                merged.push(a);
            }
            merged.push(i);
        }
        merged.extend(add_iter);

        // Deny keys among the touched ones, and which of them changed.
        let mut deny_keys = (*policy.deny_keys).clone();
        let mut changed_denies = Vec::new();
        for k in &touched {
            let was = deny_keys.remove(k);
            let is = items_of(&merged, k).iter().any(|i| i.action.is_deny());
            if is {
                deny_keys.insert(*k);
            }
            if was || is {
                changed_denies.push(*k);
            }
        }
        let mut redo = touched;
        for d in &changed_denies {
            if d.identity == Identity::ANY {
                redo.extend(
                    policy
                        .map_state
                        .iter()
                        .map(|(k, _)| *k)
                        .filter(|k| d.covers(k)),
                );
            } else {
                redo.extend(
                    policy
                        .map_state
                        .entries_for_identity(d.identity)
                        .map(|(k, _)| *k)
                        .filter(|k| d.covers(k)),
                );
            }
        }

        let mut diff = MapStateDiff::default();
        for k in &redo {
            match resolved(&merged, &plan.contributions, &deny_keys, k) {
                Some(e) => {
                    if policy.map_state.get(k) != Some(&e) {
                        diff.upserts.push((*k, e));
                    }
                }
                None => {
                    if policy.map_state.get(k).is_some() {
                        diff.removals.push(*k);
                    }
                }
            }
        }
        policy.map_state.apply(&diff);

        // L7 lists: drop the old contributions, renumber, insert the new ones in place.
        let ports: Vec<(Direction, u8, u16)> = policy.l7.ports.keys().copied().collect();
        for port in ports {
            let Some(list) = policy.l7.ports.get_mut(&port) else {
                continue;
            };
            list.retain(|c| c.origin == usize::MAX || !(start..end).contains(&c.origin));
            let pos = list
                .iter()
                .position(|c| c.origin >= end)
                .unwrap_or(list.len());
            for c in list.iter_mut().filter(|c| c.origin != usize::MAX) {
                if c.origin >= end {
                    c.origin = c.origin - old_len + new_len;
                }
            }
            let mut fresh = Vec::new();
            for (j, (c, ids)) in new_own.iter().zip(&selected).enumerate() {
                let L4::Fixed(keys) = &c.l4 else { continue };
                if c.deny || c.direction != port.0 {
                    continue;
                }
                let peers = match ids {
                    None => L7Peers::Wildcard,
                    Some(ids) => L7Peers::Set(ids.iter().copied().collect()),
                };
                for k in keys {
                    let covers = if k.prefix_len == 0 {
                        true
                    } else {
                        k.protocol == port.1 && (port.2 & port_mask(k.prefix_len)) == k.port
                    };
                    if covers {
                        fresh.push(L7Contribution {
                            peers: peers.clone(),
                            rules: k.l7.clone(),
                            derived_from: Some(c.rule.clone()),
                            origin: start + j,
                        });
                    }
                }
            }
            let tail = list.split_off(pos.min(list.len()));
            list.extend(fresh);
            list.extend(tail);
        }

        policy.items = Arc::new(merged);
        policy.deny_keys = Arc::new(deny_keys);
        policy.selected_by_ingress = plan.selected_by[0].clone();
        policy.selected_by_egress = plan.selected_by[1].clone();
        policy.revision = self.repo.revision();
        policy.plan = Arc::new(plan);
        diff
    }
}
