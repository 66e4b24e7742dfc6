//! The selector cache: for every selector that some policy uses, the identities it selects,
//! kept up to date as identities come and go.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;

use crate::labels::{Label, LabelSet, LabelSource};
use crate::numeric::Identity;
use crate::selector::Selector;
use crate::sources::parse_cidr_label_key;

/// What a policy peer selects, in terms of identities.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentitySelector {
    /// Identities whose labels satisfy the label selector.
    Labels(Selector),
    /// Identities with a `cidr:` label whose prefix lies inside `prefix` and inside none of
    /// `except`. The world identities count as `0.0.0.0/0` and/or `::/0`.
    Cidr {
        /// The prefix that must contain the identity's prefix.
        prefix: IpNet,
        /// Prefixes carved out of `prefix`.
        except: Vec<IpNet>,
    },
    /// Identities carrying the label `fqdn:<selector>` (a `toFQDNs` entry as written).
    Fqdn(String),
    /// Every identity.
    All,
    /// No identity.
    Nothing,
}

impl IdentitySelector {
    /// A CIDR selector with its prefixes normalised (host bits cleared, `except` sorted and
    /// deduplicated), so that equal selectors share one cache entry.
    pub fn cidr(prefix: IpNet, except: impl IntoIterator<Item = IpNet>) -> Self {
        let mut except: Vec<IpNet> = except.into_iter().map(|n| n.trunc()).collect();
        except.sort();
        except.dedup();
        IdentitySelector::Cidr {
            prefix: prefix.trunc(),
            except,
        }
    }

    /// Whether an identity with these labels (and CIDR prefixes, see [`identity_prefixes`]) is
    /// selected.
    fn selects(&self, labels: &LabelSet, prefixes: &[IpNet]) -> bool {
        match self {
            IdentitySelector::Labels(s) => s.matches(labels),
            IdentitySelector::Cidr { prefix, except } => prefixes
                .iter()
                .any(|p| net_contains(prefix, p) && !except.iter().any(|e| net_contains(e, p))),
            IdentitySelector::Fqdn(name) => {
                labels.contains(&Label::new(LabelSource::Fqdn, name.as_str(), ""))
            }
            IdentitySelector::All => true,
            IdentitySelector::Nothing => false,
        }
    }
}

impl fmt::Display for IdentitySelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentitySelector::Labels(s) => write!(f, "{s}"),
            IdentitySelector::Cidr { prefix, except } => {
                write!(f, "cidr:{prefix}")?;
                for e in except {
                    write!(f, " except {e}")?;
                }
                Ok(())
            }
            IdentitySelector::Fqdn(n) => write!(f, "fqdn:{n}"),
            IdentitySelector::All => f.write_str("all"),
            IdentitySelector::Nothing => f.write_str("none"),
        }
    }
}

/// Whether `outer` contains all of `inner` (same family, shorter or equal prefix).
fn net_contains(outer: &IpNet, inner: &IpNet) -> bool {
    match (outer, inner) {
        (IpNet::V4(o), IpNet::V4(i)) => {
            o.prefix_len() <= i.prefix_len() && o.contains(&i.network())
        }
        (IpNet::V6(o), IpNet::V6(i)) => {
            o.prefix_len() <= i.prefix_len() && o.contains(&i.network())
        }
        _ => false,
    }
}

/// The prefixes an identity stands for: its `cidr:` labels; without any, `0.0.0.0/0` for
/// `reserved:world-ipv4`, `::/0` for `reserved:world-ipv6`, and both for `reserved:world`
/// (so FQDN identities, which carry `reserved:world`, count as world too).
pub fn identity_prefixes(labels: &LabelSet) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = labels
        .iter()
        .filter(|l| l.source == LabelSource::Cidr)
        .filter_map(|l| parse_cidr_label_key(&l.key))
        .collect();
    if out.is_empty() {
        let v4 = IpNet::V4(ipnet::Ipv4Net::default());
        let v6 = IpNet::V6(ipnet::Ipv6Net::default());
        if labels.contains(&Label::reserved("world-ipv4")) {
            out.push(v4);
        } else if labels.contains(&Label::reserved("world-ipv6")) {
            out.push(v6);
        } else if labels.contains(&Label::reserved("world")) {
            out.push(v4);
            out.push(v6);
        }
    }
    out
}

/// Names a selector registered in a [`SelectorCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelectorId(pub u32);

impl fmt::Display for SelectorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sel#{}", self.0)
    }
}

