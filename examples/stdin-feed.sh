#!/bin/bash
# Feed a running command's stdin, then close it.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demos"
exec 3<>"$B/demos/exec"; echo 'wc -l' >&3
n=$(readlink "$B/demos/runs/last")
printf 'a\nb\nc\n' > "$B/demos/runs/$n/stdin"
echo close-stdin > "$B/demos/runs/$n/ctl"
cat <&3                               # 3
exec 3<&-
rmdir "$B/demos"
