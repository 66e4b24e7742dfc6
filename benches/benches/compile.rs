//! Control-plane timings with criterion: compile, recompile after one changed policy,
//! `decide` at growing map sizes, and policy parsing. Each group carries its same-run baseline
//! (see `BENCHMARKS.md`); `bench/control-plane.sh` turns the estimates into ratios.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use weir_benches::{Rng, loaded_compiler, policy_yaml};
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, Flow, MapState, PolicyEntry, PolicyKey, decide, proto};
use weir_policy_model::{
    Direction, Policy, PolicyKind, PolicyName, RuleRef, Section, parse_policies,
    yaml::parse_documents,
};

const SEED: u64 = 0x5EED;

/// 3k rules × 1k identities and 10k × 10k, each with its output floor.
fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let Ok((compiler, cluster)) = loaded_compiler(3000, 1000, SEED) else {
        return;
    };
    let ep = cluster.endpoint.clone();
    let compiled = compiler.compile(&ep);
    eprintln!(
        "compile 3k x 1k: {} map entries, {} L7 ports",
        compiled.map_state.len(),
        compiled.l7.ports.len()
    );
    g.bench_function("3k_rules_x_1k_ids", |b| {
        b.iter(|| black_box(compiler.compile(black_box(&ep))))
    });
    // The floor: materialising a map of the same entries (no policy logic at all).
    let entries: Vec<(PolicyKey, PolicyEntry)> = compiled
        .map_state
        .iter()
        .map(|(k, e)| (*k, e.clone()))
        .collect();
    g.bench_function("3k_x_1k_output_floor", |b| {
        b.iter(|| {
            let m: BTreeMap<PolicyKey, PolicyEntry> = black_box(&entries).iter().cloned().collect();
            black_box(m)
        })
    });
    drop((compiler, cluster, compiled, entries));

    let Ok((big, big_cluster)) = loaded_compiler(10_000, 10_000, SEED) else {
        return;
    };
    let ep = big_cluster.endpoint.clone();
    let big_compiled = big.compile(&ep);
    eprintln!(
        "compile 10k x 10k: {} map entries",
        big_compiled.map_state.len()
    );
    g.bench_function("10k_rules_x_10k_ids", |b| {
        b.iter(|| black_box(big.compile(black_box(&ep))))
    });
    // Its floor: the output's rule sets grow faster than its entries (many rules per key).
    let big_entries: Vec<(PolicyKey, PolicyEntry)> = big_compiled
        .map_state
        .iter()
        .map(|(k, e)| (*k, e.clone()))
        .collect();
    g.bench_function("10k_x_10k_output_floor", |b| {
        b.iter(|| {
            let m: BTreeMap<PolicyKey, PolicyEntry> =
                black_box(&big_entries).iter().cloned().collect();
            black_box(m)
        })
    });
    g.finish();
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

/// One changed policy → the map diff (`update_policy`: only that policy's keys are redone).
fn recompile(c: &mut Criterion) {
    let mut g = c.benchmark_group("recompile");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let Ok((mut compiler, cluster)) = loaded_compiler(3000, 1000, SEED) else {
        return;
    };
    let Some((a, b)) = changed_policy_versions() else {
        return;
    };
    let ep = cluster.endpoint.clone();
    let name = a.name.clone();
    compiler.upsert_policy(a.clone());
    let mut policy = compiler.compile(&ep);
    g.bench_function("full_compile_3k_x_1k", |bch| {
        bch.iter(|| black_box(compiler.compile(black_box(&ep))))
    });
    let mut flip = false;
    g.bench_function("one_changed_policy_3k_x_1k", |bch| {
        bch.iter(|| {
            flip = !flip;
            compiler.upsert_policy(if flip { b.clone() } else { a.clone() });
            let diff = compiler.update_policy(&ep, &mut policy, &name);
            debug_assert!(!diff.is_empty());
            black_box(diff)
        })
    });
    g.finish();
}

fn rule_ref() -> Arc<RuleRef> {
    Arc::new(RuleRef {
        policy: PolicyName {
            kind: PolicyKind::CiliumNetworkPolicy,
            namespace: Some("ns0".to_string()),
            name: "bench".to_string(),
        },
        spec: 0,
        multi_spec: false,
        section: Section::Ingress,
        index: 0,
    })
}

/// A map of `n` identity-specific TCP entries and 1024 flows, 3/4 of them hitting an entry.
fn decide_fixture(n: usize) -> (MapState, Vec<Flow>) {
    let mut rng = Rng::new(SEED);
    let rule = rule_ref();
    let mut map = MapState::new();
    let mut keys = Vec::with_capacity(n);
    while map.len() < n {
        let key = PolicyKey::new(
            Identity(256 + rng.below(65_000) as u32),
            Direction::Ingress,
            proto::TCP,
            1 + rng.below(u16::MAX as usize - 1) as u16,
            24,
        );
        let entry = PolicyEntry {
            action: EntryAction::Allow,
            derived_from: std::sync::Arc::new([rule.clone()].into_iter().collect()),
        };
        if map.get(&key).is_none() {
            keys.push(key);
        }
        map.insert(key, entry);
    }
    let flows = (0..1024)
        .map(|i| {
            let k = keys.get(rng.below(keys.len())).copied();
            match k {
                Some(k) if i % 4 != 3 => Flow {
                    direction: Direction::Ingress,
                    remote: k.identity,
                    protocol: proto::TCP,
                    port: k.port,
                },
                _ => Flow {
                    direction: Direction::Ingress,
                    remote: Identity(70_000),
                    protocol: proto::TCP,
                    port: 80,
                },
            }
        })
        .collect();
    (map, flows)
}

fn decide_cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1024));
    for n in [1usize, 1_000, 10_000, 65_536] {
        let (map, flows) = decide_fixture(n);
        g.bench_function(format!("entries_{n}"), |b| {
            b.iter(|| {
                for f in &flows {
                    black_box(decide(black_box(&map), f));
                }
            })
        });
    }
    g.finish();
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    let text = policy_yaml(3000, 1000, SEED);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(text.len() as u64));
    eprintln!("parse: {} bytes of YAML, 3000 objects", text.len());
    g.bench_function("yaml_tree_only", |b| {
        b.iter(|| black_box(parse_documents(black_box(&text)).map(|d| d.len())))
    });
    g.bench_function("parse_policies_3k", |b| {
        b.iter_batched(
            || (),
            |()| black_box(parse_policies("bench.yaml", black_box(&text)).map(|p| p.len())),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, compile, recompile, decide_cost, parse);
criterion_main!(benches);
