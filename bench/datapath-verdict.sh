#!/bin/bash
# Verdict cost of Weir's TC program with BPF_PROG_TEST_RUN, both kernel backends (aya: Rust
# programs; libbpf: C programs) in one run, each against its own empty classifier and against
# each other: 64-byte TCP SYN entering a pod, 1 / 1k / 10k / 64k policy entries, 100k ipcache
# prefixes, rounds interleaving the two backends; plus the time to apply and remove a 16k-entry
# policy diff on each. Needs root. Touches no network interface: the programs are loaded on
# private bpffs mounts under $TMPDIR that are unmounted at exit.
# Usage: sudo bench/datapath-verdict.sh [repeat] [rounds]   (defaults 1000000, 7)
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "needs root" >&2; exit 1; fi
echo "# $(date -u +%FT%TZ) $(uname -r) load $(cut -d' ' -f1-3 /proc/loadavg)"
WEIR_BENCH_REPEAT=${1:-1000000} WEIR_BENCH_ROUNDS=${2:-7} \
  cargo bench -q -p weir-datapath-libbpf --bench verdict 2>/dev/null
echo "# load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
