//! Verdict cost of the full program with BPF_PROG_TEST_RUN for both kernel backends in one run:
//! the aya programs (Rust) and the libbpf programs (C), each against its own `weir_empty`
//! classifier, and against each other. A 64-byte TCP SYN entering a pod, at 1, 1k, 10k and 64k
//! policy entries with 100k ipcache prefixes; rounds interleave the backends (alternating which
//! goes first) so that machine noise falls on both alike. Also the time to apply and to remove a
//! 16k-entry policy diff, interleaved the same way.
//!
//! One body, generic over the conformance suite's `Backend`; the two `Backend` impls are the
//! ones the conformance and differential tests use.
//!
//! `cargo bench -p weir-datapath-libbpf --bench verdict` as root (skips otherwise).
//! `WEIR_BENCH_REPEAT` sets the repeat count of each test run (default 1,000,000),
//! `WEIR_BENCH_ROUNDS` the number of interleaved rounds (default 7).

#[path = "../../datapath-aya/tests/backend/mod.rs"]
mod aya_backend;
#[path = "../tests/backend/mod.rs"]
mod backend;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use weir_datapath::packet::PacketSpec;
use weir_datapath::{Datapath, EndpointId, Verdict};
use weir_datapath_conformance::support::{Bpffs, load_for_test_run, skip};
use weir_datapath_conformance::{Backend, CtState, Hook};
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapStateDiff, PolicyEntry, PolicyKey};
use weir_policy_model::Direction;

use aya_backend::Aya;
use backend::Libbpf;
use weir_datapath_libbpf::LibbpfDatapath;

/// The libbpf programs built without the per-entry policy counters: the same-run baseline of
/// what counting costs.
struct LibbpfNoCounters;

impl Backend for LibbpfNoCounters {
    const NAME: &'static str = "libbpf without entry counters";
    type Dp = LibbpfDatapath;

    fn load(pin_dir: &std::path::Path) -> Result<LibbpfDatapath, String> {
        LibbpfDatapath::load_without_entry_counters(pin_dir).map_err(|e| e.to_string())
    }

    fn register_ifindex(
        dp: &mut LibbpfDatapath,
        ifindex: u32,
        info: weir_datapath_abi::EndpointInfo,
    ) -> Result<(), weir_datapath::DatapathError> {
        Libbpf::register_ifindex(dp, ifindex, info)
    }

    fn unregister_ifindex(
        dp: &mut LibbpfDatapath,
        ifindex: u32,
    ) -> Result<(), weir_datapath::DatapathError> {
        Libbpf::unregister_ifindex(dp, ifindex)
    }

