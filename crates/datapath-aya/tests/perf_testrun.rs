//! Rough per-packet cost via BPF_PROG_TEST_RUN (kernel-measured average). Prints numbers;
//! asserts only that the runs work. Not a benchmark harness: see `benches/` for that.

mod backend;

use std::net::IpAddr;

use weir_datapath::Datapath;
use weir_datapath::packet::PacketSpec;
use weir_datapath_aya::HookDirection;
use weir_datapath_conformance::support::*;
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapStateDiff};
use weir_policy_model::Direction::Ingress;

const REPEAT: u32 = 200_000;

#[test]
fn per_packet_cost() {
    if skip("per_packet_cost") {
        return;
    }
    let (_fs, mut dp) = load_for_test_run::<backend::Aya>();
    dp.upsert_ipcache("10.0.1.0/24".parse().unwrap(), Identity(300))
        .unwrap();
    let peer: IpAddr = "10.0.1.5".parse().unwrap();
    let pod: IpAddr = "10.0.0.1".parse().unwrap();
    // Deny-path packets are never tracked, so every run takes the full policy path.
    let allowed = PacketSpec::tcp(peer, pod, 1234, 80, 0x02).build();
    let denied = PacketSpec::tcp(peer, pod, 1234, 81, 0x02).build();
    install(
        &mut dp,
        1,
        &map(&[(key(300, Ingress, 6, 80, 24), EntryAction::Allow)]),
    );
    let (a1, d1) = (dp_ns(&dp, &allowed), dp_ns(&dp, &denied));
    // 10 000 entries: filler keys of other identities.
    let diff = MapStateDiff {
        upserts: (0..9_999u32)
            .map(|i| {
                let k = key(10_000 + i, Ingress, 6, (i % 60_000) as u16, 24);
                (k, entry(EntryAction::Allow))
            })
            .collect(),
        removals: vec![],
    };
    dp.apply_policy_diff(weir_datapath::EndpointId(1), &diff)
        .unwrap();
    let (a10k, d10k) = (dp_ns(&dp, &allowed), dp_ns(&dp, &denied));
    // Baseline: the program exits after the endpoint lookup when the ifindex is not an endpoint.
    dp.unregister_ifindex(1).unwrap();
    let ep_map_only = dp_ns(&dp, &allowed);
    // Nobody reads the ring during the runs: it fills and further events are counted as lost.
    let c = dp.counters().unwrap();
    assert!(c.events_lost > 0, "{c:?}");
    eprintln!(
        "ns/packet (repeat {REPEAT}): established (CT hit) 1 entry {a1}, new+deny 1 entry {d1}, \
         established 10k entries {a10k}, new+deny 10k entries {d10k}, not-an-endpoint {ep_map_only}"
    );
}

fn dp_ns(dp: &weir_datapath_aya::AyaDatapath, pkt: &[u8]) -> u128 {
    let out = dp
        .test_run(HookDirection::ToPod, pkt, REPEAT)
        .expect("test run");
    out.duration.as_nanos()
}
