//! Real packets between two pod namespaces through a node namespace, enforced by the attached
//! programs. Everything lives in namespaces this test creates (`weirt-<pid>-*`).

mod common;

use common::lab::{self, Lab};
use common::*;
use weir_datapath::{Datapath, EndpointAttachment, EndpointId, EventKind};
use weir_datapath_aya::AyaDatapath;
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapState};
use weir_policy_model::Direction::{Egress, Ingress};

const ID_A: u32 = 1001;
const ID_B: u32 = 1002;

pub fn ep_a() -> EndpointAttachment {
    EndpointAttachment {
        ifname: "lxca".into(),
        endpoint_id: EndpointId(1),
        identity: Identity(ID_A),
    }
}

pub fn ep_b() -> EndpointAttachment {
    EndpointAttachment {
        ifname: "lxcb".into(),
        endpoint_id: EndpointId(2),
        identity: Identity(ID_B),
    }
}

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

pub fn setup(dp: &mut AyaDatapath, lab: &Lab) {
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
    lab.in_node(|| {
        dp.attach_endpoint(&ep_a()).unwrap();
        dp.attach_endpoint(&ep_b()).unwrap();
    });
    // A may send anything; nothing may enter A (replies must come through conntrack).
    install(
        dp,
        1,
        &map(&[(key(0, Egress, 0, 0, 0), EntryAction::Allow)]),
    );
    install(dp, 2, &policy_b(true, false));
}

#[test]
fn enforces_real_traffic() {
    if skip("enforces_real_traffic") {
        return;
    }
    let fs = Bpffs::new();
    let mut lab = Lab::new();
    lab.start_servers();
    // Before attaching, everything flows.
    assert!(lab.probe(&lab.a, "tcp", lab::B4, 9090));
    let mut dp = AyaDatapath::load(&fs.pins()).expect("load");
    setup(&mut dp, &lab);

    assert!(lab.probe(&lab.a, "tcp", lab::B4, 8080), "allowed TCP 8080");
    assert!(
        !lab.probe(&lab.a, "tcp", lab::B4, 9090),
        "TCP 9090 must be denied"
    );
    assert!(lab.probe(&lab.a, "udp", lab::B4, 5353), "allowed UDP 5353");
    let _ = dp.drain_events();
    let pinged = lab.ping(&lab.a, lab::B4);
    assert!(pinged, "allowed ICMP echo: {:?}", dp.drain_events());
    assert!(
        !lab.ping(&lab.b, lab::A4),
        "A's ingress denies pings from B"
    );
    let _ = dp.drain_events();
    let ok6 = lab.probe(&lab.a, "tcp", lab::B6, 8080);
    assert!(ok6, "allowed TCP 8080 over IPv6: {:?}", dp.drain_events());
    assert!(
        !lab.probe(&lab.a, "tcp", lab::B6, 9090),
        "TCP 9090 over IPv6 denied"
    );

    let ev = dp.drain_events().unwrap();
    assert!(
        ev.iter().any(|e| e.kind == EventKind::Drop
            && e.drop_reason == 133
            && e.dport == 9090
            && e.src_identity == Identity(ID_A)),
        "drop event for 9090: {ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| e.kind == EventKind::AllowNew && e.dport == 8080)
    );
    let ct = dp.list_conntrack().unwrap();
    assert!(ct.iter().any(|c| c.dport == 8080), "{ct:?}");

    // Policy change while traffic flows: an established 8080 connection survives the removal
    // of its allow (conntrack, as in Cilium); new 8080 connections are denied; 9090 opens.
    let mut conn = lab.persistent(&lab.a, lab::B4, 8080).expect("connect 8080");
    assert!(conn.roundtrip());
    install(&mut dp, 2, &policy_b(false, true));
    assert!(conn.roundtrip(), "established connection keeps flowing");
    assert!(
        !lab.probe(&lab.a, "tcp", lab::B4, 8080),
        "new 8080 denied after change"
    );
    assert!(
        lab.probe(&lab.a, "tcp", lab::B4, 9090),
        "9090 allowed after change"
    );
    assert!(conn.roundtrip());

    let c = dp.counters().unwrap();
    assert!(
        c.forwarded > 0 && c.drops.get(&133).copied().unwrap_or(0) > 0,
        "{c:?}"
    );
    lab.in_node(|| {
        dp.detach_endpoint(&ep_a()).unwrap();
        dp.detach_endpoint(&ep_b()).unwrap();
    });
    assert!(
        lab.probe(&lab.a, "tcp", lab::B4, 8080),
        "open again after detach"
    );
    assert!(dp.dump_policy(EndpointId(2)).unwrap().is_empty());
}
