//! Differential test: two backends loaded side by side get the same random policies and the
//! same random packet sequences (IPv4/IPv6, TCP/UDP/SCTP/ICMP/other protocols, TCP flag
//! histories over a few reused ports so that conntrack matters, fragments, IPv6 extension
//! headers, truncations and random byte corruption). Every packet must get the same outcome
//! (TC action, verdict, drop reason, conntrack state, remote identity, mark) from both, and
//! every event record and counter must be the same. (Agreement with `decide` is each backend's
//! own property test, [`crate::prop`].)

use std::cell::RefCell;
use std::net::IpAddr;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use weir_datapath::packet::{ExtHeader, Fragment, L4, PacketSpec};
use weir_datapath::{Datapath, DatapathEvent};
use weir_identity::Identity;

use crate::prop::arb_map;
use crate::support::*;
use crate::{Backend, Hook, Outcome};

/// Remote addresses; the ipcache knows the first two of each family (/24 and /32 entries).
const REMOTES: [&str; 6] = [
    "10.0.1.5",
    "10.0.2.5",
    "192.0.2.1",
    "fd00:1::5",
    "fd00:2::5",
    "2001:db8::1",
];
const POD4: &str = "10.0.0.1";
const POD6: &str = "fd00::1";

/// One random packet.
#[derive(Debug, Clone)]
struct Pkt {
    remote: usize,
    egress: bool,
    /// 6, 17, 132, 1 (ICMP, 58 over IPv6) or 47 (carried raw).
    proto: u8,
    /// Few values, so that packets of the same flow repeat.
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    frag: Option<Fragment>,
    ext: u8,
    truncate: Option<u8>,
    /// A byte XORed into the frame at an offset (fraction of its length, 0–255).
    corrupt: Option<(u8, u8)>,
}

fn arb_pkt() -> impl Strategy<Value = Pkt> {
    (
        (
            0..REMOTES.len(),
            any::<bool>(),
            prop::sample::select(vec![6u8, 6, 6, 17, 17, 132, 1, 47]),
            prop::sample::select(vec![1000u16, 1001, 1002]),
            prop::sample::select(vec![0u16, 8, 53, 80, 128, 443, 8080, 133, 135]),
            prop::sample::select(vec![0x02u8, 0x12, 0x10, 0x11, 0x04, 0x18, 0x00, 0x03]),
        ),
        (
            prop_oneof![
                6 => Just(None),
                1 => (0u16..3, any::<bool>(), 0u32..3)
                    .prop_map(|(o, more, id)| Some(Fragment { offset: o * 8, more, id })),
            ],
            prop_oneof![6 => Just(0u8), 1 => 1u8..=10],
            prop_oneof![8 => Just(None), 1 => any::<u8>().prop_map(Some)],
            prop_oneof![8 => Just(None), 1 => any::<(u8, u8)>().prop_map(Some)],
        ),
    )
        .prop_map(
            |((remote, egress, proto, sport, dport, tcp_flags), (frag, ext, truncate, corrupt))| {
                Pkt {
                    remote,
                    egress,
                    proto,
                    sport,
                    dport,
                    tcp_flags,
                    frag,
                    ext,
                    truncate,
                    corrupt,
                }
            },
        )
}

fn frame(p: &Pkt) -> (Hook, Vec<u8>) {
    let remote: IpAddr = REMOTES[p.remote].parse().unwrap_or(IpAddr::from([0u8; 4]));
    let v6 = remote.is_ipv6();
    let pod: IpAddr = if v6 { POD6 } else { POD4 }
        .parse()
        .unwrap_or(IpAddr::from([0u8; 4]));
    let (src, dst, hook) = if p.egress {
        (pod, remote, Hook::FromPod)
    } else {
        (remote, pod, Hook::ToPod)
    };
    // Replies swap the ports, so that conntrack sees both directions of a flow.
    let reply = p.tcp_flags & 0x10 != 0 && p.egress == (p.sport == 1000);
    let (sport, dport) = if reply {
        (p.dport, p.sport)
    } else {
        (p.sport, p.dport)
    };
    let l4 = match p.proto {
        6 => L4::Tcp {
            sport,
            dport,
            flags: p.tcp_flags,
        },
        17 => L4::Udp { sport, dport },
        132 => L4::Sctp { sport, dport },
        1 => L4::Icmp {
            ty: (p.dport & 0xff) as u8,
            code: 0,
            id: p.sport,
        },
        proto => L4::Raw {
            protocol: proto,
            payload: vec![0; 8],
        },
    };
    let mut spec = PacketSpec::new(src, dst, l4);
    spec.fragment = p.frag;
    if v6 {
        let kinds = [ExtHeader::HopByHop, ExtHeader::DestOpts, ExtHeader::Routing];
        spec.ipv6_ext = (0..p.ext).map(|i| kinds[usize::from(i) % 3]).collect();
    }
    let full = spec.build().len();
    // Test runs refuse frames shorter than Ethernet + the IP header; cut inside L4 or later.
    let min = 14 + if v6 { 40 } else { 20 };
    if let Some(t) = p.truncate {
        spec.truncate_to = Some(min + (full.saturating_sub(min)) * usize::from(t) / 256);
    }
    let mut f = spec.build();
    if let Some((at, x)) = p.corrupt {
        let i = f.len() * usize::from(at) / 256;
        if let Some(b) = f.get_mut(i) {
            *b ^= x.max(1);
        }
    }
    (hook, f)
}

