//! Redirect: a TCP connection leaving pod A that hits a Redirect entry is delivered to a
//! transparent listener in the node namespace (bpf_sk_assign + policy routing on the mark).

mod common;

use common::lab::{self, Lab};
use common::scenario::*;
use common::*;
use weir_datapath::{Datapath, EventKind};
use weir_datapath_aya::AyaDatapath;
use weir_policy_compiler::EntryAction;
use weir_policy_model::Direction::Egress;

#[test]
fn redirects_to_local_proxy() {
    if skip("redirects_to_local_proxy") {
        return;
    }
    let fs = Bpffs::new();
    let mut lab = Lab::new();
    lab.start_servers();
    lab.start_proxy(15001);
    let mut dp = AyaDatapath::load(&fs.pins()).expect("load");
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
