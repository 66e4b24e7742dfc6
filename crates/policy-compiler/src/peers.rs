//! Which identities an L3 peer selects.
//!
//! The single-identity test [`peer_selects`] is the definition; the set evaluation
//! [`PeerEvaluator`] only narrows the candidates through the table's indexes and then applies
//! the same test, so both always agree (the incremental path uses the first, a full compile the
//! second).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::rc::Rc;

use weir_identity::{Identity, Label, LabelSource, ReservedIdentity};
use weir_l7_match::DnsRule;
use weir_policy_model::{Entity, Peer};

use crate::compile::{Contribution, IdHasher};
use crate::identities::{IdentityInfo, IdentityTable, has_label};

/// The `k8s:` label key that carries an endpoint's cluster name.
pub const CLUSTER_LABEL_KEY: &str = "io.cilium.k8s.policy.cluster";

/// The label that marks identities learned for a `toFQDNs` entry (or a `dns` rule written the
/// same way): `fqdn:<name>.` for `matchName` (lower-cased, trailing dot added) and
/// `fqdn:<pattern>` for `matchPattern` (lower-cased). The DNS proxy labels the identities it
/// allocates with this, and the compiler selects them by it.
pub fn fqdn_label(rule: &DnsRule) -> Label {
    let key = match rule {
        DnsRule::MatchName(n) => {
            let mut n = n.to_ascii_lowercase();
            if !n.ends_with('.') {
                n.push('.');
            }
            n
        }
        DnsRule::MatchPattern(p) => p.to_ascii_lowercase(),
    };
    Label::new(LabelSource::Fqdn, key, "")
}

fn world_label() -> Label {
    Label::reserved("world")
}

fn is(id: Identity, r: ReservedIdentity) -> bool {
    id == Identity::from(r)
}

/// Whether `peer` selects identity `id` with `info`. [`Entity::All`] is a wildcard and is
/// handled by the caller (it yields [`Identity::ANY`] keys), so it selects no single identity
/// here.
///
/// `world-ipv4`/`world-ipv6`: Weir runs single-stack unless the world halves are in use, so
/// each half selects the plain `world` identity (2) as well as its own (9 or 10) and the CIDR
/// identities of its family; identities with `reserved:world` but no CIDR label (FQDN
/// identities without addresses yet) are in both halves.
pub(crate) fn peer_selects(
    peer: &Peer,
    id: Identity,
    info: &IdentityInfo,
    cluster_name: &str,
) -> bool {
    let world = || info.world;
    match peer {
        Peer::Endpoints(sel) => sel.matches(&info.labels),
        Peer::Entity(e) => match e {
            Entity::Host => is(id, ReservedIdentity::Host),
            Entity::RemoteNode => is(id, ReservedIdentity::RemoteNode),
            Entity::KubeApiserver => is(id, ReservedIdentity::KubeApiserver),
            Entity::Ingress => is(id, ReservedIdentity::Ingress),
            Entity::Init => is(id, ReservedIdentity::Init),
            Entity::Health => is(id, ReservedIdentity::Health),
            Entity::Unmanaged => is(id, ReservedIdentity::Unmanaged),
            Entity::World => world(),
            Entity::WorldIpv4 => {
                !is(id, ReservedIdentity::WorldIpv6)
                    && world()
                    && info.prefix.is_none_or(|p| p.addr().is_ipv4())
            }
            Entity::WorldIpv6 => {
                !is(id, ReservedIdentity::WorldIpv4)
                    && world()
                    && info.prefix.is_none_or(|p| p.addr().is_ipv6())
            }
            Entity::Cluster => {
                [
                    ReservedIdentity::Host,
                    ReservedIdentity::RemoteNode,
                    ReservedIdentity::Init,
                    ReservedIdentity::Health,
                    ReservedIdentity::Unmanaged,
                    ReservedIdentity::KubeApiserver,
                ]
                .into_iter()
                .any(|r| is(id, r))
                    || has_label(
                        &info.labels,
                        LabelSource::K8s,
                        CLUSTER_LABEL_KEY,
                        cluster_name,
                    )
            }
            Entity::All | Entity::None => false,
        },
        Peer::Cidr { cidr, except } => {
            if !world() {
                return false;
            }
            if let Some(p) = info.prefix {
                return cidr.contains(&p) && !except.iter().any(|e| e.contains(&p));
            }
            // The world identities stand for every address no CIDR identity covers: a /0
            // selects them (2 always, 9/10 by family).
            cidr.prefix_len() == 0
                && (is(id, ReservedIdentity::World)
                    || (is(id, ReservedIdentity::WorldIpv4) && cidr.addr().is_ipv4())
                    || (is(id, ReservedIdentity::WorldIpv6) && cidr.addr().is_ipv6()))
        }
        Peer::Fqdn(rule) => info.labels.contains(&fqdn_label(rule)),
    }
}

