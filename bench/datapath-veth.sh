#!/bin/bash
# Weir on a veth, both kernel backends (aya: Rust programs; libbpf: C programs), against bare
# veth, and iptables (legacy, nft) with 1k and 10k rules: TCP stream (iperf3), 64-byte UDP
# packets per second (iperf3), TCP ping-pong latency (sockperf).
# Topology: netns A (client, 10.201.0.1, "the pod") <-veth-> netns B (server, 10.201.0.2).
# Weir is attached to B's side of the veth, as to a pod's host-side veth: the client's packets
# go through weir_from_pod (egress policy of the pod, 10k entries). iptables rules go in B's
# INPUT chain (non-matching, as in the seed's comparison). Everything lives in two namespaces
# with unique names and a private bpffs, removed on exit. Needs root, iperf3, sockperf
# (Debian package `sockperf`).
#
# The machine is shared and noisy, so the backends are measured in ROUNDS interleaved rounds:
# each round is bare veth, then aya and libbpf (alternating which goes first); one more bare
# veth closes the last round. Each backend figure is a ratio to the mean of the bare veth
# measurements either side of it, and libbpf is also compared with aya of the same round. The
# summary gives the median over rounds and the range (the noise).
# Usage: sudo bench/datapath-veth.sh [seconds per test, default 5] [rounds, default 3]
#        WEIR_VETH_IPTABLES=0 skips the iptables configurations.
set -u
T=${1:-5}
R=${2:-3}
IPT=${WEIR_VETH_IPTABLES:-1}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
A="weirvb$$a"; B="weirvb$$b"; WORK=$(mktemp -d); BPF="$WORK/bpffs"
cleanup() {
  [ -f "$WORK/iperf.pid" ] && kill "$(cat "$WORK/iperf.pid")" 2>/dev/null
  [ -f "$WORK/sp.pid" ] && kill "$(cat "$WORK/sp.pid")" 2>/dev/null
  sleep 0.3; ip netns del "$A" 2>/dev/null; ip netns del "$B" 2>/dev/null
  umount -l "$BPF" 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cargo build -q --release -p weir-datapath-libbpf --example bench_attach 2>/dev/null || { echo "build failed" >&2; exit 1; }
ATTACH=target/release/examples/bench_attach
ip netns add "$A"; ip netns add "$B"
ip link add va netns "$A" type veth peer name vb netns "$B"
ip -n "$A" addr add 10.201.0.1/24 dev va; ip -n "$B" addr add 10.201.0.2/24 dev vb
ip -n "$A" link set va up; ip -n "$B" link set vb up; ip -n "$A" link set lo up; ip -n "$B" link set lo up
ip netns exec "$B" iperf3 -s -D -p 5201 --pidfile "$WORK/iperf.pid"
ip netns exec "$B" sockperf sr --tcp -i 10.201.0.2 -p 11111 >/dev/null 2>&1 & echo $! > "$WORK/sp.pid"
sleep 1
mkdir -p "$BPF"; mount -t bpf bpf "$BPF"
python3 - "$WORK" <<'PY'
import sys; w=sys.argv[1]
for n in (1000,10000):
    with open(f'{w}/ipt_{n}.rules','w') as f:
        f.write('*filter\n:INPUT ACCEPT [0:0]\n')
        for i in range(n): f.write('-A INPUT -d 192.168.%d.%d/32 -p tcp -m tcp --dport 80 -j DROP\n'%((i>>8)&255,i&255))
        f.write('COMMIT\n')
PY
# measure ROUND CONFIG: one line "round|config|Gbit/s|kpps|p50 us|p99 us" to stdout and results.
measure() {
  local r=$1 L=$2 tcp udp rr
  tcp=$(ip netns exec "$A" iperf3 -c 10.201.0.2 -t "$T" -J | python3 -c 'import json,sys;e=json.load(sys.stdin)["end"];print("%.2f"%(e["sum_received"]["bits_per_second"]/1e9))')
  sleep 1
  udp=$(ip netns exec "$A" iperf3 -c 10.201.0.2 -u -b 0 -l 64 -t "$T" -J | python3 -c 'import json,sys;s=json.load(sys.stdin)["end"]["sum"];print("%.0f"%(s["packets"]/s["seconds"]/1e3))')
  sleep 2
  rr=$(ip netns exec "$A" sockperf pp --tcp --full-rtt -i 10.201.0.2 -p 11111 -t "$T" 2>&1 | sed "s/\x1b\[[0-9;]*m//g" | awk '/50.000/{p50=$NF} /99.000/{p99=$NF} END{print p50" "p99}')
  echo "$r|$L|$tcp|$udp|${rr% *}|${rr#* }" | tee -a "$WORK/results"
  sleep 1
}
# with_weir ROUND BACKEND: attach the backend's programs (10k entries), measure, detach.
with_weir() {
  local r=$1 be=$2
  # libbpf logs the kernel's refusal to re-create the clsact qdisc of the second hook (handled).
  nsenter --net=/var/run/netns/"$B" "$ATTACH" "$be" "$BPF/$be" vb 10.201.0.2 10000 2>&1 >/dev/null | grep -v 'Exclusivity flag on' >&2
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "attach $be failed" >&2; exit 1; }
  nsenter --net=/var/run/netns/"$B" tc filter show dev vb ingress | grep -q weir_from_pod || { echo "$be not attached" >&2; exit 1; }
  measure "$r" "$be"
  nsenter --net=/var/run/netns/"$B" tc qdisc del dev vb clsact
}
echo "# $(date -u +%FT%TZ) $(uname -r) load $(cut -d' ' -f1-3 /proc/loadavg); $T s per test, $R rounds"
echo "round|config|TCP stream Gbit/s|UDP 64 B kpps sent|ping-pong p50 us|p99 us"
for r in $(seq 0 $((R - 1))); do
  measure "$r" bare
  if [ $((r % 2)) = 0 ]; then with_weir "$r" aya; with_weir "$r" libbpf
  else with_weir "$r" libbpf; with_weir "$r" aya; fi
