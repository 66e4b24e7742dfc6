//! What enrichment of a batch of datapath events needs to know, captured up front: the agent
//! captures it while it holds its state's lock (a few hash lookups per distinct endpoint,
//! address, identity and policy query) and builds the flows after releasing it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use weir_datapath::{DatapathEvent, EndpointId};
use weir_identity::Identity;
use weir_policy_compiler::{Decision, Flow as PolicyFlow};
use weir_policy_model::Direction;

use crate::enrich::{EndpointMeta, FlowContext, Resolve, name_questions, policy_query};

/// The answers a [`FlowContext`] gave for one batch of events; itself a [`FlowContext`] that
/// answers the same questions without the original. Questions it was not asked during
/// [`ContextSnapshot::capture`] get the "unknown" answer (no endpoint, no labels).
#[derive(Debug, Default, Clone)]
pub struct ContextSnapshot {
    locals: HashMap<EndpointId, Option<Arc<EndpointMeta>>>,
    /// Endpoints by address; an endpoint's addresses share one copy.
    by_ip: HashMap<IpAddr, Option<Arc<EndpointMeta>>>,
    labels: HashMap<Identity, Vec<String>>,
    decisions: HashMap<(EndpointId, PolicyFlow), Option<Decision>>,
    names: HashMap<(EndpointId, IpAddr), Vec<String>>,
}

impl ContextSnapshot {
    /// Asks `ctx` every question enriching `events` will ask, once per distinct question.
    pub fn capture(ctx: &impl FlowContext, events: &[DatapathEvent]) -> Self {
        let mut s = ContextSnapshot::default();
        for ev in events {
            let (peer_ip, peer_identity, local_identity) = match ev.direction {
                Direction::Ingress => (ev.src, ev.src_identity, ev.dst_identity),
                Direction::Egress => (ev.dst, ev.dst_identity, ev.src_identity),
            };
            // The same questions, in the same cases, as the enricher asks.
            let local = s
                .locals
                .entry(ev.endpoint_id)
                .or_insert_with(|| ctx.local_endpoint(ev.endpoint_id).map(Arc::new));
            let mut need_labels = [None, None];
            if local.is_none() {
                need_labels[0] = Some(local_identity);
            }
            let local_id = local.as_ref().map_or(ev.endpoint_id, |m| EndpointId(m.id));
            let peer = peer_ip.and_then(|ip| {
                s.by_ip
                    .entry(ip)
                    .or_insert_with(|| ctx.endpoint_by_ip(ip).map(Arc::new))
                    .as_ref()
            });
            let peer_id = EndpointId(peer.map_or(0, |m| m.id));
            if peer.is_none() {
                need_labels[1] = Some(peer_identity);
            }
            for identity in need_labels.into_iter().flatten() {
                s.labels
                    .entry(identity)
                    .or_insert_with(|| ctx.identity_labels(identity));
            }
            let (src_ep, dst_ep) = match ev.direction {
                Direction::Ingress => (peer_id, local_id),
                Direction::Egress => (local_id, peer_id),
            };
            for (resolver, ip, _) in name_questions(ev, src_ep, dst_ep) {
                s.names
                    .entry((resolver, ip))
                    .or_insert_with(|| ctx.names_of(resolver, ip));
            }
            if let Some(query) = policy_query(ev) {
                s.decisions
                    .entry((ev.endpoint_id, query))
                    .or_insert_with(|| ctx.decide(ev.endpoint_id, &query));
            }
        }
        s
    }
}

impl FlowContext for ContextSnapshot {
    fn local_endpoint(&self, id: EndpointId) -> Option<EndpointMeta> {
        self.locals.get(&id)?.as_deref().cloned()
    }
    fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointMeta> {
        self.by_ip.get(&ip)?.as_deref().cloned()
    }
    fn identity_labels(&self, identity: Identity) -> Vec<String> {
        self.labels.get(&identity).cloned().unwrap_or_default()
    }
    fn decide(&self, endpoint: EndpointId, flow: &PolicyFlow) -> Option<Decision> {
        self.decisions.get(&(endpoint, *flow))?.clone()
    }
    fn names_of(&self, endpoint: EndpointId, ip: IpAddr) -> Vec<String> {
        self.names.get(&(endpoint, ip)).cloned().unwrap_or_default()
    }
}

impl Resolve for ContextSnapshot {
    fn local(&self, id: EndpointId) -> Option<Cow<'_, EndpointMeta>> {
        self.locals.get(&id)?.as_deref().map(Cow::Borrowed)
    }
    fn by_ip(&self, ip: IpAddr) -> Option<Cow<'_, EndpointMeta>> {
        self.by_ip.get(&ip)?.as_deref().map(Cow::Borrowed)
    }
    fn labels(&self, identity: Identity) -> Cow<'_, [String]> {
        Cow::Borrowed(self.labels.get(&identity).map_or(&[][..], Vec::as_slice))
    }
    fn decision(&self, endpoint: EndpointId, flow: &PolicyFlow) -> Option<Cow<'_, Decision>> {
        self.decisions
            .get(&(endpoint, *flow))?
            .as_ref()
            .map(Cow::Borrowed)
    }
    fn names(&self, endpoint: EndpointId, ip: IpAddr) -> Cow<'_, [String]> {
        Cow::Borrowed(
            self.names
                .get(&(endpoint, ip))
                .map_or(&[][..], Vec::as_slice),
        )
    }
}
