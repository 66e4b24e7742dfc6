//! Memory per remote endpoint, counted exactly with a counting global allocator: heap growth
//! while N distinct identities are allocated, added to the compiler and to a selector cache
//! holding the selectors of 1k policies, divided by N. Same-run baseline: the bytes of the
//! label text itself (keys and values), i.e. the information the agent must keep.
//! Also: heap bytes per entry of one endpoint's compiled map.
//!
//! Prints `FIGURE <name> <value>` lines for `bench/control-plane.sh`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use weir_benches::{CLUSTER, identity_labels, policies};
use weir_identity::{
    Identity, IdentityAllocator, IdentitySelector, InMemoryAllocator, SelectorCache,
};
use weir_policy_compiler::{Compiler, CompilerConfig, NamedPorts};
use weir_policy_model::{Peer, Peers};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` with the same arguments; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const N: usize = 20_000;
const RULES: usize = 1_000;

fn main() {
    let Ok(pols) = policies(RULES, N, 0x5EED) else {
        eprintln!("fixture failed to parse");
        return;
    };
    let mut cache = SelectorCache::new();
    let mut compiler = Compiler::new(CompilerConfig {
        cluster_name: CLUSTER.to_string(),
        ..CompilerConfig::default()
    });
    for p in pols {
        for r in &p.rules {
            for sec in [&r.ingress, &r.egress] {
                for pr in sec.allow.iter().chain(&sec.deny) {
                    let Peers::List(list) = &pr.peers else {
                        cache.add_selector(IdentitySelector::All);
                        continue;
                    };
                    for peer in list {
                        match peer {
                            Peer::Endpoints(s) => {
                                cache.add_selector(IdentitySelector::Labels(s.clone()));
                            }
                            Peer::Cidr { cidr, except } => {
                                cache.add_selector(IdentitySelector::cidr(
                                    *cidr,
                                    except.iter().copied(),
                                ));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        compiler.upsert_policy(p);
    }
    let mut alloc = InMemoryAllocator::new();
    // A minimal ipcache (endpoint IP → identity), as the agent keeps one per remote endpoint.
    let mut ipcache: BTreeMap<IpAddr, Identity> = BTreeMap::new();

    // Labels arrive from the Kubernetes watch; the agent keeps them, so they are counted.
    let mut label_text = 0usize;
    let mut by_part = [0isize; 4];
    let mut label_sets = 0isize;
    let before = live();
    let mut endpoint = None;
    for i in 0..N {
        let s0 = live();
        let labels = identity_labels(i, N);
        let t0 = live();
        label_sets += t0 - s0;
        label_text += labels
            .iter()
            .map(|l| l.key.len() + l.value.len())
            .sum::<usize>();
        let Ok(a) = alloc.allocate(&labels) else {
            continue;
        };
        let t1 = live();
        // The agent shares the allocator's labels with the compiler and the selector cache.
        let shared = alloc
            .shared_labels(a.identity)
            .unwrap_or_else(|| Arc::new(labels.clone()));
        compiler.upsert_identity_shared(a.identity, Arc::clone(&shared), NamedPorts::new());
        let t2 = live();
        black_box(cache.add_identity_shared(a.identity, shared));
        let t3 = live();
        ipcache.insert(
            IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + i as u32)),
            a.identity,
        );
        let t4 = live();
        by_part[0] += t1 - t0;
        by_part[1] += t2 - t1;
        by_part[2] += t3 - t2;
        by_part[3] += t4 - t3;
        if endpoint.is_none() {
            endpoint = Some((a.identity, labels));
        }
    }
    let per_id = (live() - before) as f64 / N as f64;
    let text = label_text as f64 / N as f64;
    let part = |k: usize| by_part.get(k).copied().unwrap_or(0) as f64 / N as f64;
    println!("FIGURE bytes_per_remote_endpoint {per_id:.0}");
    println!("FIGURE label_text_bytes_per_identity {text:.0}");
    println!("FIGURE bytes_over_label_text {:.2}", per_id / text);
    println!(
        "FIGURE bytes_one_label_set {:.0}",
        label_sets as f64 / N as f64
    );
    println!("FIGURE bytes_allocator {:.0}", part(0));
    println!("FIGURE bytes_compiler_table {:.0}", part(1));
    println!("FIGURE bytes_selector_cache {:.0}", part(2));
    println!("FIGURE bytes_ipcache {:.0}", part(3));
    println!(
        "FIGURE bytes_per_endpoint_over_cilium_10_5_KiB {:.3}",
        per_id / (10.5 * 1024.0)
    );

    // One endpoint's compiled map: bytes per entry.
    if let Some((identity, labels)) = endpoint {
        let ep = weir_policy_compiler::EndpointInfo {
            identity,
            labels,
            named_ports: NamedPorts::new(),
        };
        let b = live();
        let policy = compiler.compile(&ep);
        let grown = (live() - b) as f64;
        let entries = policy.map_state.len().max(1);
        println!("FIGURE map_entries {entries}");
        println!("FIGURE bytes_per_map_entry {:.0}", grown / entries as f64);
        black_box(policy);
    }
    black_box((alloc, compiler, cache, ipcache));
}
