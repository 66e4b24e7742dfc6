//! Verdict cost of the full program with BPF_PROG_TEST_RUN, against the empty classifier in the
//! same run: a 64-byte TCP SYN entering a pod, at 1, 1k, 10k and 64k policy entries with 100k
//! ipcache prefixes. Also the time to apply a 16k-entry policy diff.
//!
//! `cargo bench -p weir-datapath-aya --bench verdict` as root (skips otherwise).
//! `WEIR_BENCH_REPEAT` sets the repeat count of each run (default 1,000,000).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use weir_datapath::{Datapath, EndpointId};
use weir_datapath_abi as abi;
use weir_datapath_aya::packet::PacketSpec;
use weir_datapath_aya::replay::Replayer;
use weir_datapath_aya::{AyaDatapath, HookDirection};
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapStateDiff, PolicyEntry, PolicyKey};
use weir_policy_model::Direction;

const IPCACHE_PREFIXES: u32 = 100_000;
const SIZES: [u32; 4] = [1, 1_000, 10_000, 65_536];
const ROUNDS: usize = 7;
const PEER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn key(identity: u32, port: u16) -> PolicyKey {
    PolicyKey {
        identity: Identity(identity),
        direction: Direction::Ingress,
        protocol: 6,
        port,
        prefix_len: 24,
    }
}

fn allow() -> PolicyEntry {
    PolicyEntry {
        action: EntryAction::Allow,
        derived_from: Default::default(),
    }
}

/// Filler entry `i` (1-based; entry 0 is the allow the established packet uses).
fn filler(i: u32) -> (PolicyKey, PolicyEntry) {
    (
        key(
            10_000 + i % 60_000,
            1_000 + (i / 60_000) as u16 * 7 + (i % 50_000) as u16,
        ),
        allow(),
    )
}

fn ns(dp: &AyaDatapath, hook: HookDirection, pkt: &[u8], repeat: u32) -> f64 {
    match dp.test_run(hook, pkt, repeat) {
        Ok(o) => o.duration.as_nanos() as f64,
        Err(e) => {
            eprintln!("test run failed: {e}");
            std::process::exit(1);
        }
    }
}

/// The least-disturbed round: on a shared, loaded machine noise only ever adds time.
fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("verdict bench: SKIPPED (needs root)");
        return;
    }
    let repeat: u32 = std::env::var("WEIR_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut r = match Replayer::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("verdict bench: {e}");
            std::process::exit(1);
        }
    };
    let dp = r.datapath_mut();
    dp.register_ifindex(
        1,
        abi::EndpointInfo {
            endpoint_id: 1,
            identity: 1000,
            flags: 0,
        },
    )
    .unwrap_or_else(|e| panic!("register: {e}"));
    // 100k /32 prefixes; the peer is one of them.
    for i in 0..IPCACHE_PREFIXES {
        let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i);
        dp.upsert_ipcache(IpAddr::V4(a).into(), Identity(10_000 + i % 60_000))
            .unwrap_or_else(|e| panic!("ipcache: {e}"));
    }
    dp.upsert_ipcache(IpAddr::V4(PEER).into(), Identity(300))
        .unwrap_or_else(|e| panic!("ipcache: {e}"));
    let ep = EndpointId(1);
    dp.apply_policy_diff(
        ep,
        &MapStateDiff {
            upserts: vec![(key(300, 80), allow())],
            removals: vec![],
        },
    )
    .unwrap_or_else(|e| panic!("policy: {e}"));
    let syn =
        |dport| PacketSpec::tcp(IpAddr::V4(PEER), IpAddr::V4(POD), 40_000, dport, 0x02).build();
    // Allowed: the first run creates the conntrack entry, every later one is established.
    let established = syn(80);
    // No entry matches: every run is a new connection through parse, both conntrack lookups,
    // the ipcache, both policy lookups and the drop (reason 133).
    let denied = syn(81);
    println!(
        "# verdict cost, ns/packet, BPF_PROG_TEST_RUN repeat {repeat}, minimum of {ROUNDS} interleaved rounds; \
         {IPCACHE_PREFIXES} ipcache prefixes; packet {} bytes",
        denied.len()
    );
    println!(
        "entries | empty | established | new+deny (full verdict) | full - empty | full vs 1 entry"
    );
    let mut have = 1u32;
    let mut first_full = None;
    for size in SIZES {
        let ups: Vec<_> = (have..size).map(filler).collect();
        dp.apply_policy_diff(
            ep,
            &MapStateDiff {
                upserts: ups,
                removals: vec![],
            },
        )
        .unwrap_or_else(|e| panic!("policy: {e}"));
        have = size;
        let (mut e, mut est, mut full) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            e.push(ns(dp, HookDirection::Empty, &denied, repeat));
            est.push(ns(dp, HookDirection::ToPod, &established, repeat));
            full.push(ns(dp, HookDirection::ToPod, &denied, repeat));
        }
        let (e, est, full) = (min(&e), min(&est), min(&full));
        let base = *first_full.get_or_insert(full - e);
        println!(
            "{size} | {e:.0} | {est:.0} | {full:.0} | {:.0} | {:.2}x",
            full - e,
            (full - e) / base
        );
    }
    let c = dp.counters().unwrap_or_default();
    println!(
        "# events lost while nobody read the ring: {}",
        c.events_lost
    );

    // Time to apply a 16k-entry diff to a fresh endpoint (adds), then to remove it again.
    let ep2 = EndpointId(2);
    let diff: Vec<_> = (0..16_384u32)
        .map(|i| (key(20_000 + i, 443), allow()))
        .collect();
    let keys: Vec<_> = diff.iter().map(|(k, _)| *k).collect();
    let t = Instant::now();
    dp.apply_policy_diff(
        ep2,
        &MapStateDiff {
            upserts: diff,
            removals: vec![],
        },
    )
    .unwrap_or_else(|e| panic!("policy: {e}"));
    let add = t.elapsed();
    let t = Instant::now();
    dp.apply_policy_diff(
        ep2,
        &MapStateDiff {
            upserts: vec![],
            removals: keys,
        },
    )
    .unwrap_or_else(|e| panic!("policy: {e}"));
    let rem = t.elapsed();
    println!(
        "# 16384-entry policy diff: add {:.1} ms, remove {:.1} ms",
        add.as_secs_f64() * 1e3,
        rem.as_secs_f64() * 1e3
    );
}
