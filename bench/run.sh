#!/bin/bash
# Benchmarks for issue 2 (figures go to docs/benchmarks.md). Not a test: prints numbers.
#  1. mkdir -> agent ready, vs. the same QEMU command line booting the same kernel+initrd
#     to the agent's first answer without the daemon (bandsox-devtools bench-boot).
#  2. `echo true > exec` round trip vs. a raw protocol ping over the same connection
#     (the VM's `ping N` diagnostic ctl command), medians of >= 30 runs, one run of this script.
# Usage: bench/run.sh [ROUNDS]   (root; after mount-helpers/setup --no-mount)
set -euo pipefail
rounds=${1:-5}
work=/var/tmp/bandsox-bench
. "$(dirname "$0")/lib.sh"
bench_mount

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now_ms() { date +%s%3N; }

echo "== boot: mkdir -> agent ready vs raw QEMU -> agent first answer ($rounds rounds each, interleaved)"
: > "$work/mkdir.ms"; : > "$work/raw.ms"
for i in $(seq 1 "$rounds"); do
  t0=$(now_ms); mkdir "$MNT/b$i"; t1=$(now_ms)
  echo $((t1 - t0)) >> "$work/mkdir.ms"
  rmdir "$MNT/b$i"
  "$BANDSOX_DEVTOOLS" bench-boot --state-dir "$STATE" >> "$work/raw.ms"
done
m=$(median < "$work/mkdir.ms"); r=$(median < "$work/raw.ms")
echo "mkdir median ${m} ms; raw qemu+handshake median ${r} ms; ratio $(awk -v a="$m" -v b="$r" 'BEGIN{printf "%.3f", a/b}')"

echo "== exec round trip vs raw ping over the same connection (30+ runs)"
mkdir "$MNT/rt"
: > "$work/exec.us"
for i in $(seq 1 40); do
  t0=$(date +%s%6N); echo true > "$MNT/rt/exec"; t1=$(date +%s%6N)
  echo $((t1 - t0)) >> "$work/exec.us"
done
echo 'ping 40' > "$MNT/rt/ctl"
ping=$(sed -n 's/.*median_us=\([0-9]*\).*/\1/p' "$MNT/rt/ctl")
e=$(median < "$work/exec.us")
echo "exec median ${e} us; ping median ${ping} us; ratio $(awk -v a="$e" -v b="$ping" 'BEGIN{printf "%.1f", a/b}')"
rmdir "$MNT/rt"