    fn test_run(
        dp: &LibbpfDatapath,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<weir_datapath_conformance::Outcome, weir_datapath::DatapathError> {
        Libbpf::test_run(dp, hook, packet, repeat)
    }
}

/// The port of the SYN a deny entry drops (every run is a policy decision that counts).
const DENIED_BY_ENTRY_PORT: u16 = 82;

/// What the per-entry counters cost: the libbpf programs with and without them, same maps
/// (10k entries), interleaved rounds; a SYN dropped by a deny entry (counted on every run) and
/// the default-deny SYN (no entry, nothing counted). Minimum ns per run.
fn entry_counters_cost(p: &Packets, repeat: u32, rounds: u32) {
    let mut with = Rig::<Libbpf>::new();
    let mut without = Rig::<LibbpfNoCounters>::new();
    let deny = PolicyEntry {
        action: EntryAction::Deny,
        derived_from: Default::default(),
    };
    let by_entry = PacketSpec::tcp(
        IpAddr::V4(PEER),
        IpAddr::V4(POD),
        40_000,
        DENIED_BY_ENTRY_PORT,
        0x02,
    )
    .build();
    for dp in [&mut with.dp, &mut without.dp] {
        dp.apply_policy_diff(
            EndpointId(1),
            &MapStateDiff {
                upserts: vec![(key(300, DENIED_BY_ENTRY_PORT), deny.clone())],
                removals: vec![],
            },
        )
        .unwrap_or_else(|e| fail("deny entry", e));
    }
    with.grow(10_000);
    without.grow(10_000);
    // [deny entry, default deny] samples, with and without the counters.
    let (mut w, mut wo) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for r in 0..rounds {
        for counting in [r % 2 == 0, r % 2 != 0] {
            for (i, pkt) in [&by_entry, &p.denied].into_iter().enumerate() {
                let (ns, out) = if counting {
                    (with.ns(Hook::ToPod, pkt, repeat), &mut w)
                } else {
                    (without.ns(Hook::ToPod, pkt, repeat), &mut wo)
                };
                if let Some(v) = out.get_mut(i) {
                    v.push(ns);
                }
            }
        }
    }
    let counted = with
        .dp
        .dump_policy_entries(EndpointId(1))
        .ok()
        .and_then(|m| m.get(&key(300, DENIED_BY_ENTRY_PORT)).map(|e| e.packets))
        .unwrap_or_default();
    println!(
        "# per-entry counters, libbpf, 10k entries, ns/packet, minimum of {rounds} interleaved \
         rounds (the deny entry counted {counted} packets)"
    );
    println!("packet | with counters | without | with / without");
    for (i, name) in ["SYN dropped by a deny entry", "SYN dropped by default deny"]
        .iter()
        .enumerate()
    {
        let (a, b) = (min(&w[i]), min(&wo[i]));
        println!("{name} | {a:.0} | {b:.0} | {:.3}x", a / b);
    }
}

const IPCACHE_PREFIXES: u32 = 100_000;
const SIZES: [u32; 4] = [1, 1_000, 10_000, 65_536];
const DIFF_ENTRIES: u32 = 16_384;
const PEER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The drop reason of a packet no policy entry allows.
const REASON_POLICY_DENIED: u8 = 133;

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

/// Filler entry `i` (1-based; entry 0 is the allow the established packet uses). Other
/// identities, so no filler ever matches the measured packets.
fn filler(i: u32) -> (PolicyKey, PolicyEntry) {
    (
        key(
            10_000 + i % 60_000,
            1_000 + (i / 60_000) as u16 * 7 + (i % 50_000) as u16,
        ),
        allow(),
    )
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("verdict bench: {what}: {e}");
    std::process::exit(1)
}

/// The packets every backend sees.
struct Packets {
    /// Allowed: the first run creates the conntrack entry, every later one is established.
    established: Vec<u8>,
    /// No entry matches: every run is a new connection through parse, conntrack, the ipcache,
    /// both policy lookups and the drop (reason 133).
    denied: Vec<u8>,
}

/// One backend, loaded on its own bpffs with the same maps as the other.
struct Rig<B: Backend> {
    _fs: Bpffs,
    dp: B::Dp,
    entries: u32,
}

impl<B: Backend> Rig<B> {
    fn new() -> Self {
        let (fs, mut dp) = load_for_test_run::<B>();
        // 100k /32 prefixes of other identities, and the peer.
        for i in 0..IPCACHE_PREFIXES {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i);
            dp.upsert_ipcache(IpAddr::V4(a).into(), Identity(10_000 + i % 60_000))
                .unwrap_or_else(|e| fail("ipcache", e));
        }
        dp.upsert_ipcache(IpAddr::V4(PEER).into(), Identity(300))
            .unwrap_or_else(|e| fail("ipcache", e));
        Self::apply(
            &mut dp,
            EndpointId(1),
            vec![(key(300, 80), allow())],
            vec![],
        );
        Rig {
            _fs: fs,
            dp,
            entries: 1,
        }
    }

