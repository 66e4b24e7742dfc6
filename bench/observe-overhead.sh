#!/usr/bin/env bash
# Datapath throughput with flow export on versus off (issue 6, GOALS "≥ 0.95×"), as root.
#
# Topology: a node namespace running the real weir-agent (release build) and two pods wired
# by weir-cni, client (app=client) and server (app=server); a CiliumNetworkPolicy selects
# the server and allows the client on the ports used, so every new connection is a policy
# lookup and a verdict event. Traffic goes pod -> node -> pod through both pods' programs.
#
# "Off" is `weir-agent --no-flow-export`: what a user who turns Hubble off gets. The agent
# reads no datapath events and builds no flows; the programs still try to emit them, the
# unread ring fills, and each attempt stops at its lockless free-space check.
#
# Tests, each T seconds: TCP stream (iperf3), 64-byte UDP packets per second (iperf3), and
# new TCP connections per second (a connect/RST loop: one verdict event per connection at
# the server, the case where export costs most). With export on, the flows the agent
# exported per second are read from its metrics.
#
# Each round starts a fresh agent per configuration (on, off; the order alternates by round),
# adds both pods, runs the tests, deletes the pods and stops the agent. The ratio on/off is
# per round; the summary gives the median and the range.
#
# Everything lives in namespaces named weirob<pid>{n,a,b} and a temporary directory (with
# the agent's bpffs), all removed on exit. Needs root, iperf3 and python3.
# Usage: sudo bench/observe-overhead.sh [seconds per test, default 5] [rounds, default 3]
set -u
T=${1:-5}
R=${2:-3}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
command -v iperf3 >/dev/null || { echo "needs iperf3" >&2; exit 1; }
export CARGO_INCREMENTAL=0
# The agent is what is measured (release). weir-cni only wires the pods before each run: a
# debug build does, and building it on its own keeps the agent's release dependencies as
# they are (building both in one release invocation unifies features and rebuilds them).
cargo build -q --release -p weir-agent || { echo "build failed" >&2; exit 1; }
cargo build -q -p weir-cni || { echo "build failed" >&2; exit 1; }
AGENT=$PWD/target/release/weir-agent
CNI=$PWD/target/debug/weir-cni

P="weirob$$"; NODE="${P}n"; A="${P}a"; B="${P}b"
WORK=$(mktemp -d /tmp/weir-obs-bench.XXXXXX)
AGENT_PID=""
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  for f in "$WORK"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  sleep 0.3
  for n in "$A" "$B" "$NODE"; do ip netns del "$n" 2>/dev/null; done
  for m in "$WORK"/bpf-*; do umount -l "$m" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

ip netns add "$NODE"; ip netns add "$A"; ip netns add "$B"
for n in "$NODE" "$A" "$B"; do ip -n "$n" link set lo up; done
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
# Many short connections from one client: a wide port range, so few ports are reused.
ip netns exec "$A" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
mkdir -p "$WORK/policies"
cat >"$WORK/policies/server.yaml" <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-ingress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
        - ports: [{port: '5201', protocol: TCP}, {port: '5201', protocol: UDP}, {port: '8080', protocol: TCP}]
EOF
cat >"$WORK/accept.py" <<'EOF'
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(4096)
while True:
    try:
        c, _ = s.accept(); c.close()
    except OSError:
        pass
EOF
cat >"$WORK/connect.py" <<'EOF'
import socket, struct, sys, time
ip, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rst = struct.pack("ii", 1, 0)
n = fail = 0
t0 = time.monotonic(); end = t0 + secs
while time.monotonic() < end:
    s = socket.socket(); s.settimeout(1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)  # close with RST: no TIME_WAIT
    try:
        s.connect((ip, port)); n += 1
    except OSError:
        fail += 1
    s.close()
print("%.0f %d" % (n / (time.monotonic() - t0), fail))
EOF
cat >"$WORK/flows.py" <<'EOF'
import sys, urllib.request
try:
    text = urllib.request.urlopen("http://127.0.0.1:9965/metrics", timeout=3).read().decode()
except Exception:
    print(0); sys.exit()
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
              if l.startswith("hubble_flows_processed_total{"))))
EOF
ip netns exec "$B" iperf3 -s -D -p 5201 --pidfile "$WORK/iperf.pid"
nsenter --net="/run/netns/$B" python3 "$WORK/accept.py" & echo $! >"$WORK/accept.pid"

cni() { # cni COMMAND POD NETNS IP LABEL
  local conf
  conf=$(printf '{"cniVersion":"1.0.0","name":"obsbench","type":"weir-cni","ipam":{"subnet":"10.213.0.0/24","gateway":"10.213.0.1"},"stateDir":"%s","agentSocket":"%s","readyTimeoutSeconds":30,"runtimeConfig":{"labels":{"app":"%s"}}}' \
    "$WORK/cni" "$WORK/agent.sock" "$5")
  echo "$conf" | nsenter --net="/run/netns/$NODE" env CNI_COMMAND="$1" CNI_CONTAINERID="${P}-$2" \
    CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni CNI_NETNS="/run/netns/$3" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=$2;IP=$4" "$CNI" >/dev/null
}

