#!/bin/bash
# Weir on a veth against bare veth and iptables (legacy, nft) with 1k and 10k rules: TCP stream
# (iperf3), 64-byte UDP packets per second (iperf3), TCP ping-pong latency (sockperf).
# Topology: netns A (client, 10.201.0.1, "the pod") <-veth-> netns B (server, 10.201.0.2).
# Weir is attached to B's side of the veth, as to a pod's host-side veth: the client's packets
# go through weir_from_pod (egress policy of the pod, 10k entries). iptables rules go in B's
# INPUT chain (non-matching, as in the seed's comparison). Everything lives in two namespaces
# with unique names and a private bpffs, removed on exit. Needs root, iperf3, sockperf
# (Debian package `sockperf`).
# Usage: sudo bench/datapath-veth.sh [seconds per test, default 5]
set -u
T=${1:-5}
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
cargo build -q --release -p weir-datapath-aya --example bench_attach 2>/dev/null || { echo "build failed" >&2; exit 1; }
ATTACH=target/release/examples/bench_attach
ip netns add "$A"; ip netns add "$B"
ip link add va netns "$A" type veth peer name vb netns "$B"
ip -n "$A" addr add 10.201.0.1/24 dev va; ip -n "$B" addr add 10.201.0.2/24 dev vb
ip -n "$A" link set va up; ip -n "$B" link set vb up; ip -n "$A" link set lo up; ip -n "$B" link set lo up
ip netns exec "$B" iperf3 -s -D -p 5201 --pidfile "$WORK/iperf.pid"
ip netns exec "$B" sockperf sr --tcp -i 10.201.0.2 -p 11111 >/dev/null 2>&1 & echo $! > "$WORK/sp.pid"
sleep 1
python3 - "$WORK" <<'PY'
import sys; w=sys.argv[1]
for n in (1000,10000):
    with open(f'{w}/ipt_{n}.rules','w') as f:
        f.write('*filter\n:INPUT ACCEPT [0:0]\n')
        for i in range(n): f.write('-A INPUT -d 192.168.%d.%d/32 -p tcp -m tcp --dport 80 -j DROP\n'%((i>>8)&255,i&255))
        f.write('COMMIT\n')
PY
measure() {
  local L=$1 tcp udp rr
  tcp=$(ip netns exec "$A" iperf3 -c 10.201.0.2 -t "$T" -J | python3 -c 'import json,sys;e=json.load(sys.stdin)["end"];print("%.2f"%(e["sum_received"]["bits_per_second"]/1e9))')
  sleep 1
  udp=$(ip netns exec "$A" iperf3 -c 10.201.0.2 -u -b 0 -l 64 -t "$T" -J | python3 -c 'import json,sys;s=json.load(sys.stdin)["end"]["sum"];print("%.0f"%(s["packets"]/s["seconds"]/1e3))')
  sleep 2
  rr=$(ip netns exec "$A" sockperf pp --tcp --full-rtt -i 10.201.0.2 -p 11111 -t "$T" 2>&1 | sed "s/\x1b\[[0-9;]*m//g" | awk '/50.000/{p50=$NF} /99.000/{p99=$NF} END{print p50" "p99}')
  echo "$L | $tcp | $udp | ${rr% *} | ${rr#* }"
  sleep 1
}
echo "# $(date -u +%FT%TZ) $(uname -r) load $(cut -d' ' -f1-3 /proc/loadavg); $T s per test"
echo "config | TCP stream Gbit/s | UDP 64 B kpps sent | ping-pong p50 us | p99 us"
measure "bare veth"
mkdir -p "$BPF"; mount -t bpf bpf "$BPF"
nsenter --net=/var/run/netns/"$B" "$ATTACH" "$BPF/weir" vb 10.201.0.2 10000 >/dev/null || { echo "attach failed" >&2; exit 1; }
nsenter --net=/var/run/netns/"$B" tc filter show dev vb ingress | grep -q weir_from_pod || { echo "weir not attached" >&2; exit 1; }
measure "weir 10k entries"
nsenter --net=/var/run/netns/"$B" tc qdisc del dev vb clsact
measure "bare veth again"
for be in legacy nft; do for n in 1000 10000; do
  ip netns exec "$B" "iptables-$be-restore" < "$WORK/ipt_$n.rules"
  measure "iptables-$be $n rules"
  ip netns exec "$B" "iptables-$be" -F INPUT
done; done