/// One change in what a selector selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelectorChange {
    /// The selector whose selection changed.
    pub selector: SelectorId,
    /// The identity that was added to or removed from the selection.
    pub identity: Identity,
    /// `true` when the identity is now selected, `false` when it no longer is.
    pub added: bool,
}

#[derive(Debug, Clone)]
struct SelectorEntry {
    selector: IdentitySelector,
    refs: u32,
    selected: BTreeSet<Identity>,
}

#[derive(Debug, Clone)]
struct IdentityEntry {
    labels: Arc<LabelSet>,
    prefixes: Vec<IpNet>,
}

static EMPTY: BTreeSet<Identity> = BTreeSet::new();

/// Selectors in use and the identities each one selects, updated incrementally: a new identity
/// is tested once against each selector, a new selector once against each identity.
#[derive(Debug, Clone, Default)]
pub struct SelectorCache {
    selectors: BTreeMap<SelectorId, SelectorEntry>,
    ids: HashMap<IdentitySelector, SelectorId>,
    identities: BTreeMap<Identity, IdentityEntry>,
    next: u32,
}

impl SelectorCache {
    /// An empty cache.
    pub fn new() -> Self {
        SelectorCache::default()
    }

    /// Registers a selector (or takes one more reference to an equal one already registered)
    /// and returns its id; its selection is computed from the known identities.
    pub fn add_selector(&mut self, selector: IdentitySelector) -> SelectorId {
        if let Some(id) = self.ids.get(&selector).copied()
            && let Some(e) = self.selectors.get_mut(&id)
        {
            e.refs += 1;
            return id;
        }
        // Ids are not reused while the counter lasts; after 2^32 registrations it wraps and
        // skips ids still in use.
        let mut id = SelectorId(self.next);
        while self.selectors.contains_key(&id) {
            id = SelectorId(id.0.wrapping_add(1));
        }
        self.next = id.0.wrapping_add(1);
        let selected = self
            .identities
            .iter()
            .filter(|(_, e)| selector.selects(&e.labels, &e.prefixes))
            .map(|(id, _)| *id)
            .collect();
        self.ids.insert(selector.clone(), id);
        self.selectors.insert(
            id,
            SelectorEntry {
                selector,
                refs: 1,
                selected,
            },
        );
        id
    }

