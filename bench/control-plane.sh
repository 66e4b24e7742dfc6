#!/usr/bin/env bash
# Control-plane benchmarks (GOALS.md "Control plane"): runs every bench of weir-benches in
# release and prints each figure with the same-run baseline it is compared to.
# Usage: bench/control-plane.sh            (about 3-5 minutes on 2 vCPUs, after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/criterion
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench -p weir-benches --no-run -q 2>/dev/null || cargo bench -p weir-benches --no-run

# Short criterion runs: the machine is shared, each group sets its own sample count and times.
cargo bench -q -p weir-benches --bench compile -- --noplot >"$LOG/compile.txt" 2>&1
for b in incremental alloc memory; do
  cargo bench -q -p weir-benches --bench "$b" >"$LOG/$b.txt" 2>&1
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -h "map entries\|bytes of YAML" "$LOG"/*.txt | sed 's/^/# /'

python3 - "$OUT" "$LOG" <<'PY'
import json, sys, os, glob
out, log = sys.argv[1], sys.argv[2]
def est(path):
    with open(os.path.join(out, path, "new", "estimates.json")) as f:
        return json.load(f)["median"]["point_estimate"]  # ns
fig = {}
for f in glob.glob(os.path.join(log, "*.txt")):
    for line in open(f):
        if line.startswith("FIGURE "):
            _, k, v = line.split()
            fig[k] = float(v)
ms = lambda ns: ns / 1e6
c3 = est("compile/3k_rules_x_1k_ids"); floor = est("compile/3k_x_1k_output_floor")
c10 = est("compile/10k_rules_x_10k_ids")
full = est("recompile/full_compile_3k_x_1k"); chg = est("recompile/one_changed_policy_3k_x_1k")
d = {n: est(f"decide/entries_{n}") / 1024 for n in (1, 1000, 10000, 65536)}
ytree = est("parse/yaml_tree_only"); pp = est("parse/parse_policies_3k")
ybytes = None
for line in open(os.path.join(log, "compile.txt")):
    if "bytes of YAML" in line:
        ybytes = int(line.split("parse: ")[1].split()[0])
rows = [
 ("compile 3k rules x 1k ids (ms)", ms(c3), f"output floor {ms(floor):.2f} ms", c3/floor, "<= 20 ms"),
 ("compile 10k x 10k (ms)", ms(c10), f"3k x 1k {ms(c3):.1f} ms", c10/c3, "<= 12x"),
 ("new identity -> map, 3k x 1k, p50/p99 (us)", f"{fig['new_identity_p50_us_3k_x_1k']:.0f}/{fig['new_identity_p99_us_3k_x_1k']:.0f}",
    f"full compile {fig['full_compile_median_us_3k_x_1k']/1000:.1f} ms", fig['new_identity_p99_over_full_compile_3k_x_1k'], "p99 <= 1 ms"),
 ("new identity -> map, 10k x 10k, p50/p99 (us)", f"{fig['new_identity_p50_us_10k_x_10k']:.0f}/{fig['new_identity_p99_us_10k_x_10k']:.0f}",
    f"full compile {fig['full_compile_median_us_10k_x_10k']/1000:.1f} ms", fig['new_identity_p99_over_full_compile_10k_x_10k'], "p99 <= 1 ms"),
 ("one changed policy -> diff (update_policy), 3k x 1k (ms, criterion median)", ms(chg), f"full compile {ms(full):.1f} ms", chg/full, "p99 <= 1 ms"),
 ("one changed policy -> diff, 3k x 1k, p50/p99 (us)", f"{fig['changed_policy_p50_us_3k_x_1k']:.0f}/{fig['changed_policy_p99_us_3k_x_1k']:.0f}",
    f"full compile {fig['full_compile_median_us_3k_x_1k']/1000:.1f} ms", fig['changed_policy_p99_us_3k_x_1k']/fig['full_compile_median_us_3k_x_1k'], "p99 <= 1 ms"),
 ("one changed policy -> diff, 10k x 10k, p50/p99 (us)", f"{fig['changed_policy_p50_us_10k_x_10k']:.0f}/{fig['changed_policy_p99_us_10k_x_10k']:.0f}",
    f"full compile {fig['full_compile_median_us_10k_x_10k']/1000:.1f} ms", fig['changed_policy_p99_us_10k_x_10k']/fig['full_compile_median_us_10k_x_10k'], "p99 <= 1 ms"),
 ("identity allocation at 0 (per s)", fig['alloc_per_s_at_0'], f"HashMap floor {fig['hashmap_floor_per_s']:.0f}/s", fig['alloc_at_0_over_floor'], ">= 100k/s"),
 ("identity allocation at 60k (per s)", fig['alloc_per_s_at_60k'], f"at 0: {fig['alloc_per_s_at_0']:.0f}/s", fig['alloc_60k_over_0'], ">= 0.8x"),
 ("identity release at 60k (per s)", fig['release_per_s_at_60k'], "-", None, ">= 1000/s"),
 ("bytes per remote endpoint (own identity)", fig['bytes_per_remote_endpoint'], f"label text {fig['label_text_bytes_per_identity']:.0f} B", fig['bytes_over_label_text'], "<= 2048 B"),
 ("bytes per map entry", fig['bytes_per_map_entry'], "-", None, "-"),
]
for n in (1000, 10000, 65536):
    rows.append((f"decide at {n} entries (ns)", d[n], f"1 entry {d[1]:.0f} ns", d[n]/d[1], "-"))
if ybytes:
    rows.append(("parse 3k policies (MB/s)", ybytes/pp*1e3, f"YAML tree only {ybytes/ytree*1e3:.1f} MB/s", pp/ytree, "-"))
print(f"{'what':50} {'weir':>14}  {'baseline (same run)':32} {'ratio':>8}  goal")
for what, v, base, r, goal in rows:
    vs = v if isinstance(v, str) else (f"{v:.2f}" if v < 100 else f"{v:.0f}")
    rs = "-" if r is None else f"{r:.3g}"
    print(f"{what:50} {vs:>14}  {base:32} {rs:>8}  {goal}")
print("memory split per identity (B): allocator", fig['bytes_allocator'], "compiler table", fig['bytes_compiler_table'],
      "selector cache", fig['bytes_selector_cache'], "ipcache", fig['bytes_ipcache'], "one label set", fig['bytes_one_label_set'])
PY
