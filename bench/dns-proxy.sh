#!/bin/bash
# DNS proxy throughput and latency, side by side in one run: dnsperf against the authoritative
# dnsmasq directly, through a dnsmasq forwarder (the C anchor of GOALS.md), and through Weir's
# DNS proxy with the seed's DNS policy and toFQDNs selectors (examples/dns-forward.rs).
# Topology: netns A (client side: dnsperf, the forwarder on 127.0.0.1:53, Weir's proxy on
# 127.0.0.2:53) <-veth-> netns B (dnsmasq answering the seed's names at 10.202.0.2:53). Both
# forwarders send to 10.202.0.2 over the veth, as kube-dns would be reached. Runs are
# interleaved (direct, forwarder, weir) REPS times; medians are printed with the ratio to the
# forwarder. Needs root, dnsmasq (Debian `dnsmasq-base`) and dnsperf (Debian `dnsperf`).
# Usage: sudo bench/dns-proxy.sh [seconds per test, default 5] [repetitions, default 3]
# Env: WORKERS (tokio worker threads of the proxy, default 1), CLIENTS (dnsperf -c, default 8),
# PROXY_BIN (a prebuilt dns-forward to measure instead of building this tree's), BASELINE_BIN
# (another prebuilt dns-forward, e.g. an older tree's, measured as path `base` on 127.0.0.3),
# NICE (a nice value for every process of the bench alike, e.g. -10 on a box busy with builds).
set -u
T=${1:-5}; REPS=${2:-3}; N="nice -n ${NICE:-0}"; WORKERS=${WORKERS:-1}; CLIENTS=${CLIENTS:-8}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for t in dnsmasq dnsperf; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done
A="weirdns$$a"; B="weirdns$$b"; WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.3; ip netns del "$A" 2>/dev/null; ip netns del "$B" 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
if [ -n "${PROXY_BIN:-}" ]; then PROXY=$PROXY_BIN; else
  cargo build -q --release -p weir-dns-proxy --example dns-forward || { echo "build failed" >&2; exit 1; }
  PROXY=target/release/examples/dns-forward
fi
ip netns add "$A"; ip netns add "$B"
ip link add va netns "$A" type veth peer name vb netns "$B"
ip -n "$A" addr add 10.202.0.1/24 dev va; ip -n "$B" addr add 10.202.0.2/24 dev vb
ip -n "$A" link set va up; ip -n "$B" link set vb up; ip -n "$A" link set lo up; ip -n "$B" link set lo up
sleep 1
DM="--no-daemon --no-resolv --no-hosts --conf-file=/dev/null --bind-interfaces --cache-size=0 --user=root --group=root --log-facility=/dev/null"
$N nsenter --net=/run/netns/"$B" dnsmasq $DM --listen-address=10.202.0.2 --local-ttl=300 \
  --host-record=api.stripe.com,203.0.113.10 --host-record=api.github.com,203.0.113.20 \
  --host-record=s3.amazonaws.com,203.0.113.30 --address=/test.local/10.9.9.9 \
  --pid-file="$WORK/b.pid" --dhcp-leasefile="$WORK/b.leases" 2>/dev/null & PIDS+=($!); PID_direct=$!
$N nsenter --net=/run/netns/"$A" dnsmasq $DM --listen-address=127.0.0.1 --server=10.202.0.2 \
  --dns-forward-max=1000 --pid-file="$WORK/a.pid" --dhcp-leasefile="$WORK/a.leases" 2>/dev/null & PIDS+=($!); PID_forwarder=$!
WORKERS=$WORKERS $N nsenter --net=/run/netns/"$A" "$PROXY" 127.0.0.2:53 10.202.0.2:53 127.0.0.1 127.0.0.2 \
  > "$WORK/proxy.out" 2>&1 & PROXYPID=$!; PIDS+=($PROXYPID); PID_weir=$PROXYPID
PATHS="direct forwarder weir"; CHECK="10.202.0.2 127.0.0.1 127.0.0.2"
if [ -n "${BASELINE_BIN:-}" ]; then
  WORKERS=$WORKERS $N nsenter --net=/run/netns/"$A" "$BASELINE_BIN" 127.0.0.3:53 10.202.0.2:53 127.0.0.1 \
    > "$WORK/base.out" 2>&1 & PIDS+=($!); PID_base=$!
  PATHS="$PATHS base"; CHECK="$CHECK 127.0.0.3"
