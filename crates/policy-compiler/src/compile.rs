//! Rules × identities → per-endpoint [`MapState`] and [`L7Policy`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use weir_identity::{Identity, LabelSet, ReservedIdentity, Selector};
use weir_policy_model::{
    Direction, Enforcement, IpFamily, L7Rules, Peer, PeerRule, Peers, Policy, PolicyName, Port,
    Rule, RuleRef, Section,
};

use crate::decide::{Decision, Flow, decide};
use crate::identities::{IdentityTable, NamedPorts};
use crate::intern::Interner;
use crate::l7::{L7Contribution, L7Peers, L7Policy, L7Verdict};
use crate::mapstate::{
    EntryAction, MapState, MapStateDiff, PolicyEntry, PolicyKey, RuleSet, port_mask,
    port_range_prefixes, proto,
};
use crate::peer_index::{NeedsCache, PeerIndex};
use crate::peers::{PeerEvaluator, peer_is_wildcard, peer_selects};
use crate::prefold::PreFold;
use crate::repository::PreparedPolicy;
use crate::repository::{PolicyRepository, Revision};

/// Priority of HTTP proxy redirects (see [`EntryAction::Redirect`]).
pub const HTTP_REDIRECT_PRIORITY: u8 = 1;
/// Priority of DNS proxy redirects: above HTTP, because `toFQDNs` depends on the DNS proxy
/// seeing every answer.
pub const DNS_REDIRECT_PRIORITY: u8 = 2;

/// The agent's policy enforcement mode (`enable-policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EnforcementMode {
    /// A direction is enforced once some rule selecting the endpoint enables default deny
    /// for it.
    #[default]
    Default,
    /// Every direction of every endpoint is enforced.
    Always,
    /// Nothing is enforced: every map allows everything.
    Never,
}

/// Compiler settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompilerConfig {
    /// The local cluster's name (for the `cluster` entity).
    pub cluster_name: String,
    /// The enforcement mode.
    pub enforcement: EnforcementMode,
    /// Allow the local host to reach every local endpoint (ingress), as Cilium's
    /// `allow-localhost` does by default. A deny rule still wins.
    pub allow_localhost: bool,
    /// Port of the HTTP proxy for traffic leaving endpoints (egress L7 rules).
    pub http_proxy_port: u16,
    /// Port of the HTTP proxy for traffic entering endpoints (ingress L7 rules). Separate, as
    /// Cilium's per-direction listeners are, so the proxy knows whose policy applies.
    pub http_ingress_proxy_port: u16,
    /// Port of the DNS proxy.
    pub dns_proxy_port: u16,
}

impl Default for CompilerConfig {
    fn default() -> Self {
        CompilerConfig {
            cluster_name: "default".to_string(),
            enforcement: EnforcementMode::Default,
            allow_localhost: true,
            http_proxy_port: 15001,
            http_ingress_proxy_port: 15002,
            dns_proxy_port: 15053,
        }
    }
}

/// The local endpoint a map is compiled for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Its identity.
    pub identity: Identity,
    /// Its labels (rules select it with their `subject`).
    pub labels: LabelSet,
    /// Its named container ports (ingress named ports resolve against these).
    pub named_ports: NamedPorts,
}

/// One protocol/port prefix produced by a peer rule, with its L7 rules if any.
#[derive(Debug, Clone)]
pub(crate) struct L4Key {
    pub(crate) protocol: u8,
    pub(crate) port: u16,
    pub(crate) prefix_len: u8,
    pub(crate) l7: Option<Arc<L7Rules>>,
}

impl L4Key {
    pub(crate) fn key(&self, identity: Identity, direction: Direction) -> PolicyKey {
        PolicyKey::new(
            identity,
            direction,
            self.protocol,
            self.port,
            self.prefix_len,
        )
    }
}

/// The L4 part of a contribution.
#[derive(Debug, Clone)]
pub(crate) enum L4 {
    /// Resolved once (no named ports needing the peer's ports).
    Fixed(Vec<L4Key>),
    /// Egress with named ports: resolved against each selected identity's named ports.
    PerPeer(PeerRule, Vec<Option<Arc<L7Rules>>>),
}

/// One peer rule of a rule that selects the endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Contribution {
    pub(crate) direction: Direction,
    pub(crate) deny: bool,
    pub(crate) rule: Arc<RuleRef>,
    /// The policy it comes from.
    pub(crate) owner: Arc<PolicyName>,
    /// `None`: the identity wildcard.
    pub(crate) peers: Option<Vec<Peer>>,
    /// The repository's number of each peer (see [`crate::intern::Interner`]).
    pub(crate) peer_ids: Vec<u64>,
    pub(crate) l4: L4,
}

/// What one policy says for one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PolicyPart {
    /// The slots of its contributions in [`Plan::contributions`], in rule order.
    pub(crate) slots: Vec<u32>,
    /// Whether a selecting rule enables default deny, per direction.
    pub(crate) default_deny: [bool; 2],
    /// Whether a selecting rule has rules or enforcement, per direction (it is then listed in
    /// `selected_by`).
    pub(crate) has_rules: [bool; 2],
}

/// What the rules say for one endpoint before identities come in.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    pub(crate) never: bool,
    pub(crate) enforced: [bool; 2],
    pub(crate) selected_by: [Vec<PolicyName>; 2],
    /// Contributions by slot. A fresh plan fills them in policy-name order, then rule order;
    /// policy updates reuse and free slots, so that items and L7 origins keep their numbers.
    pub(crate) contributions: Vec<Option<Arc<Contribution>>>,
    /// Empty slots of `contributions`.
    pub(crate) free: Vec<u32>,
    /// Slots by the labels their peers need, for identity updates.
    pub(crate) index: PeerIndex,
    /// The policies with a rule selecting the endpoint.
    pub(crate) policies: BTreeMap<Arc<PolicyName>, PolicyPart>,
    /// The endpoint it was planned for.
    pub(crate) endpoint: Option<EndpointInfo>,
}

impl Plan {
    /// Whether identity changes can alter wildcard entries or the set of L7 ports (then the
    /// incremental path recompiles).
    pub(crate) fn needs_full_recompile(&self) -> bool {
        self.contributions
            .iter()
            .flatten()
            .any(|c| matches!(c.l4, L4::PerPeer(..)))
    }

