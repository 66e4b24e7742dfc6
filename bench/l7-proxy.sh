#!/bin/bash
# L7 HTTP proxy throughput, latency and memory, side by side in one run: wrk against an nginx
# backend directly, through nginx as a reverse proxy (the C anchor of GOALS.md), and through
# Weir's L7 proxy enforcing a `rules.http` policy of 1 rule and of 100 rules
# (crates/l7-proxy/examples/http-forward.rs; every request is decided, the allowing rule last).
# Topology: netns A (client side: wrk, the nginx proxy on 127.0.0.1:8081, Weir with 1 rule on
# 127.0.0.2:8081, Weir with 100 rules on 127.0.0.3:8081) <-veth-> netns B (nginx backend at
# 10.203.0.2:8080 answering a 12-byte static body). Every proxy keeps its upstream
# connections alive. nginx runs one worker each; Weir one tokio worker thread (WORKERS).
# Runs are interleaved (direct, nginx, weir-1, weir-100) REPS times: a saturating run
# (wrk -c CLIENTS) for requests/s and p50/p99 under load, then one connection (wrk -c 1) for
# the unloaded p50/p99. Medians are printed, with each repetition's ratio to nginx.
# Each saturating run also records the serving process's CPU time per request (utime + stime
# from /proc over wrk's request count): on a shared machine the steadiest comparison.
# Needs root and nginx (Debian `nginx-light` or `nginx`); installs `wrk` if missing.
# Usage: sudo bench/l7-proxy.sh [seconds per test, default 5] [repetitions, default 3]
# Env: WORKERS (tokio worker threads of the proxy, default 1), CLIENTS (wrk -c, default 32),
# PROXY_BIN (a prebuilt http-forward to measure instead of building this tree's), BEFORE_BIN
# (a second prebuilt http-forward, e.g. main's, measured in the same run as paths before-1 and
# before-100 on 127.0.0.4/.5:8081, so a change is judged against its baseline under one load).
set -u
T=${1:-5}; REPS=${2:-3}; WORKERS=${WORKERS:-1}; CLIENTS=${CLIENTS:-32}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
command -v nginx >/dev/null || { echo "needs nginx (Debian nginx-light)" >&2; exit 1; }
if ! command -v wrk >/dev/null; then
  apt-get install -y -q wrk >/dev/null || { echo "cannot install wrk" >&2; exit 1; }
fi
A="weirl7$$a"; B="weirl7$$b"; WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.3; ip netns del "$A" 2>/dev/null; ip netns del "$B" 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
if [ -n "${PROXY_BIN:-}" ]; then PROXY=$PROXY_BIN; else
  cargo build -q --release -p weir-l7-proxy --example http-forward || { echo "build failed" >&2; exit 1; }
  PROXY=target/release/examples/http-forward
fi
ip netns add "$A"; ip netns add "$B"
ip link add va netns "$A" type veth peer name vb netns "$B"
ip -n "$A" addr add 10.203.0.1/24 dev va; ip -n "$B" addr add 10.203.0.2/24 dev vb
ip -n "$A" link set va up; ip -n "$B" link set vb up; ip -n "$A" link set lo up; ip -n "$B" link set lo up
sleep 1
# One nginx config per role; temp paths inside WORK so nothing outside is touched.
nginx_conf() { # name, server block
  cat > "$WORK/$1.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1-cb; proxy_temp_path $WORK/$1-pt; fastcgi_temp_path $WORK/$1-ft;
  uwsgi_temp_path $WORK/$1-ut; scgi_temp_path $WORK/$1-st;
  keepalive_requests 1000000;
  $2
}
EOF
}
nginx_conf backend 'server { listen 10.203.0.2:8080; location / { return 200 "hello world\n"; } }'
nginx_conf proxy 'upstream backend { server 10.203.0.2:8080; keepalive 64; }
  server { listen 127.0.0.1:8081; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } }'
nsenter --net=/run/netns/"$B" nginx -c "$WORK/backend.conf" -e "$WORK/backend.err" & PIDS+=($!)
nsenter --net=/run/netns/"$A" nginx -c "$WORK/proxy.conf" -e "$WORK/proxy.err" & PIDS+=($!)
WORKERS=$WORKERS nsenter --net=/run/netns/"$A" "$PROXY" 127.0.0.2:8081 10.203.0.2:8080 1 127.0.0.1 \
  > "$WORK/weir1.out" 2>&1 & W1=$!; PIDS+=($W1)