/// Events without their timestamps (each backend stamps its own).
fn comparable(mut ev: Vec<DatapathEvent>) -> Vec<DatapathEvent> {
    for e in &mut ev {
        e.timestamp_ns = 0;
    }
    ev
}

fn same(a: &Outcome, b: &Outcome) -> bool {
    (
        a.tc_action,
        a.verdict,
        a.ct_state,
        a.remote_identity,
        a.mark,
    ) == (
        b.tc_action,
        b.verdict,
        b.ct_state,
        b.remote_identity,
        b.mark,
    )
}

fn load_pair<A: Backend, B: Backend>() -> ((Bpffs, A::Dp), (Bpffs, B::Dp)) {
    let mut a = load_for_test_run::<A>();
    let mut b = load_for_test_run::<B>();
    for (net, id) in [
        ("10.0.1.0/24", 300),
        ("10.0.2.5/32", 301),
        ("fd00:1::/64", 300),
        ("fd00:2::5/128", 301),
        ("10.0.0.1/32", 1000),
    ] {
        let net = net.parse().unwrap_or_else(|e| panic!("{net}: {e}"));
        a.1.upsert_ipcache(net, Identity(id)).expect("ipcache");
        b.1.upsert_ipcache(net, Identity(id)).expect("ipcache");
    }
    (a, b)
}

/// Random policies and packet sequences through backends `A` and `B`: identical outcomes,
/// events and counters.
pub fn backends_agree<A: Backend, B: Backend>(cases: u32) {
    if skip("backends_agree") {
        return;
    }
    let ((_fa, a), (_fb, b)) = load_pair::<A, B>();
    let dps = RefCell::new((a, b));
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let seen = RefCell::new(std::collections::BTreeMap::<String, usize>::new());
    let result = runner.run(
        &(arb_map(), prop::collection::vec(arb_pkt(), 1..24)),
        |(m, pkts)| {
            let mut guard = dps.borrow_mut();
            let (a, b) = &mut *guard;
            install(a, 1, &m);
            install(b, 1, &m);
            // Conntrack and fragment state carry over from case to case: both backends see
            // the same history, so their state stays the same too.
            for (i, p) in pkts.iter().enumerate() {
                let (hook, f) = frame(p);
                let oa =
                    A::test_run(a, hook, &f, 1).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let ob =
                    B::test_run(b, hook, &f, 1).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(
                    same(&oa, &ob),
                    "packet {} of {:?}\n{}: {:?}\n{}: {:?}\nmap {:?}\npackets {:?}",
                    i,
                    p,
                    A::NAME,
                    oa,
                    B::NAME,
                    ob,
                    m,
                    pkts
                );
                let ea = comparable(
                    a.drain_events()
                        .map_err(|e| TestCaseError::fail(e.to_string()))?,
                );
                let eb = comparable(
                    b.drain_events()
                        .map_err(|e| TestCaseError::fail(e.to_string()))?,
                );
                prop_assert_eq!(&ea, &eb, "events of packet {} of {:?}", i, p);
                *seen
                    .borrow_mut()
                    .entry(format!("{:?}", oa.verdict))
                    .or_default() += 1;
            }
            prop_assert_eq!(a.counters().ok(), b.counters().ok(), "counters");
            Ok(())
        },
    );
    let seen = seen.into_inner();
    eprintln!("{} vs {}: outcomes seen {seen:?}", A::NAME, B::NAME);
    if let Err(e) = result {
        panic!("{} and {} disagree: {e}", A::NAME, B::NAME);
    }
    assert!(seen.len() >= 5, "too few kinds of outcome: {seen:?}");
}
