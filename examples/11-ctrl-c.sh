#!/bin/bash
# Story 11: Ctrl-C on a blocked reader returns at once and stops the guest command.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo11" || exit 1
exec 3<>"$B/demo11/exec"; echo 'sleep 1000' >&3; exec 3<&-
echo "press Ctrl-C to stop following the sleep"
cat "$B/demo11/exec" || true
cat "$B/demo11/runs/last/status"     # signal 2
rmdir "$B/demo11"
