#!/bin/bash
# Time from an allowed DNS answer reaching the agent's learner to the datapath allowing its
# addresses (identity allocated, policy map and ipcache updated in the kernel; the agent state
# is written later, by the agent's housekeeping):
# crates/agent/examples/fqdn-learn-latency.rs with the real learner (weir_agent::proxies::
# AgentLearner) against the real eBPF maps. Runs in a network namespace of its own (one veth
# for the endpoint to attach to) and a private mount namespace with its own bpffs, so nothing
# in the root namespaces changes and nothing is left behind.
# Usage: sudo bench/fqdn-learn.sh [answers, default 2000]; env NO_STATE=1: no state directory.
set -u
N=${1:-2000}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
NS="weirlrn$$"; DIR=$(mktemp -d)
cleanup() { ip netns del "$NS" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT INT TERM
cargo build -q --release -p weir-agent --example fqdn-learn-latency || { echo "build failed" >&2; exit 1; }
BIN=$PWD/target/release/examples/fqdn-learn-latency
ip netns add "$NS"
ip -n "$NS" link add hostep type veth peer name podep
ip -n "$NS" link set hostep up; ip -n "$NS" link set podep up; ip -n "$NS" link set lo up
echo "# $(date -u +%FT%TZ) $(uname -r) load $(cut -d' ' -f1-3 /proc/loadavg); $N answers"
nsenter --net=/run/netns/"$NS" unshare --mount --propagation private \
  env ${NO_STATE:+NO_STATE=1} sh -c "mount -t bpf bpf '$DIR' && exec '$BIN' '$DIR' hostep $N"
