#!/bin/bash
# Benchmarks for issue 23 (figures go to docs/benchmarks.md). Not a test: prints numbers.
#  1. memory: N VMs handed out from a warm pool (clones mapping one template's RAM file
#     copy-on-write) vs N clones of an ordinary snapshot (each loads a private copy of
#     RAM) vs one cold-booted VM: sum of PSS and RSS of the VMM processes (256 MiB guests,
#     each has answered one exec);
#  2. `mkdir` -> first exec answered, from the warm pool vs cold boot (medians).
# Usage: bench/pool.sh [N] [ROUNDS]   (root; after mount-helpers/setup --no-mount)
set -euo pipefail
n=${1:-5}
rounds=${2:-5}
work=/var/tmp/bandsox-bench-pool
. "$(dirname "$0")/lib.sh"
bench_mount

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now_ms() { date +%s%3N; }
pid_of() { sed -n 's/.*"vmm_pid": *\([0-9]*\).*/\1/p' "$MNT/$1/info" | head -n1; }
# mem_of VM...: "PSS_MiB RSS_MiB" summed over the VMs' VMM processes.
mem_of() {
  for v in "$@"; do
    awk '/^(Pss|Rss):/ {print $1, $2}' "/proc/$(pid_of "$v")/smaps_rollup"
  done | awk '$1=="Pss:"{p+=$2} $1=="Rss:"{r+=$2} END {printf "%.1f %.1f", p/1024, r/1024}'
}
touch_all() { for v in "$@"; do echo 'echo hi' > "$MNT/$v/exec"; cat "$MNT/$v/exec" >/dev/null; done; }
wait_ready() {
  for _ in $(seq 1 1500); do grep -q " ready=$1 " "$MNT/pools" && return 0; sleep 0.2; done
  echo "pool never reached ready=$1: $(cat "$MNT/pools")" >&2; exit 1
}

echo 'memory=256 vcpus=1' > "$MNT/defaults"
backend=$(sed -n 's/^backend=//p' "$MNT/defaults"); backend=${backend:-auto}
echo "image=base vcpus=1 memory=256 backend=$backend size=$n" > "$MNT/pools"
t0=$(now_ms); wait_ready "$n"; echo "template + $n clones ready in $(( $(now_ms) - t0 )) ms"

echo "== memory of $n VMs (256 MiB guests; MiB)"
pooled=""; for i in $(seq 1 "$n"); do mkdir "$MNT/p$i"; pooled="$pooled p$i"; done
# shellcheck disable=SC2086 # word lists on purpose
touch_all $pooled
# shellcheck disable=SC2086
read -r pp pr <<< "$(mem_of $pooled)"
echo 'create src memory=256' > "$MNT/ctl"
echo 'snapshot s256' > "$MNT/src/ctl"
read -r one_p one_r <<< "$(mem_of src)"
rmdir "$MNT/src"
echo "clone s256 c count=$n" > "$MNT/ctl"
priv=""; for i in $(seq 1 "$n"); do priv="$priv c-$i"; done
# shellcheck disable=SC2086
touch_all $priv
# shellcheck disable=SC2086
read -r cp cr <<< "$(mem_of $priv)"
printf '%-34s %10s %10s\n' what PSS_MiB RSS_MiB
printf '%-34s %10s %10s\n' "one cold-booted VM" "$one_p" "$one_r"
printf '%-34s %10s %10s\n' "$n pooled (shared template RAM)" "$pp" "$pr"
printf '%-34s %10s %10s\n' "$n clones of a snapshot (private)" "$cp" "$cr"
echo "pooled/one VM: $(awk -v a="$pp" -v b="$one_p" 'BEGIN{printf "%.2f", a/b}')x; private clones/one VM: $(awk -v a="$cp" -v b="$one_p" 'BEGIN{printf "%.2f", a/b}')x"
for v in $pooled $priv; do rmdir "$MNT/$v"; done
rmdir "$MNT/snapshots/s256"

echo "== mkdir -> first exec answered: warm pool vs cold boot ($rounds rounds)"
: > "$work/pool.ms"; : > "$work/cold.ms"
for i in $(seq 1 "$rounds"); do
  wait_ready "$n"
  t0=$(now_ms); mkdir "$MNT/w$i"; echo 'echo hi' > "$MNT/w$i/exec"; cat "$MNT/w$i/exec" >/dev/null; t1=$(now_ms)
  echo $((t1 - t0)) >> "$work/pool.ms"
  t0=$(now_ms); echo "create k$i memory=128" > "$MNT/ctl"; echo 'echo hi' > "$MNT/k$i/exec"; cat "$MNT/k$i/exec" >/dev/null; t1=$(now_ms)
  echo $((t1 - t0)) >> "$work/cold.ms"
  rmdir "$MNT/w$i" "$MNT/k$i"
done
echo "pool median $(median < "$work/pool.ms") ms ($(tr '\n' ' ' < "$work/pool.ms")); cold median $(median < "$work/cold.ms") ms ($(tr '\n' ' ' < "$work/cold.ms"))"
echo "(cold boots use memory=128 so they miss the pool; $(cat "$MNT/pools"))"
: > "$MNT/pools"
