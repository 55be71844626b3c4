#!/bin/bash
# fs/ benchmarks (issue 3; figures go to docs/benchmarks.md). Not a test: prints numbers.
# Every figure is a ratio measured side by side in this one run:
#  1. sequential write and read of 1, 64 and 256 MiB through fs/ (dd, 1 MiB blocks, page
#     cache dropped before reads) vs. the same bytes moved by raw agent calls, without the
#     daemon or FUSE, to a VM booted the same way (`bandsox-devtools fsbench`);
#  2. stat / 4 KiB read / create+unlink latency through fs/ (`bandsox-devtools fslat`,
#     in-process) vs. the same agent calls direct (`fsbench stat|read4k|create`);
#  3. rsync -a of a 5,000-file tree into fs/ vs. `tar c | exec 'tar x'` through one exec.
# Usage: bench/fs.sh [qemu|host]   host = the agent as a host process over a unix socket
#        (our stack's own ceiling without the emulated VM). Root; after mount-helpers/setup.
set -euo pipefail
mode=${1:-qemu}
work=/var/tmp/bandsox-bench-fs-$mode
. "$(dirname "$0")/lib.sh"
if [ "$mode" = host ]; then
  export BANDSOX_HOST_AGENT=$repo/target/release/bandsox-agent
  dir=fs/bench         # relative to the agent's root
  raw_agent=(--host-agent "$BANDSOX_HOST_AGENT")
else
  dir=fs/root/bench
  raw_agent=()
fi
# raw OP...: the agent's raw calls, no daemon, no FUSE (a VM or host agent of its own,
# booted like the mounted one); prints one "ok: fsbench ..." line per OP.
raw() { "$BANDSOX_DEVTOOLS" fsbench --state-dir "$STATE" "${raw_agent[@]}" "$@"; }
bench_mount
mkdir "$MNT/fb"
V=$MNT/fb
mkdir -p "$V/$dir"
gpath=/${dir#fs/}       # the same directory as the agent sees it
# Exec runs in the agent's working directory (host mode: its root, not the host's /).
if [ "$mode" = host ]; then xpath=${gpath#/}; else xpath=$gpath; fi

field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0) print "n/a"; else printf "%.2f", a/b }'; }
mbs() { awk -v bytes="$1" -v ns="$2" 'BEGIN{printf "%.1f", bytes / (ns / 1000.0)}'; }  # MB/s (1e6)

echo "== sequential I/O ($mode): fs/ vs raw agent calls (no daemon, no FUSE)"
printf '%-6s %10s %10s %6s %10s %10s %6s\n' size fs_write raw_write ratio fs_read raw_read ratio
for mib in 1 64 256; do
  f=$V/$dir/seq$mib
  t0=$(date +%s%N); dd if=/dev/zero of="$f" bs=1M count="$mib" status=none; t1=$(date +%s%N)
  fw=$(mbs $((mib * 1048576)) $((t1 - t0)))
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(date +%s%N); dd if="$f" of=/dev/null bs=1M status=none; t1=$(date +%s%N)
  fr=$(mbs $((mib * 1048576)) $((t1 - t0)))
  rm -f "$f"   # one copy at a time: the guest disk is 512 MiB
  # The raw side writes then reads its own file (the page cache of its guest is warm for
  # the read, as it is for the fs/ read in the guest).
  out=$(raw "write /root/raw$mib $mib" "read /root/raw$mib")
  rw=$(echo "$out" | grep 'fsbench write' | field mb_s)
  rr=$(echo "$out" | grep 'fsbench read' | field mb_s)
  printf '%-6s %10s %10s %6s %10s %10s %6s\n' "${mib}M" "$fw" "$rw" "$(ratio "$fw" "$rw")" "$fr" "$rr" "$(ratio "$fr" "$rr")"
  rm -f "$f" "$V/$dir/raw$mib"
done
echo "(MB/s; ratio = fs/ ÷ raw; target ≥ 0.7 for ≥ 1 MiB)"

echo "== latency ($mode): fs/ (in-process) vs raw agent calls, medians of 200"
lat=$("$BANDSOX_DEVTOOLS" fslat "$V/$dir" --n 200)
echo "fs/: $lat"
out=$(raw "write /root/lat4k 1" "stat /root/lat4k 200" "read4k /root/lat4k 200" "create /root 200")
rs=$(echo "$out" | grep 'fsbench stat' | field median_us)
rr=$(echo "$out" | grep 'fsbench read4k' | field median_us)
rc=$(echo "$out" | grep 'fsbench create' | field median_us)
echo "raw: stat_us=$rs read4k_us=$rr create_unlink_us=$rc"
echo "ratios (fs/ ÷ raw; target ≤ 2): stat(cached) $(ratio "$(echo "$lat" | field stat_us)" "$rs")" \
  "stat(forced) $(ratio "$(echo "$lat" | field statx_sync_us)" "$rs")" \
  "read4k $(ratio "$(echo "$lat" | field read4k_direct_us)" "$rr")" \
  "create+unlink $(ratio "$(echo "$lat" | field create_unlink_us)" "$rc")"

echo "== 5,000-file tree ($mode): rsync -a into fs/ vs tar through one exec"
src=$work/src
for d in $(seq 1 50); do mkdir -p "$src/d$d"; for f in $(seq 1 100); do printf 'file %s/%s\n' "$d" "$f" > "$src/d$d/f$f"; done; done
t0=$(date +%s%N); rsync -a "$src/" "$V/$dir/rsync/"; t1=$(date +%s%N)
rs_ms=$(( (t1 - t0) / 1000000 ))
mkdir -p "$V/$dir/tar"
t0=$(date +%s%N)
# A write-only exec waits for the command; its stdin is runs/N/stdin until close-stdin.
(echo "tar x -C $xpath/tar" > "$V/exec") & waiter=$!
until [ "$(cat "$V/runs/last/status" 2>/dev/null)" = running ]; do sleep 0.02; done
tar c -C "$src" . > "$V/runs/last/stdin"
echo close-stdin > "$V/runs/last/ctl"
wait "$waiter"
t1=$(date +%s%N)
tar_ms=$(( (t1 - t0) / 1000000 ))
echo "rsync -a: ${rs_ms} ms; tar | exec tar x: ${tar_ms} ms; ratio $(ratio "$rs_ms" "$tar_ms")"
echo "files in guest (tar): $(echo "find $xpath/tar -type f | wc -l" > "$V/exec"; cat "$V/exec")"