    fn apply(
        dp: &mut B::Dp,
        ep: EndpointId,
        upserts: Vec<(PolicyKey, PolicyEntry)>,
        removals: Vec<PolicyKey>,
    ) {
        dp.apply_policy_diff(ep, &MapStateDiff { upserts, removals })
            .unwrap_or_else(|e| fail(B::NAME, e));
    }

    /// Fills endpoint 1's policy up to `size` entries.
    fn grow(&mut self, size: u32) {
        let ups = (self.entries..size).map(filler).collect();
        Self::apply(&mut self.dp, EndpointId(1), ups, vec![]);
        self.entries = size.max(self.entries);
    }

    /// Kernel-measured ns per run of `packet` through `hook`, after checking what it decided.
    fn ns(&self, hook: Hook, packet: &[u8], repeat: u32) -> f64 {
        let o = B::test_run(&self.dp, hook, packet, repeat).unwrap_or_else(|e| fail(B::NAME, e));
        o.duration.as_nanos() as f64
    }

    /// Checks once that each packet takes the path it is meant to measure.
    fn check(&self, p: &Packets) {
        let run = |pkt: &[u8]| {
            B::test_run(&self.dp, Hook::ToPod, pkt, 1).unwrap_or_else(|e| fail(B::NAME, e))
        };
        let _ = run(&p.established);
        let est = run(&p.established);
        let den = run(&p.denied);
        let ok = est.verdict == Verdict::Allow
            && est.ct_state == Some(CtState::Established)
            && den.verdict
                == (Verdict::Drop {
                    reason: REASON_POLICY_DENIED,
                });
        if !ok {
            fail(
                B::NAME,
                format!("unexpected outcomes: established {est:?}, denied {den:?}"),
            );
        }
    }

    /// One round: empty, established, full verdict.
    fn round(&self, p: &Packets, repeat: u32, out: &mut Samples) {
        out.empty.push(self.ns(Hook::Empty, &p.denied, repeat));
        out.established
            .push(self.ns(Hook::ToPod, &p.established, repeat));
        out.full.push(self.ns(Hook::ToPod, &p.denied, repeat));
    }

    /// Applies a 16k-entry diff to a fresh endpoint, then removes it; milliseconds each.
    fn diff_apply(&mut self) -> (f64, f64) {
        let ep = EndpointId(2);
        let ups: Vec<_> = (0..DIFF_ENTRIES)
            .map(|i| (key(20_000 + i, 443), allow()))
            .collect();
        let keys: Vec<_> = ups.iter().map(|(k, _)| *k).collect();
        let t = Instant::now();
        Self::apply(&mut self.dp, ep, ups, vec![]);
        let add = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        Self::apply(&mut self.dp, ep, vec![], keys);
        let rem = t.elapsed().as_secs_f64() * 1e3;
        (add, rem)
    }
}

/// Per-round samples of one backend at one map size.
#[derive(Default)]
struct Samples {
    empty: Vec<f64>,
    established: Vec<f64>,
    full: Vec<f64>,
}

/// The least-disturbed round: on a shared, loaded machine noise only ever adds time.
fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s.get(n / 2).copied().unwrap_or(f64::NAN),
        n => {
            (s.get(n / 2 - 1).copied().unwrap_or(f64::NAN)
                + s.get(n / 2).copied().unwrap_or(f64::NAN))
                / 2.0
        }
    }
}

/// Minimum figures of one backend at one size.
struct Row {
    empty: f64,
    established: f64,
    full: f64,
}

impl Row {
    fn of(s: &Samples) -> Row {
        Row {
            empty: min(&s.empty),
            established: min(&s.established),
            full: min(&s.full),
        }
    }

    fn net(&self) -> f64 {
        self.full - self.empty
    }
}