fi
sleep 1
printf 'api.stripe.com A\napi.github.com A\ns3.amazonaws.com A\ntest.local A\n' > "$WORK/q.txt"
# One check per path: every path must answer before anything is measured.
for s in $CHECK; do
  ip netns exec "$A" dnsperf -s $s -d "$WORK/q.txt" -n 1 2>&1 | grep -q "Queries completed: *4 " ||
    { echo "no answers from $s" >&2; cat "$WORK/proxy.out" >&2; exit 1; }
done
# saturating: queries/s and average latency
sat() {
  $N ip netns exec "$A" dnsperf -s "$1" -d "$WORK/q.txt" -l "$T" -c "$CLIENTS" -Q 200000 2>&1 |
    awk '/Queries per second/{q=$4} /Queries lost/{l=$3} /Average Latency/{a=$4} END{printf "%.0f %.1f %s\n", q, a*1e6, l}'
}
# CPU time (user + system, clock ticks) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# 2,000 queries/s: p50 / p99 latency from dnsperf's per-query lines
light() {
  $N ip netns exec "$A" dnsperf -s "$1" -d "$WORK/q.txt" -l "$T" -Q 2000 -v 2>/dev/null |
    awk '/^> /{print $NF*1e6}' | sort -n |
    awk '{v[NR]=$1} END{if(NR==0){print "- -"; exit} i=int(NR*0.5); if(i<1)i=1; j=int(NR*0.99); if(j<1)j=1; printf "%.0f %.0f\n", v[i], v[j]}'
}
median() { sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
echo "# $(date -u +%FT%TZ) $(uname -r) load $(cut -d' ' -f1-3 /proc/loadavg); $T s per test, $REPS reps, dnsperf -c $CLIENTS, proxy workers $WORKERS, nice ${NICE:-0}"
declare -A QPS AVG P50 P99 CPU
RATIOS=""; BRATIOS=""
for r in $(seq "$REPS"); do
  for path in $PATHS; do
    case $path in direct) s=10.202.0.2;; forwarder) s=127.0.0.1;; weir) s=127.0.0.2;; base) s=127.0.0.3;; esac
    pid=$(eval echo \$PID_$path); t0=$(ticks "$pid")
    read -r q a lost < <(sat $s)
    # The server's own CPU time per answered query: what it costs, whatever else the box runs.
    cpu=$(awk -v d="$(( $(ticks "$pid") - t0 ))" -v hz="$(getconf CLK_TCK)" -v q="$q" -v t="$T" 'BEGIN{printf "%.1f", d/hz*1e6/(q*t)}')
    sleep 1
    read -r p50 p99 < <(light $s); sleep 1
    echo "rep $r $path: $q q/s (avg $a us, lost $lost, server CPU $cpu us/query) | at 2k q/s p50 $p50 us p99 $p99 us"
    QPS[$path]+="$q "; AVG[$path]+="$a "; CPU[$path]+="$cpu "; P50[$path]+="$p50 "; P99[$path]+="$p99 "
    eval "Q_$path=$q"
  done
  # Each repetition's own ratio: its runs are seconds apart, so drift cancels better.
  RATIOS+="$(awk -v a="$Q_weir" -v b="$Q_forwarder" 'BEGIN{printf "%.3f", a/b}') "
  [ -n "${BASELINE_BIN:-}" ] && BRATIOS+="$(awk -v a="$Q_base" -v b="$Q_forwarder" 'BEGIN{printf "%.3f", a/b}') "
done
echo
echo "path | saturating q/s (median) | avg latency us | at 2k q/s p50 us | p99 us | q/s ratio to forwarder | server CPU us/query"
fwd=$(echo ${QPS[forwarder]} | tr ' ' '\n' | median)
for path in $PATHS; do
  q=$(echo ${QPS[$path]} | tr ' ' '\n' | median)
  echo "$path | $q | $(echo ${AVG[$path]} | tr ' ' '\n' | median) | $(echo ${P50[$path]} | tr ' ' '\n' | median) | $(echo ${P99[$path]} | tr ' ' '\n' | median) | $(awk -v a="$q" -v b="$fwd" 'BEGIN{printf "%.2f", a/b}') | $(echo ${CPU[$path]} | tr ' ' '\n' | median)"
done
echo "weir / forwarder per repetition: $RATIOS(median $(echo $RATIOS | tr ' ' '\n' | median))"
[ -n "$BRATIOS" ] && echo "base / forwarder per repetition: $BRATIOS(median $(echo $BRATIOS | tr ' ' '\n' | median))"
kill -INT $PROXYPID 2>/dev/null; sleep 0.5
echo "proxy counters: $(cat "$WORK/proxy.out")"
