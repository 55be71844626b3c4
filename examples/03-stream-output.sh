#!/bin/bash
# Stream a long-running command's output live through one read-write descriptor.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo3"
exec 3<>"$B/demo3/exec"
echo 'for i in 1 2 3 4 5; do echo "tick $i"; sleep 1; done' >&3
cat <&3
exec 3<&-
rmdir "$B/demo3"