WORKERS=$WORKERS nsenter --net=/run/netns/"$A" "$PROXY" 127.0.0.3:8081 10.203.0.2:8080 100 127.0.0.1 \
  > "$WORK/weir100.out" 2>&1 & W100=$!; PIDS+=($W100)
PATHS="direct nginx weir-1 weir-100"
if [ -n "${BEFORE_BIN:-}" ]; then
  WORKERS=$WORKERS nsenter --net=/run/netns/"$A" "$BEFORE_BIN" 127.0.0.4:8081 10.203.0.2:8080 1 127.0.0.1 \
    > "$WORK/before1.out" 2>&1 & B1=$!; PIDS+=($B1)
  WORKERS=$WORKERS nsenter --net=/run/netns/"$A" "$BEFORE_BIN" 127.0.0.5:8081 10.203.0.2:8080 100 127.0.0.1 \
    > "$WORK/before100.out" 2>&1 & B100=$!; PIDS+=($B100)
  PATHS="$PATHS before-1 before-100"
fi
sleep 1
url() { case $1 in direct) echo http://10.203.0.2:8080/;; nginx) echo http://127.0.0.1:8081/;;
  weir-1) echo http://127.0.0.2:8081/;; weir-100) echo http://127.0.0.3:8081/;;
  before-1) echo http://127.0.0.4:8081/;; before-100) echo http://127.0.0.5:8081/;; esac; }
