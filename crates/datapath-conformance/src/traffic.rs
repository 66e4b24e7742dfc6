//! Real packets between two pod namespaces through a node namespace, enforced by the attached
//! programs; and redirection to a transparent proxy. Everything lives in namespaces these tests
//! create (`weirt-<pid>-*`).

use weir_datapath::{Datapath, EndpointId, EventKind};
use weir_datapath_abi as abi;
use weir_identity::Identity;
use weir_policy_compiler::EntryAction;
use weir_policy_model::Direction::{Egress, Ingress};

use crate::Backend;
use crate::lab::{self, Lab};
use crate::support::*;
use crate::two_pods::*;

/// TCP, UDP, ICMP over IPv4 and IPv6 through attached programs, policy changes under traffic,
/// events, counters and detach.
pub fn enforces_real_traffic<B: Backend>() {
    if skip("enforces_real_traffic") {
        return;
    }
    let fs = Bpffs::new();
    let mut lab = Lab::new();
    lab.start_servers();
    // Before attaching, everything flows.
    assert!(lab.probe(&lab.a, "tcp", lab::B4, 9090));
    let mut dp = B::load(&fs.pins()).unwrap_or_else(|e| panic!("load {}: {e}", B::NAME));
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

    // A pod cannot send from an address that is not its own (it would borrow that address's
    // identity at the destination): dropped on the way out with reason 132, over IPv4 and
    // IPv6, although B's policy allows A on these ports.
    for (spoofed, dest) in [("10.201.1.99", lab::B4), ("fd00:201:1::99", lab::B6)] {
        let bits = if spoofed.contains(':') { "128" } else { "32" };
        lab::run(&[
            "ip",
            "-n",
            &lab.a,
            "addr",
            "add",
            &format!("{spoofed}/{bits}"),
            "dev",
            "eth0",
            "nodad",
        ]);
        assert!(
            !lab.probe_from(&lab.a, "udp", Some(spoofed), dest, 5353),
            "UDP from the spoofed {spoofed} must be dropped"
        );
        assert!(
            !lab.probe_from(&lab.a, "tcp", Some(spoofed), dest, 8080),
            "TCP from the spoofed {spoofed} must be dropped"
        );
    }
    let spoofed_drops = dp.drain_events().unwrap();
    assert!(
        spoofed_drops
            .iter()
            .filter(|e| e.kind == EventKind::Drop && e.drop_reason == 132)
            .count()
            >= 4,
        "invalid source drops: {spoofed_drops:?}"
    );
    assert!(
        lab.probe(&lab.a, "udp", lab::B4, 5353),
        "A's own address still passes"
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

/// A TCP connection leaving pod A that hits a Redirect entry is delivered to a transparent
/// listener in the node namespace (bpf_sk_assign + policy routing on the mark).
pub fn redirects_to_local_proxy<B: Backend>() {
    if skip("redirects_to_local_proxy") {
        return;
    }
    let fs = Bpffs::new();
    let mut lab = Lab::new();
    lab.start_servers();
    lab.start_proxy(15001);
    let mut dp = B::load(&fs.pins()).unwrap_or_else(|e| panic!("load {}: {e}", B::NAME));
    setup(&mut dp, &lab);
    // B allows 8080 and 9090 from A; A's egress redirects 9090 to the proxy.
    install(&mut dp, 2, &policy_b(true, true));
    install(
        &mut dp,
        1,
        &map(&[
            (key(0, Egress, 0, 0, 0), EntryAction::Allow),
            (
                key(0, Egress, 6, 9090, 24),
                EntryAction::Redirect {
                    proxy_port: 15001,
                    priority: 1,
                },
            ),
        ]),
    );
    assert_eq!(
        lab.ask(&lab.a, lab::B4, 8080).as_deref(),
        Some("hello"),
        "8080 reaches B"
    );
    let got = lab.ask(&lab.a, lab::B4, 9090);
    assert_eq!(
        got.as_deref(),
        Some(format!("proxy {}:9090", lab::B4).as_str()),
        "9090 lands on the proxy, which sees the original destination; events {:?}",
        dp.drain_events()
    );
    let ev = dp.drain_events().unwrap();
    assert!(
        ev.iter()
            .any(|e| e.kind == EventKind::RedirectNew && e.proxy_port == 15001),
        "{ev:?}"
    );
    assert!(dp.counters().unwrap().redirected > 0);
    lab.in_node(|| {
        dp.detach_endpoint(&ep_a()).unwrap();
        dp.detach_endpoint(&ep_b()).unwrap();
    });
}

/// Conformance test `ingress_redirect_hairpins_to_local_proxy`: a connection entering pod B
/// that B's ingress policy redirects goes back into the host-side interface and lands on the
/// node's transparent proxy with its original destination; the ingress proxy's own
/// connection to B (marked `MARK_MAGIC_FROM_INGRESS_PROXY`) passes B's policy, which would
/// otherwise drop the node's traffic.
pub fn ingress_redirect_hairpins_to_local_proxy<B: Backend>() {
    if skip("ingress_redirect_hairpins_to_local_proxy") {
        return;
    }
    let fs = Bpffs::new();
    let mut lab = Lab::new();
    lab.start_servers();
    lab.start_proxy(15002);
    let mut dp = B::load(&fs.pins()).unwrap_or_else(|e| panic!("load {}: {e}", B::NAME));
    setup(&mut dp, &lab);
    install(
        &mut dp,
        1,
        &map(&[(key(0, Egress, 0, 0, 0), EntryAction::Allow)]),
    );
    // B: 8080 from A allowed; 9090 from A redirected to the ingress proxy; nothing else.
    let mut b = policy_b(true, false);
    b.entries.insert(
        key(ID_A, Ingress, 6, 9090, 24),
        entry(EntryAction::Redirect {
            proxy_port: 15002,
            priority: 1,
        }),
    );
    install(&mut dp, 2, &b);
    assert_eq!(
        lab.ask(&lab.a, lab::B4, 8080).as_deref(),
        Some("hello"),
        "8080 reaches B"
    );
    let got = lab.ask(&lab.a, lab::B4, 9090);
    assert_eq!(
        got.as_deref(),
        Some(format!("proxy {}:9090", lab::B4).as_str()),
        "9090 lands on the proxy, which sees the original destination; events {:?}",
        dp.drain_events()
    );
    let ev = dp.drain_events().unwrap();
    assert!(
        ev.iter().any(|e| e.kind == EventKind::RedirectNew
            && e.proxy_port == 15002
            && e.direction == Ingress),
        "{ev:?}"
    );
    // The node (world to B's policy) is dropped, unless the connection carries the ingress
    // proxy's mark.
    let node = lab.node.clone();
    assert_eq!(
        lab.ask(&node, lab::B4, 8080),
        None,
        "the node is not allowed"
    );
    assert_eq!(
        lab.ask_marked(
            &node,
            lab::B4,
            8080,
            Some(abi::MARK_MAGIC_FROM_INGRESS_PROXY)
        )
        .as_deref(),
        Some("hello"),
        "the ingress proxy's connection passes"
    );
    // An egress proxy's connection is judged by the identity in its mark: A's is allowed.
    assert_eq!(
        lab.ask_marked(&node, lab::B4, 8080, Some(abi::egress_proxy_mark(ID_A)))
            .as_deref(),
        Some("hello"),
        "judged as A"
    );
    assert_eq!(
        lab.ask_marked(&node, lab::B4, 8080, Some(abi::egress_proxy_mark(ID_A + 1))),
        None,
        "judged as another identity"
    );
    lab.in_node(|| {
        dp.detach_endpoint(&ep_a()).unwrap();
        dp.detach_endpoint(&ep_b()).unwrap();
    });
}