fn env(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if skip("verdict bench") {
        return;
    }
    let repeat = env("WEIR_BENCH_REPEAT", 1_000_000);
    let rounds = env("WEIR_BENCH_ROUNDS", 7).max(1);
    let syn =
        |dport| PacketSpec::tcp(IpAddr::V4(PEER), IpAddr::V4(POD), 40_000, dport, 0x02).build();
    let p = Packets {
        established: syn(80),
        denied: syn(81),
    };
    let mut aya = Rig::<Aya>::new();
    let mut lb = Rig::<Libbpf>::new();
    aya.check(&p);
    lb.check(&p);
    println!(
        "# verdict cost, ns/packet, BPF_PROG_TEST_RUN repeat {repeat}, minimum of {rounds} rounds \
         interleaving aya and libbpf; {IPCACHE_PREFIXES} ipcache prefixes; packet {} bytes",
        p.denied.len()
    );
    println!(
        "entries | backend | empty | established | full verdict | full - empty | vs 1 entry | \
         median full - empty"
    );
    let mut first: Option<(f64, f64)> = None;
    let mut cross = Vec::new();
    for size in SIZES {
        aya.grow(size);
        lb.grow(size);
        let (mut sa, mut sl) = (Samples::default(), Samples::default());
        for r in 0..rounds {
            // Alternate who goes first, so neither always runs right after the other's caches.
            if r % 2 == 0 {
                aya.round(&p, repeat, &mut sa);
                lb.round(&p, repeat, &mut sl);
            } else {
                lb.round(&p, repeat, &mut sl);
                aya.round(&p, repeat, &mut sa);
            }
        }
        let (ra, rl) = (Row::of(&sa), Row::of(&sl));
        let (ba, bl) = *first.get_or_insert((ra.net(), rl.net()));
        for (name, row, base, s) in [("aya", &ra, ba, &sa), ("libbpf", &rl, bl, &sl)] {
            let med: Vec<f64> = s.full.iter().zip(&s.empty).map(|(f, e)| f - e).collect();
            println!(
                "{size} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.0}",
                row.empty,
                row.established,
                row.full,
                row.net(),
                row.net() / base,
                median(&med)
            );
        }
        cross.push((size, ra, rl));
    }
    println!("# libbpf / aya, same run");
    println!("entries | empty | established | full verdict | full - empty");
    for (size, a, l) in &cross {
        println!(
            "{size} | {:.2}x | {:.2}x | {:.2}x | {:.2}x",
            l.empty / a.empty,
            l.established / a.established,
            l.full / a.full,
            l.net() / a.net()
        );
    }
    for (name, c) in [("aya", aya.dp.counters()), ("libbpf", lb.dp.counters())] {
        println!(
            "# {name}: events lost while nobody read the ring: {}",
            c.map(|c| c.events_lost).unwrap_or_default()
        );
    }

    entry_counters_cost(&p, repeat, rounds);

    // 16k-entry diff to a fresh endpoint and back, interleaved like the verdict rounds.
    let (mut da, mut dl) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            da.push(aya.diff_apply());
            dl.push(lb.diff_apply());
        } else {
            dl.push(lb.diff_apply());
            da.push(aya.diff_apply());
        }
    }
    println!("# {DIFF_ENTRIES}-entry policy diff, ms, {rounds} interleaved rounds: min (median)");
    println!("backend | add | remove");
    let summary = |v: &[(f64, f64)]| {
        let add: Vec<f64> = v.iter().map(|x| x.0).collect();
        let rem: Vec<f64> = v.iter().map(|x| x.1).collect();
        (min(&add), median(&add), min(&rem), median(&rem))
    };
    let (a, l) = (summary(&da), summary(&dl));
    for (name, s) in [("aya", a), ("libbpf", l)] {
        println!("{name} | {:.1} ({:.1}) | {:.1} ({:.1})", s.0, s.1, s.2, s.3);
    }
    println!(
        "libbpf / aya | {:.2}x ({:.2}x) | {:.2}x ({:.2}x)",
        l.0 / a.0,
        l.1 / a.1,
        l.2 / a.2,
        l.3 / a.3
    );
}
