#!/bin/bash
# Story 10: VMs survive a daemon crash and are re-adopted.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo10"
pkill -9 -f "bandsox mount $B"
sleep 0.5
bandsox mount "$B"
cat "$B/demo10/state"                         # adopting (for a moment), then running
echo 'uptime' > "$B/demo10/exec"; cat "$B/demo10/exec"   # waits for the adoption
cat "$B/demo10/state"                         # running
rmdir "$B/demo10"
