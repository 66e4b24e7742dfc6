#!/bin/bash
# Verdict cost of Weir's TC program with BPF_PROG_TEST_RUN vs the empty classifier, same run:
# 64-byte TCP SYN entering a pod, 1 / 1k / 10k / 64k policy entries, 100k ipcache prefixes;
# plus the time to apply a 16k-entry policy diff. Needs root. Touches no network interface:
# the programs are loaded on a private bpffs under $TMPDIR that is unmounted at exit.
# Usage: sudo bench/datapath-verdict.sh [repeat]   (default 1000000)
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "needs root" >&2; exit 1; fi
echo "# $(date -u +%FT%TZ) $(uname -r) load $(cut -d' ' -f1-3 /proc/loadavg)"
WEIR_BENCH_REPEAT=${1:-1000000} cargo bench -q -p weir-datapath-aya --bench verdict 2>/dev/null