start_agent() { # start_agent TAG [flags...]
  local tag=$1; shift
  rm -f "$WORK/agent.sock" "$WORK/hubble.sock"
  nsenter --net="/run/netns/$NODE" "$AGENT" --state-dir "$WORK/state-$tag" --bpffs "$WORK/bpf-$tag" \
    --api-socket "$WORK/agent.sock" --policy-dir "$WORK/policies" --node-name obsbench "$@" \
    >>"$WORK/agent.log" 2>&1 &
  AGENT_PID=$!
  for _ in $(seq 100); do [ -S "$WORK/agent.sock" ] && return 0; sleep 0.2; done
  echo "agent did not start"; tail -20 "$WORK/agent.log"; exit 1
}
stop_agent() {
  kill "$AGENT_PID" 2>/dev/null; wait "$AGENT_PID" 2>/dev/null; AGENT_PID=""
  umount -l "$WORK/bpf-$1" 2>/dev/null
}
flows() { nsenter --net="/run/netns/$NODE" python3 "$WORK/flows.py"; }

# measure ROUND CONFIG: one line "round|config|Gbit/s|kpps|conn/s|flows/s" to stdout and results.
measure() {
  local r=$1 L=$2 tcp udp conn f0 f1
  tcp=$(ip netns exec "$A" iperf3 -c 10.213.0.20 -t "$T" -J | python3 -c 'import json,sys;e=json.load(sys.stdin)["end"];print("%.2f"%(e["sum_received"]["bits_per_second"]/1e9))')
  sleep 1
  udp=$(ip netns exec "$A" iperf3 -c 10.213.0.20 -u -b 0 -l 64 -t "$T" -J | python3 -c 'import json,sys;s=json.load(sys.stdin)["end"]["sum"];print("%.0f"%(s["packets"]/s["seconds"]/1e3))')
  sleep 1
  f0=$(flows)
  conn=$(ip netns exec "$A" python3 "$WORK/connect.py" 10.213.0.20 8080 "$T")
  sleep 0.5
  f1=$(flows)
  echo "$r|$L|$tcp|$udp|${conn% *}|$(( (f1 - f0) / T ))|${conn#* }" | tee -a "$WORK/results"
}

one() { # one ROUND on|off
  local tag="$1-$2"
  if [ "$2" = on ]; then start_agent "$tag"; else start_agent "$tag" --no-flow-export; fi
  cni ADD client "$A" 10.213.0.10 client || { echo "CNI ADD client failed"; tail -20 "$WORK/agent.log"; exit 1; }
  cni ADD server "$B" 10.213.0.20 server || { echo "CNI ADD server failed"; tail -20 "$WORK/agent.log"; exit 1; }
  sleep 1
  measure "$1" "$2"
  cni DEL client "$A" 10.213.0.10 client; cni DEL server "$B" 10.213.0.20 server
  stop_agent "$tag"
}

echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $T s per test, $R rounds"
echo "round|export|TCP Gbit/s|UDP 64B kpps|new conn/s|flows exported/s|failed connects"
for r in $(seq "$R"); do
  if [ $((r % 2)) = 1 ]; then one "$r" on; one "$r" off; else one "$r" off; one "$r" on; fi
done
python3 - "$WORK/results" <<'PY'
import sys, statistics as st
rows = [l.strip().split("|") for l in open(sys.argv[1]) if l.strip()]
by = {}
for r, cfg, tcp, udp, conn, fl, _ in rows:
    by.setdefault(r, {})[cfg] = (float(tcp), float(udp), float(conn), float(fl))
print()
print("| test | export off (median) | export on (median) | on/off per round: median (range) |")
print("|---|---|---|---|")
for i, name in enumerate(["TCP stream, Gbit/s", "64-byte UDP, kpps", "new TCP connections/s"]):
    off = [v["off"][i] for v in by.values() if "on" in v and "off" in v]
    on = [v["on"][i] for v in by.values() if "on" in v and "off" in v]
    ratios = [a / b for a, b in zip(on, off) if b > 0]
    if not ratios:
        continue
    print(f"| {name} | {st.median(off):.2f} | {st.median(on):.2f} | "
          f"{st.median(ratios):.3f}x ({min(ratios):.3f}–{max(ratios):.3f}) |")
fl = [v["on"][3] for v in by.values() if "on" in v]
print(f"flows exported per second during the connection test (export on): median {st.median(fl):.0f}")
PY
