#!/bin/bash
# In-situ per-packet cost of Weir's program on real traffic, against the per-packet cost an
# iptables-legacy INPUT chain of 10,000 non-matching rules adds (GOALS.md: Weir <= 0.005x).
#
# Topology as bench/datapath-veth.sh: netns A (client, 10.202.0.1, "the pod") <-veth-> netns B
# (server, 10.202.0.2); Weir (10k policy entries) on B's side of the veth, so A's packets go
# through weir_from_pod. Traffic: iperf3 64-byte UDP flood, A -> B, T seconds.
#
# * Weir: run time per run of weir_from_pod from the kernel's BPF statistics
#   (run_time_ns / run_cnt over the flood), enabled through BPF_ENABLE_STATS for the length
#   of the flood only (an fd held by a helper; no global sysctl is changed). The figure
#   includes the statistics' own two clock reads, so the same is measured for weir_empty
#   (returns at once) attached the same way, and "net" = program - empty is given as well.
# * iptables-legacy: the cost it adds per packet, 1/pps(10k rules) - 1/pps(bare veth), on the
#   same flood (packets sent per second: veth delivers in the sender's softirq, so the sender
#   pays the receiver's netfilter cost; the rules go in B's INPUT chain and never match).
#
# Rounds are interleaved (bare, iptables, bare, Weir libbpf, Weir aya, empty) and the summary
# gives medians; the iptables cost of a round uses the mean of the bare runs either side.
# Everything lives in two namespaces with unique names and a private bpffs, removed on exit.
# Needs root, iperf3, bpftool, iptables-legacy.
# Usage: sudo bench/datapath-insitu.sh [seconds per flood, default 5] [rounds, default 3]
set -u
T=${1:-5}
R=${2:-3}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
A="weiris$$a"; B="weiris$$b"; WORK=$(mktemp -d); BPF="$WORK/bpffs"
cleanup() {
  [ -f "$WORK/iperf.pid" ] && kill "$(cat "$WORK/iperf.pid")" 2>/dev/null
  [ -f "$WORK/stats.pid" ] && kill "$(cat "$WORK/stats.pid")" 2>/dev/null
  sleep 0.3; ip netns del "$A" 2>/dev/null; ip netns del "$B" 2>/dev/null
  umount -l "$BPF" 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cargo build -q --release -p weir-datapath-libbpf --example bench_attach 2>/dev/null || { echo "build failed" >&2; exit 1; }
ATTACH=target/release/examples/bench_attach
ip netns add "$A"; ip netns add "$B"
ip link add va netns "$A" type veth peer name vb netns "$B"
ip -n "$A" addr add 10.202.0.1/24 dev va; ip -n "$B" addr add 10.202.0.2/24 dev vb
ip -n "$A" link set va up; ip -n "$B" link set vb up; ip -n "$A" link set lo up; ip -n "$B" link set lo up
ip netns exec "$B" iperf3 -s -D -p 5201 --pidfile "$WORK/iperf.pid"
sleep 1
mkdir -p "$BPF"; mount -t bpf bpf "$BPF"
python3 - "$WORK" <<'PY'
import sys; w=sys.argv[1]
with open(f'{w}/ipt.rules','w') as f:
    f.write('*filter\n:INPUT ACCEPT [0:0]\n')
    for i in range(10000): f.write('-A INPUT -d 192.168.%d.%d/32 -p tcp -m tcp --dport 80 -j DROP\n'%((i>>8)&255,i&255))
    f.write('COMMIT\n')
PY
# Holds BPF_ENABLE_STATS(BPF_STATS_RUN_TIME) open until killed: run_time_ns/run_cnt count only
# while some process holds such an fd.
cat > "$WORK/stats.py" <<'PY'
import ctypes, os, signal, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
attr = ctypes.create_string_buffer(struct.pack('I', 0), 128)  # enable_stats.type = RUN_TIME
fd = libc.syscall(321, 32, attr, 128)                         # SYS_bpf, BPF_ENABLE_STATS
if fd < 0:
    sys.exit('BPF_ENABLE_STATS: %s' % os.strerror(ctypes.get_errno()))
open(sys.argv[1], 'w').write('ok\n')
signal.pause()
PY
stats_on() {
  rm -f "$WORK/stats.ok"; python3 "$WORK/stats.py" "$WORK/stats.ok" & echo $! > "$WORK/stats.pid"
  for _ in $(seq 50); do [ -f "$WORK/stats.ok" ] && return 0; sleep 0.1; done
  echo "could not enable BPF statistics" >&2; exit 1
}
stats_off() { kill "$(cat "$WORK/stats.pid")" 2>/dev/null; wait "$(cat "$WORK/stats.pid")" 2>/dev/null; rm -f "$WORK/stats.pid"; }
# prog_stats PIN: "run_time_ns run_cnt" of a pinned program.
prog_stats() {
  bpftool prog show pinned "$1" -j | python3 -c 'import json,sys;p=json.load(sys.stdin);print(p.get("run_time_ns",0),p.get("run_cnt",0))'
}
# flood: packets sent per second of a 64-byte UDP flood A -> B.
flood() {
  ip netns exec "$A" iperf3 -c 10.202.0.2 -u -b 0 -l 64 -t "$T" -J | python3 -c 'import json,sys;s=json.load(sys.stdin)["end"]["sum"];print("%.0f"%(s["packets"]/s["seconds"]))'
}
# insitu ROUND LABEL PIN: flood with statistics on; record ns per run of the program at PIN.
insitu() {
  local r=$1 L=$2 pin=$3 before after pps
  stats_on
  before=$(prog_stats "$pin")
  pps=$(flood)
  after=$(prog_stats "$pin")
  stats_off
  python3 - "$r" "$L" "$pps" $before $after <<'PY' | tee -a "$WORK/results"
import sys
r, L, pps, t0, c0, t1, c1 = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
runs = c1 - c0
print('%s|%s|%s|%.1f|%d' % (r, L, pps, (t1 - t0) / runs if runs else float('nan'), runs))
PY
  sleep 1
}
# attach BACKEND: Weir's programs of BACKEND on vb (10k policy entries).
attach() {
  nsenter --net=/var/run/netns/"$B" "$ATTACH" "$1" "$BPF/$1" vb 10.202.0.2 10000 2>&1 >/dev/null | grep -v 'Exclusivity flag on' >&2
  nsenter --net=/var/run/netns/"$B" tc filter show dev vb ingress | grep -q weir_from_pod || { echo "$1 not attached" >&2; exit 1; }
}
detach() { nsenter --net=/var/run/netns/"$B" tc qdisc del dev vb clsact; }
echo "# $(date -u +%FT%TZ) $(uname -r) load $(cut -d' ' -f1-3 /proc/loadavg); $T s per flood, $R rounds"
echo "round|config|UDP 64 B pps sent|ns per run (bpf stats)|runs"
for r in $(seq 0 $((R - 1))); do
  echo "$r|bare|$(flood)" | tee -a "$WORK/results"; sleep 1
  ip netns exec "$B" iptables-legacy-restore < "$WORK/ipt.rules"
  echo "$r|iptables-legacy-10k|$(flood)" | tee -a "$WORK/results"; sleep 1
  ip netns exec "$B" iptables-legacy -F INPUT
  echo "$((r + 1))|bare|$(flood)" | tee -a "$WORK/results"; sleep 1
  for be in libbpf aya; do
    attach "$be"; insitu "$r" "weir-$be" "$BPF/$be/weir_from_pod"; detach
  done
  # The statistics' own cost: the empty program attached the same way.
  nsenter --net=/var/run/netns/"$B" tc qdisc add dev vb clsact
  nsenter --net=/var/run/netns/"$B" tc filter add dev vb ingress bpf da pinned "$BPF/libbpf/weir_empty"
  insitu "$r" empty "$BPF/libbpf/weir_empty"; detach
done
echo "# load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$WORK/results" "$R" <<'PY'
import sys, statistics as st
rows = [l.strip().split('|') for l in open(sys.argv[1]) if l.strip()]
R = int(sys.argv[2])
bare, ipt, ns = {}, {}, {}
for row in rows:
    r, cfg, pps = int(row[0]), row[1], float(row[2])
    if cfg == 'bare': bare.setdefault(r, []).append(pps)
    elif cfg.startswith('iptables'): ipt[r] = pps
    else: ns.setdefault(cfg, {})[r] = float(row[3])
# iptables' added cost per packet in round r: against the bare runs either side of it.
extra = {r: 1e9 / p - 1e9 / (sum(bare[r] + bare[r + 1]) / len(bare[r] + bare[r + 1])) for r, p in ipt.items()}
print('# summary: medians over %d rounds [range]' % R)
def fmt(xs, f='%.1f'): return (f + ' [' + f + '-' + f + ']') % (st.median(xs), min(xs), max(xs))
print('iptables-legacy 10k rules, added ns per packet | ' + fmt(list(extra.values()), '%.0f'))
empty = ns.get('empty', {})
for be in ('weir-libbpf', 'weir-aya'):
    if be not in ns: continue
    raw = [ns[be][r] / extra[r] for r in ns[be] if r in extra]
    net = [(ns[be][r] - empty[r]) / extra[r] for r in ns[be] if r in extra and r in empty]
    print('%s ns per run | %s | net of the empty program %s' % (be, fmt(list(ns[be].values())), fmt([ns[be][r] - empty[r] for r in ns[be] if r in empty])))
    print('%s / iptables-legacy 10k | %s | net %s' % (be, fmt(raw, '%.4f'), fmt(net, '%.4f')))
if empty: print('empty program ns per run (statistics overhead) | ' + fmt(list(empty.values())))
PY
