#!/bin/bash
# fs/ against its peers, side by side in one run (issue 11; figures go to docs/benchmarks.md).
# Not a test: prints a table. Targets, all measured in this run:
#   native  a directory on the host disk
#   bindfs  a bindfs (FUSE passthrough) mount of another directory on the same disk
#   fs/     a VM's fs/ in host mode (the agent as a host process: our stack's own cost)
#   tcg     (with "tcg") a real QEMU TCG guest's fs/
# Ratios are to bindfs (host rows) or to `tar c | exec 'tar x'` (tcg rsync row).
# Usage: bench/fs-peer.sh [host|tcg|all]   (root, after mount-helpers/setup)
#   BENCH_N: files per per-operation row (default 300); BENCH_BIG: entries of the large
#   listing (default 20000).
set -euo pipefail
which=${1:-host}
work=/var/tmp/bandsox-bench-peer
. "$(dirname "$0")/lib.sh"
N=${BENCH_N:-300}
BIG=${BENCH_BIG:-20000}
command -v bindfs >/dev/null || { echo "bindfs is not installed (mount-helpers/ensure-deps installs it)"; exit 1; }
export BANDSOX_HOST_AGENT=$repo/target/release/bandsox-agent
[ -x "$BANDSOX_HOST_AGENT" ] || { echo "no $BANDSOX_HOST_AGENT: cargo build --release --workspace"; exit 1; }
BIND=$work/bind
bind_cleanup() { fusermount3 -u "$BIND" 2>/dev/null || umount -l "$BIND" 2>/dev/null || true; cleanup; }
trap bind_cleanup EXIT

now() { date +%s%N; }
ms_since() { echo $(( ($(now) - $1) / 1000000 )); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0) print "n/a"; else printf "%.2f", a/b }'; }
drop() { sync; echo 2 > /proc/sys/vm/drop_caches; }
# median_ms CMD...: median wall time of 5 runs of CMD (ms, 1 decimal).
median_ms() {
  local t0 out=()
  for _ in 1 2 3 4 5; do t0=$(now); "$@" >/dev/null 2>&1; out+=($(( $(now) - t0 ))); done
  printf '%s\n' "${out[@]}" | sort -n | sed -n 3p | awk '{printf "%.1f", $1/1e6}'
}
cold_ms() {
  local t0 out=()
  for _ in 1 2 3; do drop; t0=$(now); "$@" >/dev/null 2>&1; out+=($(( $(now) - t0 ))); done
  printf '%s\n' "${out[@]}" | sort -n | sed -n 2p | awk '{printf "%.1f", $1/1e6}'
}

