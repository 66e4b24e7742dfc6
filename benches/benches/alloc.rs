//! Identity allocation rate in memory, with 0 and with 60k identities already allocated,
//! interleaved A/B/A/B (noisy machine) and reported as medians. Same-run floor: inserting the
//! same label sets into a plain `HashMap<LabelSet, u32>`. Also the release (GC) rate.
//!
//! Prints `FIGURE <name> <value>` lines for `bench/control-plane.sh`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use weir_benches::{median, pod_labels};
use weir_identity::{Identity, IdentityAllocator, InMemoryAllocator, LabelSet};

const PREFILLED: usize = 60_000;
const BATCH: usize = 4_000;
const ROUNDS: usize = 7;

/// Allocates `batch` into `a`; returns allocations per second.
fn allocate_rate(a: &mut InMemoryAllocator, batch: &[LabelSet]) -> (f64, Vec<Identity>) {
    let t = Instant::now();
    let ids: Vec<Identity> = batch
        .iter()
        .filter_map(|l| a.allocate(black_box(l)).ok().map(|x| x.identity))
        .collect();
    let s = t.elapsed().as_secs_f64();
    (ids.len() as f64 / s, ids)
}

fn main() {
    // Distinct pods: the prefill and the batch come from one generated cluster.
    let n = PREFILLED + BATCH;
    let labels: Vec<LabelSet> = (0..n).map(|i| pod_labels(i, n)).collect();
    let (prefill, batch) = labels.split_at(PREFILLED);

    let mut at0 = Vec::new();
    let mut at60k = Vec::new();
    let mut floor = Vec::new();
    let mut release = Vec::new();
    for _ in 0..ROUNDS {
        // A: an empty allocator.
        let mut a = InMemoryAllocator::new();
        at0.push(allocate_rate(&mut a, batch).0);

        // B: 60k already allocated (prefill untimed).
        let mut b = InMemoryAllocator::new();
        for l in prefill {
            let _ = b.allocate(l);
        }
        let (rate, ids) = allocate_rate(&mut b, batch);
        at60k.push(rate);
        let t = Instant::now();
        for id in &ids {
            let _ = b.release(*id);
        }
        release.push(ids.len() as f64 / t.elapsed().as_secs_f64());

        // Floor: hash-consing the same label sets into a plain map.
        let mut m: HashMap<LabelSet, u32> = HashMap::new();
        let t = Instant::now();
        for (i, l) in batch.iter().enumerate() {
            m.entry(black_box(l).clone()).or_insert(i as u32);
        }
        floor.push(batch.len() as f64 / t.elapsed().as_secs_f64());
        black_box(m);
    }
    let r0 = median(&mut at0);
    let r60 = median(&mut at60k);
    let rf = median(&mut floor);
    let rr = median(&mut release);
    println!("FIGURE alloc_per_s_at_0 {r0:.0}");
    println!("FIGURE alloc_per_s_at_60k {r60:.0}");
    println!("FIGURE alloc_60k_over_0 {:.3}", r60 / r0);
    println!("FIGURE hashmap_floor_per_s {rf:.0}");
    println!("FIGURE alloc_at_0_over_floor {:.3}", r0 / rf);
    println!("FIGURE release_per_s_at_60k {rr:.0}");
}