done
measure "$R" bare
if [ "$IPT" != 0 ]; then
  for be in legacy nft; do for n in 1000 10000; do
    ip netns exec "$B" "iptables-$be-restore" < "$WORK/ipt_$n.rules"
    measure "$R" "iptables-$be-$n"
    ip netns exec "$B" "iptables-$be" -F INPUT
  done; done
  measure "$R" bare
fi
echo "# load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$WORK/results" "$R" <<'PY'
import sys, statistics as st
rows = [l.strip().split('|') for l in open(sys.argv[1]) if l.strip()]
R = int(sys.argv[2])
bare = {}
res = {}
for r, cfg, *v in rows:
    try: v = [float(x) for x in v]
    except ValueError: continue
    if cfg == 'bare': bare.setdefault(int(r), []).append(v)
    else: res.setdefault(cfg, []).append((int(r), v))
def mean(xs): return [sum(c) / len(c) for c in zip(*xs)]
# Baseline of round r: the bare veth runs either side of it.
def base(r): return mean(bare.get(r, []) + bare.get(r + 1, [])) if r < R else mean([x for k in bare for x in bare[k]])
names = ['stream', 'UDP pps', 'p50', 'p99']
def fmt(xs): return '%.2fx [%.2f-%.2f]' % (st.median(xs), min(xs), max(xs))
print('# summary: median over rounds [range], ratio to bare veth of the same round')
allbare = [x for k in sorted(bare) for x in bare[k]]
print('bare veth (absolute, median of %d) | %s' % (len(allbare), ' | '.join('%.2f' % st.median(c) for c in zip(*allbare))))
print('config | ' + ' | '.join(names))
for cfg, xs in res.items():
    ratios = [[a / b for a, b in zip(v, base(r))] for r, v in xs]
    print('%s | %s' % (cfg, ' | '.join(fmt(c) for c in zip(*ratios))))
if 'aya' in res and 'libbpf' in res:
    a = dict(res['aya']); l = dict(res['libbpf'])
    ratios = [[y / x for x, y in zip(a[r], l[r])] for r in sorted(a) if r in l]
    print('libbpf / aya, same round | %s' % ' | '.join(fmt(c) for c in zip(*ratios)))
PY