/// Whether a peer is the identity wildcard (`all`).
pub(crate) fn peer_is_wildcard(peer: &Peer) -> bool {
    matches!(peer, Peer::Entity(Entity::All))
}

/// Evaluates peers to identity sets against one table, caching per distinct peer, so each
/// selector is evaluated once per compile.
pub(crate) struct PeerEvaluator<'a> {
    table: &'a IdentityTable,
    cluster_name: &'a str,
    /// By the repository's number of the peer.
    cache: HashMap<u64, Rc<[Identity]>, BuildHasherDefault<IdHasher>>,
}

impl<'a> PeerEvaluator<'a> {
    pub(crate) fn new(table: &'a IdentityTable, cluster_name: &'a str) -> Self {
        PeerEvaluator {
            table,
            cluster_name,
            cache: HashMap::default(),
        }
    }

    /// The identities a contribution selects, sorted (`None`: the wildcard).
    pub(crate) fn eval_contribution(&mut self, c: &Contribution) -> Option<Rc<[Identity]>> {
        let peers = c.peers.as_deref()?;
        let mut each = peers.iter().zip(&c.peer_ids);
        Some(match (each.next(), each.next()) {
            (None, _) => Rc::from([]),
            (Some((p, &id)), None) => self.eval(p, id),
            (Some(a), Some(b)) => {
                let mut v: Vec<Identity> = Vec::new();
                for (p, &id) in [a, b].into_iter().chain(each) {
                    v.extend_from_slice(&self.eval(p, id));
                }
                v.sort_unstable();
                v.dedup();
                v.into()
            }
        })
    }

    /// The identities `peer` (numbered `id` by the repository) selects, sorted.
    pub(crate) fn eval(&mut self, peer: &Peer, id: u64) -> Rc<[Identity]> {
        if let Some(s) = self.cache.get(&id) {
            return s.clone();
        }
        let table = self.table;
        let test = |id: Identity| {
            table
                .get(id)
                .is_some_and(|info| peer_selects(peer, id, info, self.cluster_name))
        };
        let ids: Vec<Identity> = match peer {
            Peer::Endpoints(sel) => table.select(sel),
            // Beyond the reserved identities, the cluster label is the whole test.
            Peer::Entity(Entity::Cluster) => (1..=10)
                .map(Identity)
                .filter(|id| test(*id))
                .chain(
                    table
                        .with_label(&Label::k8s(CLUSTER_LABEL_KEY, self.cluster_name))
                        .filter(|id| !id.is_reserved()),
                )
                .collect(),
            // Beyond the reserved identities, `reserved:world` is the whole test.
            Peer::Entity(Entity::World) => (1..=10)
                .map(Identity)
                .filter(|id| test(*id))
                .chain(
                    table
                        .with_label(&world_label())
                        .filter(|id| !id.is_reserved()),
                )
                .collect(),
            Peer::Entity(Entity::All | Entity::None) => Vec::new(),
            Peer::Entity(_) => (1..=10)
                .map(Identity)
                .filter(|id| test(*id))
                .chain(
                    // Only world-type entities select non-reserved identities, all of which
                    // carry `reserved:world`.
                    table
                        .with_label(&world_label())
                        .filter(|id| !id.is_reserved() && test(*id)),
                )
                .collect(),
            // Only identities inside the CIDR, or world ones without a prefix, can match.
            Peer::Cidr { cidr, .. } => table
                .inside(cidr)
                .chain(table.world_without_prefix())
                .filter(|id| test(*id))
                .collect(),
            Peer::Fqdn(rule) => table
                .with_label(&fqdn_label(rule))
                .filter(|id| test(*id))
                .collect(),
        };
        let mut ids = ids;
        ids.sort_unstable();
        ids.dedup();
        let rc: Rc<[Identity]> = ids.into();
        self.cache.insert(id, rc.clone());
        rc
    }
}