    /// Drops one reference to a selector; returns whether it was removed (last reference).
    pub fn remove_selector(&mut self, id: SelectorId) -> bool {
        let Some(e) = self.selectors.get_mut(&id) else {
            return false;
        };
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return false;
        }
        if let Some(e) = self.selectors.remove(&id) {
            self.ids.remove(&e.selector);
        }
        true
    }

    /// Adds an identity, or replaces the labels of a known one, and returns how selections
    /// changed.
    pub fn add_identity(&mut self, identity: Identity, labels: LabelSet) -> Vec<SelectorChange> {
        self.add_identity_shared(identity, Arc::new(labels))
    }

    /// [`SelectorCache::add_identity`] keeping a reference to labels the caller already holds
    /// (the allocator's), so each identity's labels are stored once.
    pub fn add_identity_shared(
        &mut self,
        identity: Identity,
        labels: Arc<LabelSet>,
    ) -> Vec<SelectorChange> {
        let prefixes = identity_prefixes(&labels);
        let mut changes = Vec::new();
        for (sid, e) in &mut self.selectors {
            let now = e.selector.selects(&labels, &prefixes);
            let before = e.selected.contains(&identity);
            if now && !before {
                e.selected.insert(identity);
                changes.push(SelectorChange {
                    selector: *sid,
                    identity,
                    added: true,
                });
            } else if !now && before {
                e.selected.remove(&identity);
                changes.push(SelectorChange {
                    selector: *sid,
                    identity,
                    added: false,
                });
            }
        }
        self.identities
            .insert(identity, IdentityEntry { labels, prefixes });
        changes
    }

    /// Removes an identity and returns the selections it leaves.
    pub fn remove_identity(&mut self, identity: Identity) -> Vec<SelectorChange> {
        if self.identities.remove(&identity).is_none() {
            return Vec::new();
        }
        let mut changes = Vec::new();
        for (sid, e) in &mut self.selectors {
            if e.selected.remove(&identity) {
                changes.push(SelectorChange {
                    selector: *sid,
                    identity,
                    added: false,
                });
            }
        }
        changes
    }

    /// The identities a selector selects (empty for an unknown id).
    pub fn selected(&self, id: SelectorId) -> &BTreeSet<Identity> {
        self.selectors.get(&id).map_or(&EMPTY, |e| &e.selected)
    }

    /// The selector registered under an id.
    pub fn selector(&self, id: SelectorId) -> Option<&IdentitySelector> {
        self.selectors.get(&id).map(|e| &e.selector)
    }

    /// The id of a registered selector equal to this one.
    pub fn selector_id(&self, selector: &IdentitySelector) -> Option<SelectorId> {
        self.ids.get(selector).copied()
    }

    /// Every registered selector with its id, in id order.
    pub fn selectors(&self) -> impl Iterator<Item = (SelectorId, &IdentitySelector)> {
        self.selectors.iter().map(|(id, e)| (*id, &e.selector))
    }

    /// The labels of a known identity.
    pub fn identity_labels(&self, identity: Identity) -> Option<&LabelSet> {
        self.identities.get(&identity).map(|e| &*e.labels)
    }

    /// Every known identity with its labels, in numeric order.
    pub fn identities(&self) -> impl Iterator<Item = (Identity, &LabelSet)> {
        self.identities.iter().map(|(id, e)| (*id, &*e.labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LabelKey;
    use crate::numeric::ReservedIdentity;
    use crate::selector::Requirement;
    use crate::sources::{cidr_labels, fqdn_labels};

    fn app(name: &str) -> LabelSet {
        [Label::k8s("app", name)].into_iter().collect()
    }

    fn app_sel(name: &str) -> IdentitySelector {
        IdentitySelector::Labels(Selector::new(vec![Requirement::equals(
            LabelKey::parse_selector_key("app"),
            name,
        )]))
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn with_reserved() -> SelectorCache {
        let mut c = SelectorCache::new();
        for r in ReservedIdentity::ALL {
            c.add_identity(r.into(), r.labels());
        }
        c
    }

    #[test]
    fn labels_incremental() {
        let mut c = with_reserved();
        let web = c.add_selector(app_sel("web"));
        assert!(c.selected(web).is_empty());
        let ch = c.add_identity(Identity(300), app("web"));
        assert_eq!(
            ch,
            vec![SelectorChange {
                selector: web,
                identity: Identity(300),
                added: true
            }]
        );
        assert_eq!(c.add_selector(app_sel("web")), web, "shared entry");
        let all = c.add_selector(IdentitySelector::All);
        assert_eq!(c.selected(all).len(), 11);
        // Relabel: no longer web.
        let ch = c.add_identity(Identity(300), app("db"));
        assert!(ch.contains(&SelectorChange {
            selector: web,
            identity: Identity(300),
            added: false
        }));
        assert!(c.selected(web).is_empty());
        assert_eq!(c.remove_identity(Identity(300)).len(), 1);
        assert!(!c.remove_selector(web));
        assert!(c.remove_selector(web));
        assert!(c.selected(web).is_empty());
        assert_eq!(c.selector(web), None);
        let none = c.add_selector(IdentitySelector::Nothing);
        assert!(c.selected(none).is_empty());
    }

    #[test]
    fn cidr_selection() {
        let mut c = with_reserved();
        c.add_identity(Identity(16777217), cidr_labels(net("10.1.0.0/16")));
        c.add_identity(Identity(16777218), cidr_labels(net("10.2.3.4/32")));
        c.add_identity(Identity(16777219), cidr_labels(net("192.168.0.0/24")));
        c.add_identity(Identity(16777220), cidr_labels(net("2001:db8::/64")));
        c.add_identity(Identity(16777221), fqdn_labels(["*.example.com"]));
        c.add_identity(Identity(300), app("web"));

        let ten = c.add_selector(IdentitySelector::cidr(
            net("10.0.0.0/8"),
            [net("10.2.0.0/16")],
        ));
        assert_eq!(
            c.selected(ten).iter().copied().collect::<Vec<_>>(),
            vec![Identity(16777217)]
        );
        let v4all = c.add_selector(IdentitySelector::cidr(net("0.0.0.0/0"), []));
        let got: Vec<u32> = c.selected(v4all).iter().map(|i| i.get()).collect();
        assert_eq!(got, vec![2, 9, 16777217, 16777218, 16777219, 16777221]);
        let v6all = c.add_selector(IdentitySelector::cidr(net("::/0"), []));
        let got: Vec<u32> = c.selected(v6all).iter().map(|i| i.get()).collect();
        assert_eq!(got, vec![2, 10, 16777220, 16777221]);
        let narrow = c.add_selector(IdentitySelector::cidr(net("10.1.2.0/24"), []));
        assert!(
            c.selected(narrow).is_empty(),
            "a broader identity is not inside"
        );
    }

    #[test]
    fn fqdn_selection() {
        let mut c = SelectorCache::new();
        let s = c.add_selector(IdentitySelector::Fqdn("*.example.com".into()));
        c.add_identity(
            Identity(16777217),
            fqdn_labels(["*.example.com", "a.example.com"]),
        );
        c.add_identity(Identity(16777218), fqdn_labels(["a.example.com"]));
        assert_eq!(
            c.selected(s).iter().copied().collect::<Vec<_>>(),
            vec![Identity(16777217)]
        );
    }

    mod props {
        use super::*;
        use crate::selector::Operator;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            AddSel(usize),
            RemoveSel(usize),
            AddId(u32, usize),
            RemoveId(u32),
        }

        fn label_sets() -> Vec<LabelSet> {
            let mut v = vec![app("a"), app("b"), cidr_labels(net("10.0.0.0/8"))];
            v.push(cidr_labels(net("10.1.0.0/16")));
            v.push(cidr_labels(net("2001:db8::/32")));
            v.push(fqdn_labels(["x.com"]));
            v.push(ReservedIdentity::World.labels());
            v.push(ReservedIdentity::WorldIpv6.labels());
            v.push(
                [Label::k8s("app", "a"), Label::k8s("tier", "x")]
                    .into_iter()
                    .collect(),
            );
            v
        }

        fn selectors() -> Vec<IdentitySelector> {
            let tier_absent = Requirement::new(
                LabelKey::parse_selector_key("tier"),
                Operator::DoesNotExist,
                BTreeSet::new(),
            )
            .unwrap();
            vec![
                app_sel("a"),
                app_sel("b"),
                IdentitySelector::Labels(Selector::all()),
                IdentitySelector::Labels(Selector::new(vec![tier_absent])),
                IdentitySelector::cidr(net("10.0.0.0/8"), []),
                IdentitySelector::cidr(net("0.0.0.0/0"), [net("10.0.0.0/9")]),
                IdentitySelector::cidr(net("::/0"), []),
                IdentitySelector::Fqdn("x.com".into()),
                IdentitySelector::All,
                IdentitySelector::Nothing,
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0usize..10).prop_map(Op::AddSel),
                (0usize..10).prop_map(Op::RemoveSel),
                (0u32..6, 0usize..9).prop_map(|(i, l)| Op::AddId(i, l)),
                (0u32..6).prop_map(Op::RemoveId),
            ]
        }

        proptest! {
            #[test]
            fn incremental_equals_recompute(ops in proptest::collection::vec(op(), 0..80)) {
                let sets = label_sets();
                let sels = selectors();
                let mut c = SelectorCache::new();
                let mut live: Vec<SelectorId> = Vec::new();
                // What each selector's selection should be, replayed from the changes.
                let mut replay: BTreeMap<SelectorId, BTreeSet<Identity>> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::AddSel(i) => {
                            let Some(s) = sels.get(i) else { continue };
                            let id = c.add_selector(s.clone());
                            live.push(id);
                            replay.insert(id, c.selected(id).clone());
                        }
                        Op::RemoveSel(i) => {
                            if i < live.len() {
                                let id = live.remove(i);
                                if c.remove_selector(id) {
                                    replay.remove(&id);
                                }
                            }
                        }
                        Op::AddId(n, l) => {
                            let Some(labels) = sets.get(l) else { continue };
                            for ch in c.add_identity(Identity(1000 + n), labels.clone()) {
                                let set = replay.entry(ch.selector).or_default();
                                if ch.added {
                                    prop_assert!(set.insert(ch.identity));
                                } else {
                                    prop_assert!(set.remove(&ch.identity));
                                }
                            }
                        }
                        Op::RemoveId(n) => {
                            for ch in c.remove_identity(Identity(1000 + n)) {
                                prop_assert!(!ch.added);
                                let set = replay.entry(ch.selector).or_default();
                                prop_assert!(set.remove(&ch.identity));
                            }
                        }
                    }
                    // Recompute every live selector from scratch.
                    for (id, sel) in c.selectors() {
                        let fresh: BTreeSet<Identity> = c
                            .identities()
                            .filter(|(_, l)| sel.selects(l, &identity_prefixes(l)))
                            .map(|(i, _)| i)
                            .collect();
                        prop_assert_eq!(c.selected(id), &fresh);
                        prop_assert_eq!(replay.get(&id), Some(&fresh));
                    }
                    prop_assert_eq!(c.selectors().count(), replay.len());
                }
            }
        }
    }
}
