#!/bin/bash
# Story 6: snapshot a running VM and start three clones of it; a process started before
# the snapshot runs on in every clone, each clone with its own name, disk and entropy.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
echo 'create demo6 memory=128' > "$B/ctl"
echo 'sleep 10000 >/dev/null 2>&1 & echo started' > "$B/demo6/exec"
echo 'snapshot demo6-snap' > "$B/demo6/ctl"; cat "$B/demo6/ctl"   # ok: snapshot demo6-snap ...
cat "$B/snapshots/demo6-snap/info"                                 # JSON: source, sizes, kernel
echo 'clone demo6-snap demo6c count=3' > "$B/ctl"; cat "$B/ctl"   # ok: cloned ... into demo6c-1 ...
for c in demo6c-1 demo6c-2 demo6c-3; do
  echo 'hostname; ps | grep "[s]leep 10000"' > "$B/$c/exec"; cat "$B/$c/exec"
done
for c in demo6c-1 demo6c-2 demo6c-3 demo6; do rmdir "$B/$c"; done
rmdir "$B/snapshots/demo6-snap"
