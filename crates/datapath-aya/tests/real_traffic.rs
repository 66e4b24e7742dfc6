//! Real packets between two pod namespaces through a node namespace, enforced by the attached
//! programs. Everything lives in namespaces this test creates (`weirt-<pid>-*`).

mod common;

use common::lab::{self, Lab};
use common::scenario::*;
use common::*;
use weir_datapath::{Datapath, EndpointId, EventKind};
use weir_datapath_aya::AyaDatapath;
use weir_identity::Identity;

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