mkdir -p "$work/native" "$work/backing" "$BIND"
bindfs "$work/backing" "$BIND"
bench_mount
mkdir "$MNT/fb"
FS=$MNT/fb/fs/bench
mkdir -p "$FS"
targets=(native bindfs fs)
declare -A DIR=([native]=$work/native [bindfs]=$BIND [fs]=$FS)
# Where each target's files really live (to populate large listings without timing it).
fs_backing=$(ls -d "$STATE"/vms/*/host/root)/bench
declare -A BACK=([native]=$work/native [bindfs]=$work/backing [fs]=$fs_backing)
declare -A R

run_target() {
  local t=$1 d=${DIR[$1]} k v
  mkdir -p "$d/ops"
  while read -r k v; do R[$t.$k]=$v; done < <(python3 "$repo/bench/fsops.py" "$d/ops" "$N")
  for n in 1000 "$BIG"; do
    mkdir -p "${BACK[$t]}/ls$n"
    (cd "${BACK[$t]}/ls$n" && seq -f "e%g" 1 "$n" | xargs touch)
    R[$t.ls_cold_$n]=$(cold_ms ls -l "$d/ls$n")
    ls -l "$d/ls$n" >/dev/null
    R[$t.ls_warm_$n]=$(median_ms ls -l "$d/ls$n")
  done
  # Workloads.
  local src=$work/src
  local t0
  drop; t0=$(now); rsync -a "$src/" "$d/rsync/"; R[$t.rsync]=$(ms_since "$t0")
  t0=$(now); rsync -a "$src/" "$d/rsync/"; R[$t.rsync_noop]=$(ms_since "$t0")
  mkdir -p "$d/tarx"
  t0=$(now); tar x -C "$d/tarx" -f "$work/repo.tar"; R[$t.tar_x]=$(ms_since "$t0")
  t0=$(now); git clone -q --local --no-hardlinks "$work/repo.git" "$d/clone"; R[$t.git_clone]=$(ms_since "$t0")
  git -C "$d/clone" status >/dev/null
  R[$t.git_status]=$(median_ms git -C "$d/clone" status)
  for mib in 1 64 256; do
    t0=$(now); dd if=/dev/zero of="$d/seq$mib" bs=1M count="$mib" conv=fsync status=none
    R[$t.write_$mib]=$(ms_since "$t0")
    drop; t0=$(now); dd if="$d/seq$mib" of=/dev/null bs=1M status=none
    R[$t.read_$mib]=$(ms_since "$t0")
    rm -f "$d/seq$mib"
  done
}

# Inputs: a 5,000-file tree (50 dirs × 100) and this repository's source as a tar.
src=$work/src
for d in $(seq 1 50); do mkdir -p "$src/d$d"; (cd "$src/d$d" && for f in $(seq 1 100); do printf 'file %s/%s\n' "$d" "$f" > "f$f"; done); done
git -C "$repo" archive --format=tar HEAD > "$work/repo.tar"
git clone -q --bare "$repo" "$work/repo.git"

if [ "$which" = host ] || [ "$which" = all ]; then
  for t in "${targets[@]}"; do echo "measuring $t ..." >&2; run_target "$t"; done
  # The agent's own round trip, without the daemon or FUSE (raw calls to a host-mode
  # agent of the same build).
  R[fs.raw_agent_getattr]=$("$BANDSOX_DEVTOOLS" fsbench --state-dir "$STATE" \
    --host-agent "$BANDSOX_HOST_AGENT" "write /root/rawstat 1" "stat /root/rawstat 300" \
    | sed -n 's/.*stat n=.*median_us=\([0-9]*\).*/\1/p')
  rows=(create_write_close chmod_utime rename lstat_after_rename lstat_warm stat_missing getxattr_absent raw_agent_getattr unlink
    readdir_1000 ls_cold_1000 ls_warm_1000 "ls_cold_$BIG" "ls_warm_$BIG"
    rsync rsync_noop tar_x git_clone git_status write_1 write_64 write_256 read_1 read_64 read_256)
  echo "== host mode: per-operation medians (µs), workloads and sequential I/O (ms)"
  printf '%-22s %10s %10s %10s %10s\n' row native bindfs fs/ fs/÷bindfs
  for k in "${rows[@]}"; do
    printf "%-22s %10s %10s %10s %10s\n" "$k" "${R[native.$k]:--}" "${R[bindfs.$k]:--}" "${R[fs.$k]:--}" \
      "$(ratio "${R[fs.$k]:-0}" "${R[bindfs.$k]:-0}")"
  done
  echo "(sequential rows are times: for them a ratio ≤ 1 means fs/ is at least as fast)"
fi

if [ "$which" = tcg ] || [ "$which" = all ]; then
  unset BANDSOX_HOST_AGENT
  "$BANDSOX" unmount "$MNT"; cleanup; bench_mount
  mkdir "$MNT/tg"
  T=$MNT/tg/fs/root/bench
  mkdir -p "$T/ops"
  echo "== tcg guest: per-operation medians (µs)"
  python3 "$repo/bench/fsops.py" "$T/ops" 100
  t0=$(now); rsync -a "$src/" "$T/rsync/"; rs=$(ms_since "$t0")
  t0=$(now); rsync -a "$src/" "$T/rsync/"; noop=$(ms_since "$t0")
  mkdir -p "$T/tar"
  t0=$(now)
  (echo "tar x -C /root/bench/tar" > "$MNT/tg/exec") & waiter=$!
  until [ "$(cat "$MNT/tg/runs/last/status" 2>/dev/null)" = running ]; do sleep 0.02; done
  tar c -C "$src" . > "$MNT/tg/runs/last/stdin"
  echo close-stdin > "$MNT/tg/runs/last/ctl"
  wait "$waiter"
  tar_ms=$(ms_since "$t0")
  echo "rsync -a 5,000 files: ${rs} ms; no-op rsync: ${noop} ms; tar | exec tar x: ${tar_ms} ms;" \
    "rsync ÷ tar stream: $(ratio "$rs" "$tar_ms")"
fi
