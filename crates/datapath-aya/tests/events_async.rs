//! aya-only: events as an async stream (`AyaDatapath::next_events`, tokio).

mod backend;

use std::net::IpAddr;

use weir_datapath::packet::PacketSpec;
use weir_datapath_aya::HookDirection;
use weir_datapath_conformance::support::*;

#[tokio::test(flavor = "current_thread")]
async fn events_as_async_stream() {
    if skip("events_as_async_stream") {
        return;
    }
    let (_fs, mut dp) = load_for_test_run::<backend::Aya>();
    let peer: IpAddr = "10.0.1.5".parse().unwrap();
    let pod: IpAddr = "10.0.0.1".parse().unwrap();
    dp.test_run(
        HookDirection::ToPod,
        &PacketSpec::tcp(peer, pod, 1, 80, 0x02).build(),
        1,
    )
    .unwrap();
    let ev = tokio::time::timeout(std::time::Duration::from_secs(2), dp.next_events())
        .await
        .expect("events within 2 s")
        .unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].drop_reason, 133);
}
