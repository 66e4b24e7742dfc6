//! One changed policy → the map diff, without recompiling the endpoint: only the keys the
//! policy's old and new contributions produce are folded again, plus the keys covered by a
//! deny that changed. Cases where the change reaches further (enforcement flips, L7 ports,
//! egress named ports) fall back to a full compile.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::rc::Rc;
use std::sync::Arc;

use weir_identity::Identity;
use weir_policy_model::PolicyName;

use crate::compile::{
    Builder, Compiler, Contribution, EndpointInfo, EndpointPolicy, EnforcementMode, L4, NO_RULE,
    SubjectCache, fold,
};
use crate::l7::{L7Contribution, L7Peers};
use crate::mapstate::{
    EntryAction, MapStateDiff, PREFIX_LENGTHS, PolicyEntry, PolicyKey, port_mask,
};
use crate::peers::PeerEvaluator;
use crate::prefold::PreFold;

/// Contributions by slot.
type Slots = [Option<Arc<Contribution>>];

/// The entry of `key` after deny resolution, from the items and the pre-resolution deny keys.
fn resolved(
    items: &PreFold,
    rules: &Slots,
    deny_keys: &BTreeSet<PolicyKey>,
    key: &PolicyKey,
) -> Option<PolicyEntry> {
    let group = items.items_of(key);
    if group.is_empty() {
        return None;
    }
    let raw = fold(&group, rules);
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
                derived_from.extend(
                    fold(&items.items_of(&dk), rules)
                        .derived_from
                        .iter()
                        .cloned(),
                );
            }
        }
    }
    Some(if hit {
        PolicyEntry {
            action: EntryAction::Deny,
            derived_from: Arc::new(derived_from),
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

/// The identities each contribution selects (`None`: wildcard), evaluated now.
fn evaluate(
    eval: &mut PeerEvaluator<'_>,
    own: &[Arc<Contribution>],
) -> Vec<Option<Rc<[Identity]>>> {
    own.iter().map(|c| eval.eval_contribution(c)).collect()
}

/// The keys a contribution produces for its selected identities (fixed L4 only).
fn keys_of(c: &Contribution, ids: &Option<Rc<[Identity]>>) -> Vec<PolicyKey> {
    let L4::Fixed(keys) = &c.l4 else {
        return Vec::new();
    };
    let one = [Identity::ANY];
    let ids: &[Identity] = ids.as_deref().unwrap_or(&one);
    ids.iter()
        .flat_map(|&id| keys.iter().map(move |k| k.key(id, c.direction)))
        .collect()
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
        let old = &policy.plan;
        if old.never || old.endpoint.as_ref() != Some(ep) || old.needs_full_recompile() {
            return self.recompile(ep, policy);
        }
        let old_part = old.policies.get(name).cloned().unwrap_or_default();
        let old_own: Vec<Arc<Contribution>> = old_part
            .slots
            .iter()
            .filter_map(|s| old.contributions.get(*s as usize).cloned().flatten())
            .collect();
        let mut new_own = Vec::new();
        let part = self.repo.get_prepared(name).and_then(|stored| {
            self.plan_policy(stored, ep, &mut SubjectCache::default(), &mut new_own)
        });
        let new_part = part.clone().unwrap_or_default();
        // Enforcement with the new part in place of the old.
        let mut default_deny = new_part.default_deny;
        // Every other policy: the ranges before and after the name, so that no name is
        // compared on the way.
        let before = old
            .policies
            .range::<PolicyName, _>((Bound::Unbounded, Bound::Excluded(name)));
        let after = old
            .policies
            .range::<PolicyName, _>((Bound::Excluded(name), Bound::Unbounded));
        for p in before.chain(after).map(|(_, p)| p) {
            for (d, x) in default_deny.iter_mut().zip(p.default_deny) {
                *d |= x;
            }
        }
        let enforced = match self.config.enforcement {
            EnforcementMode::Default => default_deny,
            EnforcementMode::Always => [true; 2],
            EnforcementMode::Never => [false; 2],
        };
        if enforced != old.enforced
            || old_own.len() != old_part.slots.len()
            || old_own.iter().chain(&new_own).any(|c| has_l7(c))
        {
            return self.recompile(ep, policy);
        }
        let listing_changed = old_part.has_rules != new_part.has_rules;

        // What the old and the new contributions select, with today's identities (which the
        // endpoint policy is in step with).
        let mut eval = PeerEvaluator::new(&self.identities, &self.config.cluster_name);
        let old_sel = evaluate(&mut eval, &old_own);
        let new_sel = evaluate(&mut eval, &new_own);
        let mut touched: BTreeSet<PolicyKey> = BTreeSet::new();
        for (c, ids) in old_own.iter().zip(&old_sel) {
            touched.extend(keys_of(c, ids));
        }

        // New slots: the old ones first, then free ones, then fresh.
        let plan = Arc::make_mut(&mut policy.plan);
        for s in &old_part.slots {
            if let Some(x) = plan.contributions.get_mut(*s as usize)
                && let Some(c) = x.take()
            {
                plan.index
                    .remove(*s, c.peers.as_deref(), &self.config.cluster_name);
            }
        }
        let mut reuse: Vec<u32> = old_part.slots.iter().rev().copied().collect();
        let mut slots = Vec::with_capacity(new_own.len());
        for c in &new_own {
            let slot = match reuse.pop().or_else(|| plan.free.pop()) {
                Some(s) => s,
                None => {
                    plan.contributions.push(None);
                    u32::try_from(plan.contributions.len() - 1).unwrap_or(NO_RULE)
                }
            };
            if let Some(x) = plan.contributions.get_mut(slot as usize) {
                *x = Some(c.clone());
                plan.index
                    .add(slot, c.peers.as_deref(), &self.config.cluster_name);
            }
            slots.push(slot);
        }
        plan.free.extend(reuse);
        match part {
            Some(mut p) => {
                p.slots = slots.clone();
                plan.policies.insert(Arc::new(name.clone()), p);
            }
            None => {
                plan.policies.remove(name);
            }
        }
        if listing_changed {
            plan.summarise(self.config.enforcement);
            policy.selected_by_ingress = plan.selected_by[0].clone();
            policy.selected_by_egress = plan.selected_by[1].clone();
        }

        // The new contributions' items, per identity.
        let mut b = Builder::default();
        for ((c, ids), &slot) in new_own.iter().zip(&new_sel).zip(&slots) {
            let L4::Fixed(keys) = &c.l4 else { continue };
            match ids {
                None => self.add_keys(&mut b, c, slot as usize, Identity::ANY, keys),
                Some(ids) => {
                    for &id in ids.iter() {
                        self.add_keys(&mut b, c, slot as usize, id, keys);
                    }
                }
            }
        }
        let mut added = b.into_runs();
        touched.extend(added.values().flatten().map(|i| i.key));
        let gone: BTreeSet<u32> = old_part.slots.iter().copied().collect();
        let ids: BTreeSet<Identity> = touched.iter().map(|k| k.identity).collect();
        let items = Arc::make_mut(&mut policy.items);
        for id in ids {
            let mut run = items.run(id);
            run.retain(|i| !gone.contains(&i.rule));
            run.extend(added.remove(&id).unwrap_or_default());
            run.sort_unstable_by_key(|i| (i.key, i.rule));
            items.set(id, run);
        }

        // Deny keys among the touched ones, and which of them changed.
        let deny_keys = Arc::make_mut(&mut policy.deny_keys);
        let mut changed_denies = Vec::new();
        for k in &touched {
            let was = deny_keys.remove(k);
            let is = items.items_of(k).iter().any(|i| i.action.is_deny());
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
            match resolved(items, &plan.contributions, deny_keys, k) {
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

        // L7 lists: drop the old contributions, insert the new ones before the first entry
        // of a later policy (the order a fresh compile lists them in).
        for (port, list) in policy.l7.ports.iter_mut() {
            list.retain(|c| c.origin == usize::MAX || !gone.contains(&(c.origin as u32)));
            let pos = list
                .iter()
                .position(|c| {
                    c.origin == usize::MAX
                        || plan
                            .contributions
                            .get(c.origin)
                            .and_then(|x| x.as_ref())
                            .is_some_and(|x| *x.owner > *name)
                })
                .unwrap_or(list.len());
            let mut fresh = Vec::new();
            for ((c, ids), &slot) in new_own.iter().zip(&new_sel).zip(&slots) {
                let L4::Fixed(keys) = &c.l4 else { continue };
                if c.deny || c.direction != port.0 {
                    continue;
                }
                let peers = match ids {
                    None => L7Peers::Wildcard,
                    Some(ids) => L7Peers::Set(ids.iter().copied().collect()),
                };
                for k in keys {
                    let covers = k.prefix_len == 0
                        || (k.protocol == port.1 && (port.2 & port_mask(k.prefix_len)) == k.port);
                    if covers {
                        fresh.push(L7Contribution {
                            peers: peers.clone(),
                            rules: k.l7.clone(),
                            derived_from: Some(c.rule.clone()),
                            origin: slot as usize,
                        });
                    }
                }
            }
            if !fresh.is_empty() {
                let tail = list.split_off(pos.min(list.len()));
                list.extend(fresh);
                list.extend(tail);
            }
        }
        policy.revision = self.repo.revision();
        diff
    }
}
