#!/bin/bash
# Benchmarks for issue 5 (figures go to docs/benchmarks.md). Not a test: prints numbers.
#  1. snapshot create time (the `echo 'snapshot S' > vm/ctl` write) and snapshot size vs.
#     guest memory (128, 256, 512 MiB);
#  2. restore -> agent ready (`clone S c`, which returns once the clone's agent answered,
#     thawed and took its identity) vs. cold boot -> agent ready (`mkdir`), same image and
#     memory (256 MiB), interleaved, medians;
#  3. clone count=10 wall time vs. 10 x the median single restore (128 MiB).
# Usage: bench/snapshot.sh [ROUNDS]   (root; after mount-helpers/setup --no-mount)
set -euo pipefail
rounds=${1:-5}
work=/var/tmp/bandsox-bench-snap
. "$(dirname "$0")/lib.sh"
bench_mount

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now_ms() { date +%s%3N; }
field() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" "$2" | head -n1; }

echo "== snapshot create time and size vs memory (3 snapshots each; median time)"
printf '%-8s %10s %10s %14s %14s %14s\n' memory create_ms paused_ms state_MB disk_alloc_MB total_alloc_MB
for mem in 128 256 512; do
  echo "create m$mem memory=$mem" > "$MNT/ctl"
  : > "$work/snap.ms"
  for i in 1 2 3; do
    t0=$(now_ms); echo "snapshot m$mem-$i" > "$MNT/m$mem/ctl"; t1=$(now_ms)
    echo $((t1 - t0)) >> "$work/snap.ms"
  done
  info=$MNT/snapshots/m$mem-1/info
  printf '%-8s %10s %10s %14.1f %14.1f %14.1f\n' "$mem" "$(median < "$work/snap.ms")" \
    "$(field paused_ms "$info")" \
    "$(awk -v b="$(field state_bytes "$info")" 'BEGIN{print b/1e6}')" \
    "$(awk -v b="$(field disk_allocated_bytes "$info")" 'BEGIN{print b/1e6}')" \
    "$(awk -v b="$(field total_allocated_bytes "$info")" 'BEGIN{print b/1e6}')"
  rmdir "$MNT/m$mem"
  for i in 1 2 3; do rmdir "$MNT/snapshots/m$mem-$i"; done
done

echo "== restore -> agent ready vs cold boot -> agent ready (256 MiB, $rounds rounds, interleaved)"
echo 'create src memory=256' > "$MNT/ctl"
echo 'snapshot base256' > "$MNT/src/ctl"
rmdir "$MNT/src"
echo 'memory=256' > "$MNT/defaults"
: > "$work/restore.ms"; : > "$work/boot.ms"
for i in $(seq 1 "$rounds"); do
  t0=$(now_ms); echo "clone base256 r$i" > "$MNT/ctl"; t1=$(now_ms)
  echo $((t1 - t0)) >> "$work/restore.ms"
  rmdir "$MNT/r$i"
  t0=$(now_ms); mkdir "$MNT/c$i"; t1=$(now_ms)
  echo $((t1 - t0)) >> "$work/boot.ms"
  rmdir "$MNT/c$i"
done
r=$(median < "$work/restore.ms"); b=$(median < "$work/boot.ms")
echo "restore median ${r} ms ($(tr '\n' ' ' < "$work/restore.ms")); cold boot median ${b} ms ($(tr '\n' ' ' < "$work/boot.ms")); ratio $(awk -v a="$r" -v b="$b" 'BEGIN{printf "%.3f", a/b}')"
rmdir "$MNT/snapshots/base256"

echo "== clone count=10 vs 10 x single restore (128 MiB)"
echo 'create src memory=128' > "$MNT/ctl"
echo 'snapshot base128' > "$MNT/src/ctl"
rmdir "$MNT/src"
: > "$work/single.ms"
for i in 1 2 3; do
  t0=$(now_ms); echo "clone base128 s$i" > "$MNT/ctl"; t1=$(now_ms)
  echo $((t1 - t0)) >> "$work/single.ms"
  rmdir "$MNT/s$i"
done
s=$(median < "$work/single.ms")
t0=$(now_ms); echo 'clone base128 n count=10' > "$MNT/ctl"; t1=$(now_ms)
w=$((t1 - t0))
echo "clone count=10 wall ${w} ms; single restore median ${s} ms; 10 x single $((10 * s)) ms; ratio $(awk -v a="$w" -v b="$((10 * s))" 'BEGIN{printf "%.3f", a/b}')"
echo "daemon: $(cat "$MNT/ctl")"
for i in $(seq 1 10); do rmdir "$MNT/n-$i"; done
rmdir "$MNT/snapshots/base128"
