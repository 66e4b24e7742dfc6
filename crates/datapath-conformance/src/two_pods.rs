//! The two-pod scenario shared by the real-traffic and restart tests.

use weir_datapath::{Datapath, EndpointAttachment, EndpointId};
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapState};
use weir_policy_model::Direction::{Egress, Ingress};

use crate::lab::{self, Lab};
use crate::support::{install, key, map};

/// Identity of pod A.
pub const ID_A: u32 = 1001;
/// Identity of pod B.
pub const ID_B: u32 = 1002;

/// Pod A's endpoint (endpoint 1 on `lxca`).
pub fn ep_a() -> EndpointAttachment {
    EndpointAttachment {
        ifname: "lxca".into(),
        endpoint_id: EndpointId(1),
        identity: Identity(ID_A),
        addresses: vec![lab::A4.parse().unwrap(), lab::A6.parse().unwrap()],
    }
}

/// Pod B's endpoint (endpoint 2 on `lxcb`).
pub fn ep_b() -> EndpointAttachment {
    EndpointAttachment {
        ifname: "lxcb".into(),
        endpoint_id: EndpointId(2),
        identity: Identity(ID_B),
        addresses: vec![lab::B4.parse().unwrap(), lab::B6.parse().unwrap()],
    }
}

/// B's ingress policy: UDP 5353 and ICMP echo from A, optionally TCP 8080 and 9090.
pub fn policy_b(with_8080: bool, with_9090: bool) -> MapState {
    let mut v = vec![
        (key(ID_A, Ingress, 17, 5353, 24), EntryAction::Allow),
        (key(ID_A, Ingress, 1, 8, 24), EntryAction::Allow),
    ];
    if with_8080 {
        v.push((key(ID_A, Ingress, 6, 8080, 24), EntryAction::Allow));
    }
    if with_9090 {
        v.push((key(ID_A, Ingress, 6, 9090, 24), EntryAction::Allow));
    }
    map(&v)
}

/// Fills the maps and attaches both endpoints in the lab's node namespace.
pub fn setup(dp: &mut (impl Datapath + Send), lab: &Lab) {
    setup_maps(dp);
    lab.in_node(|| {
        dp.attach_endpoint(&ep_a()).unwrap();
        dp.attach_endpoint(&ep_b()).unwrap();
    });
}

/// ipcache and policy of the scenario, without attaching.
pub fn setup_maps(dp: &mut impl Datapath) {
    for (net, id) in [
        (lab::A4, ID_A),
        (lab::B4, ID_B),
        (lab::A6, ID_A),
        (lab::B6, ID_B),
    ] {
        let bits = if net.contains(':') { 128 } else { 32 };
        dp.upsert_ipcache(format!("{net}/{bits}").parse().unwrap(), Identity(id))
            .unwrap();
    }
    // A may send anything; nothing may enter A (replies must come through conntrack).
    install(
        dp,
        1,
        &map(&[(key(0, Egress, 0, 0, 0), EntryAction::Allow)]),
    );
    install(dp, 2, &policy_b(true, false));
}