    /// Fills `enforced` and `selected_by` from the policy parts.
    pub(crate) fn summarise(&mut self, mode: EnforcementMode) {
        let mut default_deny = [false; 2];
        self.selected_by = [Vec::new(), Vec::new()];
        for (name, part) in &self.policies {
            for (di, listed) in self.selected_by.iter_mut().enumerate() {
                if part.has_rules.get(di).copied().unwrap_or(false) {
                    listed.push(PolicyName::clone(name));
                }
            }
            for (d, p) in default_deny.iter_mut().zip(part.default_deny) {
                *d |= p;
            }
        }
        self.enforced = match mode {
            EnforcementMode::Default => default_deny,
            EnforcementMode::Always => [true; 2],
            EnforcementMode::Never => [false; 2],
        };
    }
}

/// (direction, protocol, port) of an L7 port.
type L7Port = (Direction, u8, u16);
/// Identities that get the same L7 rules (or none) on one port.
type IdGroup = (Option<Arc<L7Rules>>, BTreeSet<Identity>);

pub(crate) fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// The compiled policy of one endpoint.
#[derive(Debug, Clone, Default)]
pub struct EndpointPolicy {
    /// The repository revision it was compiled at.
    pub revision: Revision,
    /// Whether ingress is default-deny.
    pub ingress_enforced: bool,
    /// Whether egress is default-deny.
    pub egress_enforced: bool,
    /// Policies with a rule that selects the endpoint and has an ingress or ingressDeny
    /// section.
    pub selected_by_ingress: Vec<PolicyName>,
    /// Same for egress.
    pub selected_by_egress: Vec<PolicyName>,
    /// The policy map.
    pub map_state: MapState,
    /// The L7 rules for redirected ports.
    pub l7: L7Policy,
    pub(crate) plan: Arc<Plan>,
    /// Every (key, contribution) pair before folding, per remote identity (shared by classes
    /// of identities), sorted by key then contribution: what an incremental update re-folds
    /// for the keys it touches.
    pub(crate) items: Arc<PreFold>,
    /// The keys that are denies before deny resolution.
    pub(crate) deny_keys: Arc<BTreeSet<PolicyKey>>,
}

impl PartialEq for EndpointPolicy {
    fn eq(&self, o: &Self) -> bool {
        self.ingress_enforced == o.ingress_enforced
            && self.egress_enforced == o.egress_enforced
            && self.selected_by_ingress == o.selected_by_ingress
            && self.selected_by_egress == o.selected_by_egress
            && self.map_state == o.map_state
            && self.l7 == o.l7
    }
}

impl EndpointPolicy {
    /// Whether a direction is default-deny.
    pub fn enforced(&self, d: Direction) -> bool {
        match d {
            Direction::Ingress => self.ingress_enforced,
            Direction::Egress => self.egress_enforced,
        }
    }

    /// The policies that select the endpoint in a direction.
    pub fn selected_by(&self, d: Direction) -> &[PolicyName] {
        match d {
            Direction::Ingress => &self.selected_by_ingress,
            Direction::Egress => &self.selected_by_egress,
        }
    }

    /// [`decide`] on this map, with the selecting policies filled in for a default deny.
    pub fn decide(&self, flow: &Flow) -> Decision {
        let mut d = decide(&self.map_state, flow);
        if d.key.is_none() {
            d.selected_by = self.selected_by(flow.direction).to_vec();
        }
        d
    }

    /// The L7 rules for a request (see [`L7Policy::verdict`]).
    pub fn l7_verdict(
        &self,
        direction: Direction,
        remote: Identity,
        protocol: u8,
        port: u16,
    ) -> L7Verdict {
        self.l7.verdict(direction, remote, protocol, port)
    }
}

/// No rule: a synthesised entry (allow-all of an unenforced direction, host access).
pub(crate) const NO_RULE: u32 = u32::MAX;

/// One (key, contribution) pair. Rules are carried as contribution indices while building, so
/// that gathering costs a push; they become `Arc<RuleRef>` sets once per key in
/// [`Builder::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Item {
    pub(crate) key: PolicyKey,
    /// Index into [`Plan::contributions`], or [`NO_RULE`].
    pub(crate) rule: u32,
    pub(crate) action: EntryAction,
}

/// Hashes an [`Identity`] with one multiplication: the builder looks runs up once per
/// (contribution, identity) pair, and SipHash would cost more than the work it indexes.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // The multiplications mix upwards; the table indexes by the low bits.
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        for &b in chunks.remainder() {
            self.mix(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }
}