# Every path must answer 200 with the backend's body before anything is measured.
for p in $PATHS; do
  got=$(ip netns exec "$A" wrk -t1 -c1 -d1s "$(url $p)" 2>&1)
  echo "$got" | grep -q "Non-2xx\|Socket errors" && { echo "$p fails: $got" >&2; cat "$WORK"/*.out "$WORK"/*.err >&2; exit 1; }
  echo "$got" | grep -q "Requests/sec" || { echo "$p: no answers: $got" >&2; exit 1; }
done
# wrk's latency in microseconds
us() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v+0} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1e6} else print "-"}'; }
# rps p50 p99 errors requests
measure() {
  ip netns exec "$A" wrk -t1 -c"$2" -d"${T}s" --latency "$(url $1)" 2>&1 | awk '
    /Requests\/sec/ {r=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /Non-2xx|Socket errors/ {e="ERR"}
    / requests in / {n=$1}
    END {print r, p50, p99, (e==""?"ok":e), n}' | { read -r r a b e n; echo "$r $(echo "$a" | us) $(echo "$b" | us) $e $n"; }
}
# CPU time (user + system, in clock ticks) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
HZ=$(getconf CLK_TCK)
# The process serving each path: its CPU time per request is the load-independent measure on
# a shared machine (requests/s moves with what else runs; the work per request does not).
NGW=$(pgrep -P "$(cat "$WORK/proxy.pid")" | head -1)
BKW=$(pgrep -P "$(cat "$WORK/backend.pid")" | head -1)
pid_of() { case $1 in direct) echo "$BKW";; nginx) echo "$NGW";; weir-1) echo "$W1";; weir-100) echo "$W100";;
  before-1) echo "$B1";; before-100) echo "$B100";; esac; }
median() { sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
echo "# $(date -u +%FT%TZ) $(uname -r) load $(cut -d' ' -f1-3 /proc/loadavg); $T s per test, $REPS reps, wrk -t1 -c$CLIENTS and -c1, proxy workers $WORKERS"
declare -A RPS P50 P99 L50 L99 CPU
R1=""; R100=""; R100_1=""; RB1=""; RB100=""
for r in $(seq "$REPS"); do
  for p in $PATHS; do
    t0=$(ticks "$(pid_of $p)")
    read -r q a b e n < <(measure $p "$CLIENTS")
    t1=$(ticks "$(pid_of $p)"); sleep 1
    c=$(awk -v t="$((t1 - t0))" -v n="$n" -v hz="$HZ" 'BEGIN{printf "%.2f", (n > 0 ? t / hz * 1e6 / n : 0)}')
    read -r _ la lb e1 _ < <(measure $p 1); sleep 1
    echo "rep $r $p: $q req/s, p50 $a us, p99 $b us ($e), server CPU $c us/request | 1 connection: p50 $la us, p99 $lb us ($e1)"
    RPS[$p]+="$q "; P50[$p]+="$a "; P99[$p]+="$b "; L50[$p]+="$la "; L99[$p]+="$lb "; CPU[$p]+="$c "
    eval "Q_${p//-/_}=$q"
  done
  R1+="$(awk -v a="$Q_weir_1" -v b="$Q_nginx" 'BEGIN{printf "%.3f", a/b}') "
  R100+="$(awk -v a="$Q_weir_100" -v b="$Q_nginx" 'BEGIN{printf "%.3f", a/b}') "
  R100_1+="$(awk -v a="$Q_weir_100" -v b="$Q_weir_1" 'BEGIN{printf "%.3f", a/b}') "
  if [ -n "${BEFORE_BIN:-}" ]; then
    RB1+="$(awk -v a="$Q_before_1" -v b="$Q_nginx" 'BEGIN{printf "%.3f", a/b}') "
    RB100+="$(awk -v a="$Q_before_100" -v b="$Q_nginx" 'BEGIN{printf "%.3f", a/b}') "
  fi
done
med() { echo $1 | tr ' ' '\n' | median; }
echo
echo "path | req/s (median) | p50 us | p99 us | 1 conn p50 us | 1 conn p99 us | req/s ratio to nginx | server CPU us/request (median) | nginx's CPU/request over this path's"
ng=$(med "${RPS[nginx]}"); ngc=$(med "${CPU[nginx]}")
for p in $PATHS; do
  q=$(med "${RPS[$p]}"); c=$(med "${CPU[$p]}")
  echo "$p | $q | $(med "${P50[$p]}") | $(med "${P99[$p]}") | $(med "${L50[$p]}") | $(med "${L99[$p]}") | $(awk -v a="$q" -v b="$ng" 'BEGIN{printf "%.2f", a/b}') | $c | $(awk -v a="$ngc" -v b="$c" 'BEGIN{printf "%.2f", (b > 0 ? a/b : 0)}')"
done
echo "weir-1 / nginx per repetition: $R1(median $(med "$R1"))"
echo "weir-100 / nginx per repetition: $R100(median $(med "$R100"))"
echo "weir-100 / weir-1 per repetition: $R100_1(median $(med "$R100_1"))"
if [ -n "${BEFORE_BIN:-}" ]; then
  echo "before-1 / nginx per repetition: $RB1(median $(med "$RB1"))"
  echo "before-100 / nginx per repetition: $RB100(median $(med "$RB100"))"
  echo "added 1-connection p50 over direct: before-1 $(awk -v a="$(med "${L50[before-1]}")" -v b="$(med "${L50[direct]}")" 'BEGIN{print a-b}') us," \
    "before-100 $(awk -v a="$(med "${L50[before-100]}")" -v b="$(med "${L50[direct]}")" 'BEGIN{print a-b}') us"
fi
d50=$(med "${L50[direct]}")
echo "added 1-connection p50 over direct: nginx $(awk -v a="$(med "${L50[nginx]}")" -v b="$d50" 'BEGIN{print a-b}') us," \
  "weir-1 $(awk -v a="$(med "${L50[weir-1]}")" -v b="$d50" 'BEGIN{print a-b}') us, weir-100 $(awk -v a="$(med "${L50[weir-100]}")" -v b="$d50" 'BEGIN{print a-b}') us"
rss() { awk '/VmHWM|VmRSS/ {printf "%s %.1f MB  ", $1, $2/1024}' "/proc/$1/status"; }
echo "memory: weir-1 $(rss $W1)| weir-100 $(rss $W100)| nginx proxy worker $(rss "$NGW")"
[ -n "${BEFORE_BIN:-}" ] && echo "memory: before-1 $(rss $B1)| before-100 $(rss $B100)"
kill -INT $W1 $W100 ${B1:-} ${B100:-} 2>/dev/null; sleep 0.5
echo "weir-1: $(cat "$WORK/weir1.out"); weir-100: $(cat "$WORK/weir100.out")"
