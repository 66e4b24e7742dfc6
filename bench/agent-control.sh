#!/usr/bin/env bash
# Agent control-plane figures on a real lab (GOALS.md "Control plane"; issue 5 "Speed"), as root:
#   - endpoint ADD -> READY through weir-cni and the agent, and pod churn (ADD+DEL cycles per
#     second), against the reference `ptp` CNI plugin (veth + host-local IPAM, no policy) on the
#     same node namespace, alternating run by run;
#   - agent memory (RSS) with 100 and 1,000 more endpoints than the seed lab;
#   - policy change -> enforcement: `weir policy import` (returns once the change is in the
#     kernel; a probe checks the new verdict after each), against one iptables rule inserted or
#     deleted in the server pod's namespace; and a file renamed into the watched directory until
#     the agent reports the new revision, against the agent's poll period.
# Usage: bench/agent-control.sh [ROUNDS]     (default 20; ~2 min after the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-20}
[ "$(id -u)" = 0 ] || { echo "bench/agent-control.sh needs root (it builds a lab)"; exit 1; }
[ -x /usr/lib/cni/ptp ] || { echo "the baseline needs /usr/lib/cni/ptp (containernetworking-plugins)"; exit 1; }
cargo build --release -q -p weir-agent -p weir-cni -p weir-cli
cargo build --release -q -p weir-lab --example control_bench
echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
target/release/examples/control_bench "$PWD/target/release" "$ROUNDS" >"$OUT"
cat "$OUT"
python3 -c '
import sys
f = {}
for line in sys.stdin:
    if line.startswith("FIGURE "):
        _, k, v = line.split()
        f[k] = float(v)
rows = [
  ("CNI ADD -> READY, p50 (ms)", f["add_ready_p50_ms_weir"], "ptp ADD %.1f ms" % f["add_p50_ms_ptp"], f["add_ready_over_ptp"]),
  ("pod churn, ADD+DEL per s", f["churn_per_s_weir"], "ptp %.1f/s" % f["churn_per_s_ptp"], f["churn_weir_over_ptp"]),
  ("weir policy import -> enforced, p50 (ms)", f["policy_import_p50_ms"], "iptables rule %.1f ms" % f["iptables_rule_p50_ms"], f["policy_import_over_iptables"]),
  ("policy file -> enforced, p50 (ms)", f["policy_file_to_enforced_p50_ms"], "poll period", f["policy_file_over_poll_period"]),
  ("agent RSS, 100 more endpoints (MiB)", f["agent_rss_mib_100_endpoints"], "seed lab %.1f MiB" % f["agent_rss_mib_seed_lab"], f["agent_rss_mib_100_endpoints"] / f["agent_rss_mib_seed_lab"]),
  ("agent RSS, 1000 more endpoints (MiB)", f["agent_rss_mib_1000_endpoints"], "seed lab %.1f MiB" % f["agent_rss_mib_seed_lab"], f["agent_rss_1000_over_seed"]),
  ("agent KiB per local endpoint (100 -> 1000)", f["agent_kib_per_endpoint_100_to_1000"], "none in this run", None),
]
print()
print("| figure | Weir | baseline (same run) | ratio |")
print("|---|---|---|---|")
for name, v, base, r in rows:
    ratio = "-" if r is None else f"{r:.2f}x"
    print(f"| {name} | {v:.1f} | {base} | {ratio} |")
wrong = int(f["wrong_verdicts_after_change"])
print("wrong verdicts right after a change:", wrong)
' <"$OUT"