impl IdHasher {
    fn mix(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by identity with [`IdHasher`].
pub(crate) type IdMap<V> = HashMap<Identity, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Collects (key, rule, action) triples per remote identity and folds them per key. Keeping
/// one run per identity makes the sort per identity (small, cache-resident) instead of one
/// sort of every item, and the runs are what [`EndpointPolicy`] keeps for later updates.
#[derive(Default)]
pub(crate) struct Builder {
    runs: IdMap<Vec<Item>>,
}

impl Builder {
    fn add(&mut self, key: PolicyKey, action: EntryAction, rule: u32) {
        self.run(key.identity).push(Item { key, rule, action });
    }

    /// The run of one identity, to push its items.
    fn run(&mut self, id: Identity) -> &mut Vec<Item> {
        self.runs.entry(id).or_default()
    }

    /// The items, per identity, in the order they were added.
    pub(crate) fn into_runs(self) -> IdMap<Vec<Item>> {
        self.runs
    }

    /// Folds the items of each key into its entry: deny wins, allows union, the redirect with
    /// the highest priority is taken. `rules` are the contributions the indices point into.
    /// Also returns the items per identity, each run sorted by key then rule.
    fn finish(
        self,
        rules: &[Option<Arc<Contribution>>],
    ) -> (
        BTreeMap<PolicyKey, PolicyEntry>,
        BTreeMap<Identity, Vec<Item>>,
    ) {
        let mut runs: Vec<(Identity, Vec<Item>)> = self
            .runs
            .into_iter()
            .filter(|(_, r)| !r.is_empty())
            .collect();
        runs.sort_unstable_by_key(|(id, _)| *id);
        let mut out = Vec::new();
        let mut sets = RuleSets::default();
        for (_, run) in runs.iter_mut() {
            sort_run(run);
            fold_run(run, rules, &mut sets, &mut out);
        }
        // Sorted input (runs in identity order, keys start with the identity): both maps are
        // bulk-built.
        (out.into_iter().collect(), runs.into_iter().collect())
    }
}

/// Sorts the items of one identity by key, then rule.
pub(crate) fn sort_run(run: &mut [Item]) {
    // Same order as (key, rule): the identity is the run's, the rest packs into one integer
    // in field order.
    run.sort_unstable_by_key(|a| {
        let k = a.key;
        (u64::from(dir_index(k.direction) as u8) << 61)
            | (u64::from(k.protocol) << 53)
            | (u64::from(k.port) << 37)
            | (u64::from(k.prefix_len) << 32)
            | u64::from(a.rule)
    });
}

/// Folds a sorted run (one identity) into one entry per key, appended to `out` in key order.
fn fold_run(
    run: &[Item],
    rules: &[Option<Arc<Contribution>>],
    sets: &mut RuleSets,
    out: &mut Vec<(PolicyKey, PolicyEntry)>,
) {
    let mut rest = run;
    while let Some(first) = rest.first() {
        let n = rest
            .iter()
            .position(|i| i.key != first.key)
            .unwrap_or(rest.len());
        let (group, tail) = rest.split_at(n);
        out.push((first.key, fold_with(group, rules, sets)));
        rest = tail;
    }
}

/// Contributions with fixed keys, grouped by the identity set they select (see
/// [`Compiler::compile`]).
#[derive(Default)]
struct Groups {
    /// Per group: the identities and the contribution indices, in slot order.
    groups: Vec<(Rc<[Identity]>, Vec<u32>)>,
    /// Group by the address of a set shared through the peer evaluator's cache.
    by_ptr: HashMap<usize, u32, std::hash::BuildHasherDefault<IdHasher>>,
    /// Group by content, for the unions of several peers (each built afresh).
    by_content: HashMap<Rc<[Identity]>, u32>,
}

/// Where an identity's entries come from when the output is assembled.
#[derive(Clone, Copy)]
enum Row {
    /// A class's entries, stamped.
    Class(u32),
    /// A run of its own (index into the own runs).
    Own(usize),
}

impl Groups {
    /// Adds contribution `ci`, which selects `ids` through `n_peers` peers.
    fn add(&mut self, ids: &Rc<[Identity]>, n_peers: usize, ci: usize) {
        let next = u32::try_from(self.groups.len()).unwrap_or(u32::MAX);
        let g = if n_peers == 1 {
            // Kept alive in `groups`, so the address is not reused while the map lives.
            *self
                .by_ptr
                .entry(Rc::as_ptr(ids) as *const Identity as usize)
                .or_insert(next)
        } else {
            *self.by_content.entry(ids.clone()).or_insert(next)
        };
        if g == next {
            self.groups.push((ids.clone(), Vec::new()));
        }
        if let Some((_, cs)) = self.groups.get_mut(g as usize) {
            cs.push(u32::try_from(ci).unwrap_or(NO_RULE));
        }
    }

    /// The items of `sig`'s groups with `id` in their keys, appended to `out`.
    fn push_items(
        &self,
        sig: &[u32],
        templates: &[Vec<(PolicyKey, EntryAction)>],
        id: Identity,
        out: &mut Vec<Item>,
    ) {
        for &g in sig {
            let Some((_, cs)) = self.groups.get(g as usize) else {
                continue;
            };
            for &ci in cs {
                let Some(t) = templates.get(ci as usize) else {
                    continue;
                };
                out.extend(t.iter().map(|&(key, action)| Item {
                    key: PolicyKey {
                        identity: id,
                        ..key
                    },
                    rule: ci,
                    action,
                }));
            }
        }
    }

    /// The folded entries of the groups plus the items in `b` (which hold every item that is
    /// not from a group), and the pre-fold items to keep.
    fn finish(
        self,
        b: Builder,
        templates: &[Vec<(PolicyKey, EntryAction)>],
        rules: &[Option<Arc<Contribution>>],
    ) -> (BTreeMap<PolicyKey, PolicyEntry>, PreFold) {
        // The groups selecting each identity, in group order.
        let mut sigs: IdMap<Vec<u32>> = IdMap::default();
        for (g, (ids, _)) in self.groups.iter().enumerate() {
            let g = u32::try_from(g).unwrap_or(u32::MAX);
            for &id in ids.iter() {
                sigs.entry(id).or_default().push(g);
            }
        }
        let mut own_runs = b.into_runs();
        let mut rows: Vec<(Identity, Row)> = Vec::with_capacity(sigs.len() + own_runs.len());
        let mut class_by_sig: HashMap<Vec<u32>, u32, std::hash::BuildHasherDefault<IdHasher>> =
            HashMap::default();
        let mut class_of: IdMap<u32> = IdMap::default();
        for (id, sig) in sigs {
            if let Some(run) = own_runs.get_mut(&id) {
                // Items of its own too: folded alone, with its group items.
                self.push_items(&sig, templates, id, run);
                continue;
            }
            let next = u32::try_from(class_by_sig.len()).unwrap_or(u32::MAX);
            let c = *class_by_sig.entry(sig).or_insert(next);
            class_of.insert(id, c);
            rows.push((id, Row::Class(c)));
        }
        let mut sets = RuleSets::default();
        let mut class_sigs: Vec<(u32, Vec<u32>)> =
            class_by_sig.into_iter().map(|(s, c)| (c, s)).collect();
        class_sigs.sort_unstable_by_key(|(c, _)| *c);
        let mut classes: Vec<Arc<[Item]>> = Vec::with_capacity(class_sigs.len());
        let mut class_entries: Vec<Vec<(PolicyKey, PolicyEntry)>> =
            Vec::with_capacity(class_sigs.len());
        for (_, sig) in &class_sigs {
            let mut run = Vec::new();
            self.push_items(sig, templates, Identity::ANY, &mut run);
            sort_run(&mut run);
            let mut folded = Vec::new();
            fold_run(&run, rules, &mut sets, &mut folded);
            class_entries.push(folded);
            classes.push(run.into());
        }
        let mut own: Vec<(Identity, Vec<Item>)> =
            own_runs.drain().filter(|(_, r)| !r.is_empty()).collect();
        for (i, (id, run)) in own.iter_mut().enumerate() {
            sort_run(run);
            rows.push((*id, Row::Own(i)));
        }
        rows.sort_unstable_by_key(|(id, _)| *id);
        // Members not yet emitted, per class: the last one takes the entries instead of a copy.
        let mut left = vec![0u32; class_entries.len()];
        for (_, row) in &rows {
            if let Row::Class(c) = row
                && let Some(n) = left.get_mut(*c as usize)
            {
                *n += 1;
            }
        }
        // Emitted in identity order, each identity's keys in order: the map is bulk-built.
        let mut out: Vec<(PolicyKey, PolicyEntry)> = Vec::new();
        let with_id = |id: Identity, k: &PolicyKey| PolicyKey { identity: id, ..*k };
        for (id, row) in rows {
            match row {
                Row::Class(c) => {
                    let (Some(n), Some(es)) =
                        (left.get_mut(c as usize), class_entries.get_mut(c as usize))
                    else {
                        continue;
                    };
                    *n -= 1;
                    if *n == 0 {
                        out.extend(
                            std::mem::take(es)
                                .into_iter()
                                .map(|(k, e)| (with_id(id, &k), e)),
                        );
                    } else {
                        out.extend(es.iter().map(|(k, e)| (with_id(id, k), e.clone())));
                    }
                }
                Row::Own(i) => {
                    if let Some((_, run)) = own.get(i) {
                        fold_run(run, rules, &mut sets, &mut out);
                    }
                }
            }
        }
        let entries = out.into_iter().collect();
        let prefold = PreFold::new(classes, class_of, own.into_iter().collect());
        (entries, prefold)
    }
}

/// The `derived_from` sets built so far, by the contribution indices they come from: many
/// keys (the ports of one rule, the identities a group of rules selects) carry the same
/// rules, and cloning a built set costs no `RuleRef` comparisons.
#[derive(Default)]
pub(crate) struct RuleSets {
    sets: HashMap<Vec<u32>, RuleSet, std::hash::BuildHasherDefault<IdHasher>>,
    scratch: Vec<u32>,
}

/// The entry of one key from its items (all with that key, sorted by rule).
pub(crate) fn fold(group: &[Item], rules: &[Option<Arc<Contribution>>]) -> PolicyEntry {
    fold_with(group, rules, &mut RuleSets::default())
}

/// [`fold`], reusing the sets in `sets`.
pub(crate) fn fold_with(
    group: &[Item],
    rules: &[Option<Arc<Contribution>>],
    sets: &mut RuleSets,
) -> PolicyEntry {
    let is_deny = group.iter().any(|i| i.action.is_deny());
    let mut redirect: Option<(u8, u16)> = None;
    let mut last = NO_RULE;
    sets.scratch.clear();
    for i in group {
        if i.action.is_deny() != is_deny {
            continue;
        }
        if let EntryAction::Redirect {
            proxy_port,
            priority,
        } = i.action
        {
            redirect = redirect.max(Some((priority, proxy_port)));
        }
        if i.rule != last && matches!(rules.get(i.rule as usize), Some(Some(_))) {
            sets.scratch.push(i.rule);
        }
        last = i.rule;
    }
    // Collected, then bulk-built: in a fresh plan slot order is rule order, so the sort
    // inside `collect` sees a sorted run.
    let build = |scratch: &[u32]| -> RuleSet {
        Arc::new(
            scratch
                .iter()
                .filter_map(|&r| rules.get(r as usize).and_then(|c| c.as_ref()))
                .map(|c| c.rule.clone())
                .collect(),
        )
    };
    let derived_from = if sets.scratch.len() <= 2 {
        // As cheap to build as to copy: not worth a lookup.
        build(&sets.scratch)
    } else {
        match sets.sets.get(sets.scratch.as_slice()) {
            Some(set) => set.clone(),
            None => {
                let set = build(&sets.scratch);
                sets.sets.insert(sets.scratch.clone(), set.clone());
                set
            }
        }
    };
    let action = if is_deny {
        EntryAction::Deny
    } else {
        match redirect {
            Some((priority, proxy_port)) => EntryAction::Redirect {
                proxy_port,
                priority,
            },
            None => EntryAction::Allow,
        }
    };
    PolicyEntry {
        action,
        derived_from,
    }
}

/// Turns every non-deny entry covered by a deny (in `entries` or in `extra_denies`) into a
/// deny carrying the rules of every deny that covers it. This establishes the invariant
/// documented on [`MapState`].
fn resolve_denies(
    entries: &mut BTreeMap<PolicyKey, PolicyEntry>,
    extra_denies: &[(PolicyKey, PolicyEntry)],
) {
    let denies: HashMap<PolicyKey, &PolicyEntry, std::hash::BuildHasherDefault<IdHasher>> = entries
        .iter()
        .filter(|(_, e)| e.action.is_deny())
        .map(|(k, e)| (*k, e))
        .chain(extra_denies.iter().map(|(k, e)| (*k, e)))
        .collect();
    if denies.is_empty() {
        return;
    }
    let prefixes: BTreeSet<u8> = denies.keys().map(|k| k.prefix_len).collect();
    let mut conversions = Vec::new();
    for (k, e) in entries.iter() {
        if e.action.is_deny() {
            continue;
        }
        let n = if k.identity == Identity::ANY { 1 } else { 2 };
        let mut rules = BTreeSet::new();
        let mut hit = false;
        for id in [Identity::ANY, k.identity].into_iter().take(n) {
            for &p in prefixes.iter().filter(|&&p| p <= k.prefix_len) {
                let dk = PolicyKey::new(id, k.direction, k.protocol, k.port, p);
                if let Some(d) = denies.get(&dk) {
                    hit = true;
                    rules.extend(d.derived_from.iter().cloned());
                }
            }
        }
        if hit {
            conversions.push((*k, rules));
        }
    }
    for (k, derived_from) in conversions {
        entries.insert(
            k,
            PolicyEntry {
                action: EntryAction::Deny,
                derived_from: Arc::new(derived_from),
            },
        );
    }
}

/// Resolves a peer rule's L4 part. `named` looks up a named port (in the endpoint's ports for
/// ingress, the peer's for egress); unresolvable names yield nothing.
fn resolve_l4(
    pr: &PeerRule,
    l7s: &[Option<Arc<L7Rules>>],
    named: &dyn Fn(&str) -> Vec<(u8, u16)>,
) -> Vec<L4Key> {
    if pr.is_l3_only() {
        return vec![L4Key {
            protocol: 0,
            port: 0,
            prefix_len: 0,
            l7: None,
        }];
    }
    let mut out = Vec::new();
    for (i, rule) in pr.ports.iter().enumerate() {
        let l7 = l7s.get(i).cloned().flatten();
        let mut push = |protocol: u8, port: u16, prefix_len: u8| {
            out.push(L4Key {
                protocol,
                port,
                prefix_len,
                l7: l7.clone(),
            })
        };
        if rule.ports.is_empty() {
            for p in [proto::TCP, proto::UDP, proto::SCTP] {
                push(p, 0, 8);
            }
        }
        for pp in &rule.ports {
            let protos = pp.protocol.numbers();
            match &pp.port {
                Port::Number(0) => protos.iter().for_each(|&p| push(p, 0, 8)),
                Port::Number(lo) => {
                    let hi = pp.end_port.filter(|hi| hi > lo).unwrap_or(*lo);
                    for (start, plen) in port_range_prefixes(*lo, hi) {
                        protos.iter().for_each(|&p| push(p, start, plen));
                    }
                }
                Port::Named(name) => {
                    for (p, port) in named(name) {
                        if protos.contains(&p) {
                            push(p, port, 24);
                        }
                    }
                }
            }
        }
    }
    for icmp in &pr.icmps {
        let p = match icmp.family {
            IpFamily::V4 => proto::ICMP,
            IpFamily::V6 => proto::ICMPV6,
        };
        out.push(L4Key {
            protocol: p,
            port: u16::from(icmp.icmp_type),
            prefix_len: 24,
            l7: None,
        });
    }
    out
}

/// The L7 rules of each port rule, shared; empty rule lists count as none (an L4 allow).
fn port_l7s(pr: &PeerRule) -> Vec<Option<Arc<L7Rules>>> {
    pr.ports
        .iter()
        .map(|r| match &r.l7 {
            Some(L7Rules::Http(h)) if h.is_empty() => None,
            Some(L7Rules::Dns(d)) if d.is_empty() => None,
            other => other.clone().map(Arc::new),
        })
        .collect()
}

/// What a plan needs of a rule besides its contributions, kept apart from the rule so that
/// planning reads a few bytes per rule.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleSummary {
    /// The repository's number of its subject.
    pub(crate) subject: u64,
    /// Whether it enables default deny, per direction.
    pub(crate) default_deny: [bool; 2],
    /// Whether it has rules or enforcement, per direction.
    pub(crate) has_rules: [bool; 2],
}

impl RuleSummary {
    /// The summary of `rule`, whose subject has number `subject`.
    pub(crate) fn new(rule: &Rule, subject: u64) -> Self {
        let mut out = RuleSummary {
            subject,
            default_deny: [false; 2],
            has_rules: [false; 2],
        };
        for (di, sections) in [&rule.ingress, &rule.egress].into_iter().enumerate() {
            if let (Some(d), Some(h)) = (out.default_deny.get_mut(di), out.has_rules.get_mut(di)) {
                *d = sections.enforcement == Enforcement::DefaultDeny;
                *h = sections.enforcement != Enforcement::None
                    || !sections.allow.is_empty()
                    || !sections.deny.is_empty();
            }
        }
        out
    }
}

/// Whether rule subjects select one endpoint, per distinct selector: many rules share their
/// subject. Keyed by the repository's number of the selector.
#[derive(Default)]
pub(crate) struct SubjectCache {
    seen: HashMap<u64, bool, std::hash::BuildHasherDefault<IdHasher>>,
}

impl SubjectCache {
    /// `subject.matches(labels)`; `id` is the subject's number, and `labels` must be the same
    /// in every call.
    pub(crate) fn matches(&mut self, id: u64, subject: &Selector, labels: &LabelSet) -> bool {
        *self
            .seen
            .entry(id)
            .or_insert_with(|| subject.matches(labels))
    }
}

/// A peer rule's contribution as far as it does not depend on the endpoint, built once when
/// the policy is stored so that a compile only clones `Arc`s.
#[derive(Debug, Clone)]
pub(crate) enum Prepared {
    /// Complete.
    Ready(Arc<Contribution>),
    /// Ingress with named ports: its L4 keys come from the endpoint's named ports, so `base`
    /// (with no keys) gets them at plan time.
    IngressNamed {
        base: Arc<Contribution>,
        rule: PeerRule,
        l7s: Vec<Option<Arc<L7Rules>>>,
    },
}

/// The contributions of every rule of `policy`, per rule, in the order a plan lists them:
/// ingress then egress, allows then denies, peer rules in order. Peer rules that allow
/// nothing are left out.
pub(crate) fn prepare(
    policy: &Policy,
    owner: &Arc<PolicyName>,
    numbers: &mut Interner<Peer>,
) -> Vec<Vec<Prepared>> {
    policy
        .rules
        .iter()
        .map(|rule| {
            let mut out = Vec::new();
            for (dir, sections) in [
                (Direction::Ingress, &rule.ingress),
                (Direction::Egress, &rule.egress),
            ] {
                let (allow_sec, deny_sec) = match dir {
                    Direction::Ingress => (Section::Ingress, Section::IngressDeny),
                    Direction::Egress => (Section::Egress, Section::EgressDeny),
                };
                for (deny, section, list) in [
                    (false, allow_sec, &sections.allow),
                    (true, deny_sec, &sections.deny),
                ] {
                    for pr in list.iter().filter(|pr| !pr.allows_nothing()) {
                        let rule_ref = Arc::new(RuleRef {
                            policy: rule.origin.clone(),
                            spec: rule.spec,
                            multi_spec: rule.multi_spec,
                            section,
                            index: pr.index,
                        });
                        let peers = match &pr.peers {
                            Peers::Any => None,
                            Peers::List(l) if l.iter().any(peer_is_wildcard) => None,
                            Peers::List(l) => Some(l.clone()),
                        };
                        let peer_ids = peers.iter().flatten().map(|p| numbers.intern(p)).collect();
                        let l7s = port_l7s(pr);
                        let named = has_named_port(pr);
                        let l4 = match (dir, named) {
                            (Direction::Egress, true) => L4::PerPeer(pr.clone(), l7s.clone()),
                            (Direction::Ingress, true) => L4::Fixed(Vec::new()),
                            (_, false) => L4::Fixed(resolve_l4(pr, &l7s, &|_| Vec::new())),
                        };
                        let c = Arc::new(Contribution {
                            direction: dir,
                            deny,
                            rule: rule_ref,
                            owner: owner.clone(),
                            peers,
                            peer_ids,
                            l4,
                        });
                        out.push(if dir == Direction::Ingress && named {
                            Prepared::IngressNamed {
                                base: c,
                                rule: pr.clone(),
                                l7s,
                            }
                        } else {
                            Prepared::Ready(c)
                        });
                    }
                }
            }
            out
        })
        .collect()
}

fn has_named_port(pr: &PeerRule) -> bool {
    pr.ports
        .iter()
        .flat_map(|r| &r.ports)
        .any(|p| matches!(p.port, Port::Named(_)))
}

fn named_lookup(ports: &NamedPorts, name: &str) -> Vec<(u8, u16)> {
    ports.get(name).copied().into_iter().collect()
}

/// Compiles policies and identities into endpoint policies.
#[derive(Debug, Clone, Default)]
pub struct Compiler {
    pub(crate) config: CompilerConfig,
    pub(crate) repo: PolicyRepository,
    pub(crate) identities: IdentityTable,
}

impl Compiler {
    /// A compiler with no policies and only the reserved identities.
    pub fn new(config: CompilerConfig) -> Self {
        Compiler {
            config,
            repo: PolicyRepository::new(),
            identities: IdentityTable::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &CompilerConfig {
        &self.config
    }

    /// The policies.
    pub fn repository(&self) -> &PolicyRepository {
        &self.repo
    }

    /// The identities.
    pub fn identities(&self) -> &IdentityTable {
        &self.identities
    }

    /// Adds or replaces a policy. Endpoints it selects (now or before) need
    /// [`Compiler::recompile`].
    pub fn upsert_policy(&mut self, policy: Policy) -> Revision {
        self.repo.upsert(policy)
    }

    /// Removes a policy.
    pub fn remove_policy(&mut self, name: &PolicyName) -> Option<Revision> {
        self.repo.remove(name)
    }

    /// Adds or replaces an identity; then call [`Compiler::update_identity`] per endpoint.
    pub fn upsert_identity(&mut self, id: Identity, labels: LabelSet, named_ports: NamedPorts) {
        self.identities.upsert(id, labels, named_ports);
    }

    /// [`Compiler::upsert_identity`] with labels the caller already holds behind an `Arc` (the
    /// allocator's), so they are stored once rather than copied.
    pub fn upsert_identity_shared(
        &mut self,
        id: Identity,
        labels: Arc<LabelSet>,
        named_ports: NamedPorts,
    ) {
        self.identities.upsert_shared(id, labels, named_ports);
    }

    /// Removes an identity (reserved ones stay); then call [`Compiler::update_identity`].
    pub fn remove_identity(&mut self, id: Identity) -> bool {
        self.identities.remove(id)
    }

    pub(crate) fn action_for(
        &self,
        deny: bool,
        direction: Direction,
        l7: Option<&Arc<L7Rules>>,
    ) -> EntryAction {
        if deny {
            return EntryAction::Deny;
        }
        match l7.map(|r| r.as_ref()) {
            Some(L7Rules::Http(_)) => EntryAction::Redirect {
                proxy_port: match direction {
                    Direction::Egress => self.config.http_proxy_port,
                    Direction::Ingress => self.config.http_ingress_proxy_port,
                },
                priority: HTTP_REDIRECT_PRIORITY,
            },
            Some(L7Rules::Dns(_)) => EntryAction::Redirect {
                proxy_port: self.config.dns_proxy_port,
                priority: DNS_REDIRECT_PRIORITY,
            },
            None => EntryAction::Allow,
        }
    }

    fn plan(&self, ep: &EndpointInfo) -> Plan {
        let mut plan = Plan {
            never: self.config.enforcement == EnforcementMode::Never,
            endpoint: Some(ep.clone()),
            ..Plan::default()
        };
        let mut own = Vec::new();
        let mut parts = Vec::new();
        let mut subjects = SubjectCache::default();
        let mut needs = NeedsCache::default();
        for stored in self.repo.iter_prepared() {
            own.clear();
            if let Some(mut part) = self.plan_policy(stored, ep, &mut subjects, &mut own) {
                for c in own.drain(..) {
                    let slot = u32::try_from(plan.contributions.len()).unwrap_or(NO_RULE);
                    plan.index.add_numbered(
                        slot,
                        c.peers.as_deref(),
                        &c.peer_ids,
                        &self.config.cluster_name,
                        &mut needs,
                    );
                    part.slots.push(slot);
                    plan.contributions.push(Some(c));
                }
                parts.push((stored.3.clone(), part));
            }
        }
        // In name order: bulk-built.
        plan.policies = parts.into_iter().collect();
        plan.summarise(self.config.enforcement);
        plan
    }

    /// The contributions of one policy's rules that select `ep`, appended to `out`; `None` if
    /// no rule selects it. `prepared` is the policy's [`prepare`]d contributions.
    pub(crate) fn plan_policy(
        &self,
        (policy, prepared, summaries, _): PreparedPolicy<'_>,
        ep: &EndpointInfo,
        subjects: &mut SubjectCache,
        out: &mut Vec<Arc<Contribution>>,
    ) -> Option<PolicyPart> {
        let mut part = PolicyPart::default();
        let mut selected = false;
        for ((rule, prepared), summary) in policy.rules.iter().zip(prepared).zip(summaries) {
            if !subjects.matches(summary.subject, &rule.subject, &ep.labels) {
                continue;
            }
            selected = true;
            for (d, s) in part.default_deny.iter_mut().zip(summary.default_deny) {
                *d |= s;
            }
            for (h, s) in part.has_rules.iter_mut().zip(summary.has_rules) {
                *h |= s;
            }
            out.extend(prepared.iter().map(|p| match p {
                Prepared::Ready(c) => c.clone(),
                Prepared::IngressNamed { base, rule, l7s } => Arc::new(Contribution {
                    l4: L4::Fixed(resolve_l4(rule, l7s, &|n| named_lookup(&ep.named_ports, n))),
                    ..Contribution::clone(base)
                }),
            }));
        }
        selected.then_some(part)
    }

    /// The L4 keys of a contribution for one identity (or the wildcard).
    pub(crate) fn keys_for(&self, c: &Contribution, id: Identity) -> Vec<L4Key> {
        match &c.l4 {
            L4::Fixed(k) => k.clone(),
            L4::PerPeer(pr, l7s) => {
                if id == Identity::ANY {
                    resolve_l4(pr, l7s, &|n| {
                        let mut v: Vec<(u8, u16)> = self
                            .identities
                            .iter()
                            .filter_map(|(_, i)| i.named_ports.get(n).copied())
                            .collect();
                        v.sort_unstable();
                        v.dedup();
                        v
                    })
                } else {
                    let ports = self.identities.get(id).map(|i| &i.named_ports);
                    resolve_l4(pr, l7s, &|n| {
                        ports.map(|p| named_lookup(p, n)).unwrap_or_default()
                    })
                }
            }
        }
    }

    /// A contribution's keys (for [`Identity::ANY`]; only the identity changes per peer)
    /// with their actions, computed once per contribution rather than per selected identity.
    pub(crate) fn templates(
        &self,
        c: &Contribution,
        keys: &[L4Key],
    ) -> Vec<(PolicyKey, EntryAction)> {
        keys.iter()
            .map(|k| {
                (
                    k.key(Identity::ANY, c.direction),
                    self.action_for(c.deny, c.direction, k.l7.as_ref()),
                )
            })
            .collect()
    }

    pub(crate) fn add_keys(
        &self,
        b: &mut Builder,
        c: &Contribution,
        ci: usize,
        id: Identity,
        keys: &[L4Key],
    ) {
        // One identity: pushed directly, without the template vector `compile` amortises.
        let rule = u32::try_from(ci).unwrap_or(NO_RULE);
        b.run(id).extend(keys.iter().map(|k| Item {
            key: k.key(id, c.direction),
            rule,
            action: self.action_for(c.deny, c.direction, k.l7.as_ref()),
        }));
    }

    /// Compiles the policy of one endpoint from scratch.
    ///
    /// Contributions with fixed keys are grouped by the identity set they select, and the
    /// identities by the groups that select them: identities selected by the same groups (a
    /// class) get the same entries up to the identity, so each class is folded once and its
    /// entries are stamped with each member. Only identities with items of their own
    /// (wildcard, synthesised and egress named-port entries) are folded one by one.
    pub fn compile(&self, ep: &EndpointInfo) -> EndpointPolicy {
        let mut plan = self.plan(ep);
        // Moved out rather than cloned: the kept plan's copy is only read after a policy
        // update re-summarises it.
        let [selected_by_ingress, selected_by_egress] = std::mem::take(&mut plan.selected_by);
        let plan = Arc::new(plan);
        let mut b = Builder::default();
        let mut eval = PeerEvaluator::new(&self.identities, &self.config.cluster_name);
        // Identities selected by each contribution (`None`: wildcard).
        let mut selected: Vec<Option<Rc<[Identity]>>> = Vec::new();
        let mut groups = Groups::default();
        // Keys (with `Identity::ANY`) and actions of each grouped contribution.
        let mut templates: Vec<Vec<(PolicyKey, EntryAction)>> = Vec::new();
        if !plan.never {
            templates.resize_with(plan.contributions.len(), Vec::new);
            for (ci, c) in plan.contributions.iter().enumerate() {
                let Some(c) = c else {
                    selected.push(None);
                    continue;
                };
                let ids = eval.eval_contribution(c);
                match (&ids, &c.l4) {
                    (None, _) => {
                        let keys = self.keys_for(c, Identity::ANY);
                        self.add_keys(&mut b, c, ci, Identity::ANY, &keys);
                    }
                    (Some(ids), L4::Fixed(keys)) => {
                        if !keys.is_empty()
                            && !ids.is_empty()
                            && let Some(t) = templates.get_mut(ci)
                        {
                            *t = self.templates(c, keys);
                            groups.add(ids, c.peers.as_deref().map_or(0, <[Peer]>::len), ci);
                        }
                    }
                    (Some(ids), L4::PerPeer(..)) => {
                        for &id in ids.iter() {
                            let keys = self.keys_for(c, id);
                            self.add_keys(&mut b, c, ci, id, &keys);
                        }
                    }
                }
                selected.push(ids);
            }
        }
        self.add_synthetic(&mut b, &plan, None);
        let (mut entries, items) = groups.finish(b, &templates, &plan.contributions);
        let deny_keys: BTreeSet<PolicyKey> = entries
            .iter()
            .filter(|(_, e)| e.action.is_deny())
            .map(|(k, _)| *k)
            .collect();
        resolve_denies(&mut entries, &[]);
        let l7 = if plan.never {
            L7Policy::default()
        } else {
            self.build_l7(&plan, &selected)
        };
        EndpointPolicy {
            revision: self.repo.revision(),
            ingress_enforced: plan.enforced[0],
            egress_enforced: plan.enforced[1],
            selected_by_ingress,
            selected_by_egress,
            map_state: MapState { entries },
            l7,
            plan,
            items: Arc::new(items),
            deny_keys: Arc::new(deny_keys),
        }
    }

    /// Allow-all for unenforced directions and host access. With `only`, just the entries of
    /// that identity.
    pub(crate) fn add_synthetic(&self, b: &mut Builder, plan: &Plan, only: Option<Identity>) {
        let want = |id: Identity| only.is_none_or(|o| o == id);
        for dir in [Direction::Ingress, Direction::Egress] {
            if !plan.enforced[dir_index(dir)] && want(Identity::ANY) {
                b.add(
                    PolicyKey::l3(Identity::ANY, dir),
                    EntryAction::Allow,
                    NO_RULE,
                );
            }
        }
        let host = Identity::from(ReservedIdentity::Host);
        if self.config.allow_localhost && !plan.never && want(host) {
            b.add(
                PolicyKey::l3(host, Direction::Ingress),
                EntryAction::Allow,
                NO_RULE,
            );
        }
    }

    fn build_l7(&self, plan: &Plan, selected: &[Option<Rc<[Identity]>>]) -> L7Policy {
        // Per contribution and identity (or wildcard), its keys; only PerPeer needs this.
        let keys_of = |c: &Contribution, id: Identity| -> Vec<L4Key> { self.keys_for(c, id) };
        let mut ports: BTreeSet<(Direction, u8, u16)> = BTreeSet::new();
        for (c, ids) in plan.contributions.iter().zip(selected) {
            let Some(c) = c else { continue };
            if c.deny {
                continue;
            }
            let mut note = |keys: &[L4Key]| {
                for k in keys.iter().filter(|k| k.l7.is_some() && k.prefix_len == 24) {
                    ports.insert((c.direction, k.protocol, k.port));
                }
            };
            match (&c.l4, ids) {
                (L4::Fixed(keys), _) => note(keys),
                (L4::PerPeer(..), None) => note(&keys_of(c, Identity::ANY)),
                (L4::PerPeer(..), Some(ids)) => {
                    for &id in ids.iter() {
                        note(&keys_of(c, id));
                    }
                }
            }
        }
        let mut lists: BTreeMap<(Direction, u8, u16), Vec<L7Contribution>> =
            ports.iter().map(|p| (*p, Vec::new())).collect();
        // The L7 ports a key covers, by range query.
        let covered = |dir: Direction, k: &L4Key| -> Vec<(Direction, u8, u16)> {
            let (lo, hi) = if k.prefix_len == 0 {
                ((dir, 0, 0), (dir, u8::MAX, u16::MAX))
            } else {
                let hi_port = k.port | !port_mask(k.prefix_len);
                ((dir, k.protocol, k.port), (dir, k.protocol, hi_port))
            };
            ports.range(lo..=hi).copied().collect()
        };
        for (i, (c, ids)) in plan.contributions.iter().zip(selected).enumerate() {
            let Some(c) = c else { continue };
            if c.deny {
                continue;
            }
            let contribution = |peers: L7Peers, rules: Option<Arc<L7Rules>>| L7Contribution {
                peers,
                rules,
                derived_from: Some(c.rule.clone()),
                origin: i,
            };
            match (&c.l4, ids) {
                (L4::PerPeer(..), Some(ids)) => {
                    // Group identities by the rules their resolution gives on each port.
                    let mut groups: BTreeMap<L7Port, Vec<IdGroup>> = BTreeMap::new();
                    for &id in ids.iter() {
                        for k in keys_of(c, id) {
                            for port in covered(c.direction, &k) {
                                let g = groups.entry(port).or_default();
                                let same = |x: &&mut (Option<Arc<L7Rules>>, _)| match (&x.0, &k.l7)
                                {
                                    (None, None) => true,
                                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                                    _ => false,
                                };
                                match g.iter_mut().find(same) {
                                    Some(x) => {
                                        x.1.insert(id);
                                    }
                                    None => g.push((k.l7.clone(), BTreeSet::from([id]))),
                                }
                            }
                        }
                    }
                    for (port, g) in groups {
                        if let Some(list) = lists.get_mut(&port) {
                            for (rules, set) in g {
                                list.push(contribution(L7Peers::Set(set), rules));
                            }
                        }
                    }
                }
                (l4, ids) => {
                    let wildcard_keys;
                    let keys: &[L4Key] = match l4 {
                        L4::Fixed(keys) => keys,
                        L4::PerPeer(..) => {
                            wildcard_keys = keys_of(c, Identity::ANY);
                            &wildcard_keys
                        }
                    };
                    let mut peers: Option<L7Peers> = None;
                    for k in keys {
                        for port in covered(c.direction, k) {
                            let Some(list) = lists.get_mut(&port) else {
                                continue;
                            };
                            let peers = peers
                                .get_or_insert_with(|| match ids {
                                    None => L7Peers::Wildcard,
                                    Some(ids) => L7Peers::Set(ids.iter().copied().collect()),
                                })
                                .clone();
                            list.push(contribution(peers, k.l7.clone()));
                        }
                    }
                }
            }
        }
        if self.config.allow_localhost {
            let host = Identity::from(ReservedIdentity::Host);
            for ((dir, _, _), list) in lists.iter_mut() {
                if *dir == Direction::Ingress {
                    list.push(L7Contribution {
                        peers: L7Peers::Set(BTreeSet::from([host])),
                        rules: None,
                        derived_from: None,
                        origin: usize::MAX,
                    });
                }
            }
        }
        L7Policy { ports: lists }
    }

    /// Recompiles an endpoint after policy changes; returns the map change and replaces
    /// `policy`.
    pub fn recompile(&self, ep: &EndpointInfo, policy: &mut EndpointPolicy) -> MapStateDiff {
        let new = self.compile(ep);
        let diff = policy.map_state.diff(&new.map_state);
        *policy = new;
        diff
    }

    /// Brings `policy` up to date after identity `id` was added, changed or removed (call
    /// [`Compiler::upsert_identity`] / [`Compiler::remove_identity`] first). Only the entries
    /// of `id` are recomputed, unless egress named ports make wildcard entries depend on the
    /// identity set, in which case the endpoint is recompiled. Returns the map change.
    pub fn update_identity(
        &self,
        ep: &EndpointInfo,
        policy: &mut EndpointPolicy,
        id: Identity,
    ) -> MapStateDiff {
        let plan = policy.plan.clone();
        if plan.needs_full_recompile() || id == Identity::ANY {
            return self.recompile(ep, policy);
        }
        let info = self.identities.get(id);
        let mut b = Builder::default();
        let mut member = vec![false; plan.contributions.len()];
        if let (Some(info), false) = (info, plan.never) {
            // Only the contributions whose peers can select these labels.
            let candidates: Box<dyn Iterator<Item = usize>> =
                match plan.index.candidates(id, &info.labels) {
                    Some(c) => Box::new(c.into_iter().map(|s| s as usize)),
                    None => Box::new(0..plan.contributions.len()),
                };
            for i in candidates {
                let Some(Some(c)) = plan.contributions.get(i) else {
                    continue;
                };
                let Some(peers) = &c.peers else { continue };
                if peers
                    .iter()
                    .any(|p| peer_selects(p, id, info, &self.config.cluster_name))
                {
                    if let Some(m) = member.get_mut(i) {
                        *m = true;
                    }
                    let keys = self.keys_for(c, id);
                    self.add_keys(&mut b, c, i, id, &keys);
                }
            }
        }
        if info.is_some() {
            self.add_synthetic(&mut b, &plan, Some(id));
        }
        let (mut entries, mut runs) = b.finish(&plan.contributions);
        // Keep the pre-fold items and deny keys in step, for later policy updates.
        let items = Arc::make_mut(&mut policy.items);
        items.set(id, runs.remove(&id).unwrap_or_default());
        let deny_keys = Arc::make_mut(&mut policy.deny_keys);
        deny_keys.retain(|k| k.identity != id);
        deny_keys.extend(
            entries
                .iter()
                .filter(|(_, e)| e.action.is_deny())
                .map(|(k, _)| *k),
        );
        let wildcard_denies: Vec<(PolicyKey, PolicyEntry)> = policy
            .map_state
            .entries_for_identity(Identity::ANY)
            .filter(|(_, e)| e.action.is_deny())
            .map(|(k, e)| (*k, e.clone()))
            .collect();
        resolve_denies(&mut entries, &wildcard_denies);

        let mut diff = MapStateDiff::default();
        let old: Vec<(PolicyKey, PolicyEntry)> = policy
            .map_state
            .entries_for_identity(id)
            .map(|(k, e)| (*k, e.clone()))
            .collect();
        for (k, _) in &old {
            if !entries.contains_key(k) {
                diff.removals.push(*k);
            }
        }
        for (k, e) in entries {
            if policy.map_state.get(&k) != Some(&e) {
                diff.upserts.push((k, e));
            }
        }
        policy.map_state.apply(&diff);

        for list in policy.l7.ports.values_mut() {
            for c in list.iter_mut() {
                if let (L7Peers::Set(s), Some(true)) = (&mut c.peers, member.get(c.origin)) {
                    s.insert(id);
                } else if let (L7Peers::Set(s), Some(false)) = (&mut c.peers, member.get(c.origin))
                {
                    s.remove(&id);
                }
            }
        }
        policy.revision = self.repo.revision();
        diff
    }
}
