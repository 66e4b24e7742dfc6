//! Incremental latency: one new identity reaching one endpoint's map (allocate, add to the
//! compiler, `update_identity`, diff ready), measured one update at a time so that p50 and p99
//! come out; then one changed policy reaching the map (`update_policy`). Same-run baseline: a
//! full compile of the same endpoint.
//!
//! Prints `FIGURE <name> <value>` lines for `bench/control-plane.sh`.

use std::hint::black_box;
use std::time::Instant;

use weir_benches::{loaded_compiler, median, namespaces, percentile};
use weir_identity::{IdentityAllocator, LabelFilter, pod_identity_labels};
use weir_policy_compiler::NamedPorts;
use weir_policy_model::{Policy, parse_policies};

const SEED: u64 = 0x5EED;

fn run(rules: usize, identities: usize, samples: usize) {
    let tag = format!("{}k_x_{}k", rules / 1000, identities / 1000);
    let Ok((mut compiler, mut cluster)) = loaded_compiler(rules, identities, SEED) else {
        eprintln!("fixture failed to parse");
        return;
    };
    let ep = cluster.endpoint.clone();
    let mut policy = compiler.compile(&ep);

    // Baseline: full compiles of the same endpoint, in this run.
    let mut full: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            black_box(compiler.compile(&ep));
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let full_us = median(&mut full);

    let n_ns = namespaces(identities);
    let mut lat_us = Vec::with_capacity(samples);
    // Samples during which the thread was not preempted (the box is shared: a preemption
    // costs a scheduler slice, ~4 ms, whatever the code does).
    let mut lat_clean = Vec::with_capacity(samples);
    let mut touched = 0usize;
    for k in 0..samples {
        let labels = pod_identity_labels(
            &format!("ns{}", k % n_ns),
            [
                ("app", format!("app{}", k % 20)),
                ("tier", "backend".to_string()),
                ("team", format!("team{}", k % 5)),
                ("version", format!("new{k}")),
            ],
            [("kubernetes.io/metadata.name", format!("ns{}", k % n_ns))],
            "default",
            weir_benches::CLUSTER,
            &LabelFilter::default(),
        );
        let nv = preemptions();
        let t = Instant::now();
        let Ok(a) = cluster.allocator.allocate(&labels) else {
            continue;
        };
        compiler.upsert_identity(a.identity, labels, NamedPorts::new());
        let diff = compiler.update_identity(&ep, &mut policy, a.identity);
        lat_us.push(t.elapsed().as_secs_f64() * 1e6);
        if preemptions() == nv {
            lat_clean.extend(lat_us.last());
        }
        touched += usize::from(!diff.is_empty());
        black_box(diff);
        // Undo, untimed, so every sample sees the same cluster.
        compiler.remove_identity(a.identity);
        black_box(compiler.update_identity(&ep, &mut policy, a.identity));
        let _ = cluster.allocator.release(a.identity);
    }
    // One changed policy (one port flips between two values) → map diff, one at a time.
    let mut pol_us = Vec::new();
    let mut pol_clean = Vec::new();
    if let Some((a, b)) = changed_policy_versions() {
        let name = a.name.clone();
        compiler.upsert_policy(a.clone());
        compiler.update_policy(&ep, &mut policy, &name);
        for k in 0..samples / 2 {
            let next = if k % 2 == 0 { b.clone() } else { a.clone() };
            let nv = preemptions();
            let t = Instant::now();
            compiler.upsert_policy(next);
            let diff = compiler.update_policy(&ep, &mut policy, &name);
            pol_us.push(t.elapsed().as_secs_f64() * 1e6);
            if preemptions() == nv {
                pol_clean.extend(pol_us.last());
            }
            black_box(diff);
        }
    }
    pol_us.sort_by(f64::total_cmp);
    println!(
        "FIGURE changed_policy_p50_us_{tag} {:.1}",
        percentile(&pol_us, 50.0)
    );
    println!(
        "FIGURE changed_policy_p99_us_{tag} {:.1}",
        percentile(&pol_us, 99.0)
    );
    pol_clean.sort_by(f64::total_cmp);
    println!(
        "FIGURE changed_policy_p99_unpreempted_us_{tag} {:.1}",
        percentile(&pol_clean, 99.0)
    );
    lat_us.sort_by(f64::total_cmp);
    lat_clean.sort_by(f64::total_cmp);
    println!(
        "FIGURE new_identity_p99_unpreempted_us_{tag} {:.1}",
        percentile(&lat_clean, 99.0)
    );
    println!(
        "FIGURE new_identity_preempted_samples_{tag} {}",
        lat_us.len() - lat_clean.len()
    );
    let p50 = percentile(&lat_us, 50.0);
    let p99 = percentile(&lat_us, 99.0);
    println!(
        "{tag}: {} map entries, {} updates ({} changed the map); full compile median {full_us:.0} µs",
        policy.map_state.len(),
        lat_us.len(),
        touched
    );
    println!("FIGURE new_identity_p50_us_{tag} {p50:.1}");
    println!("FIGURE new_identity_p99_us_{tag} {p99:.1}");
    println!("FIGURE full_compile_median_us_{tag} {full_us:.1}");
    println!(
        "FIGURE new_identity_p99_over_full_compile_{tag} {:.5}",
        p99 / full_us
    );
}

/// Involuntary context switches of this thread so far (Linux; 0 elsewhere).
fn preemptions() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("nonvoluntary_ctxt_switches"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Two versions of one extra policy selecting the endpoint; they differ in one port.
fn changed_policy_versions() -> Option<(Policy, Policy)> {
    let doc = |port: u16| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: changing\n  namespace: ns0\nspec:\n  endpointSelector:\n    matchLabels:\n      app: app0\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: app3\n    toPorts:\n    - ports:\n      - port: \"{port}\"\n        protocol: TCP\n"
        )
    };
    let a = parse_policies("a.yaml", &doc(7001)).ok()?.pop()?;
    let b = parse_policies("b.yaml", &doc(7002)).ok()?.pop()?;
    Some((a, b))
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no options.
    run(3000, 1000, 2000);
    run(10_000, 10_000, 1000);
}
