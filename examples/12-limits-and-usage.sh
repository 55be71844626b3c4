#!/bin/bash
# A shared service: what you use against the limits root sets, what a refusal looks like,
# and your own event lines. As root, first: echo 'per_user.vms = 1' >> /etc/bandsox/limits
# (the daemon picks the change up at once). Run as an ordinary user.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
cat "$B/usage"                      # user uid=... vms=0/1 ...; host ...; vm ...
mkdir "$B/demo12a"
mkdir "$B/demo12b" || cat "$B/ctl"  # Disk quota exceeded; error: limit per_user.vms=1 reached: ...
grep demo12 "$B/events"             # only your own VMs' lines
cat "$B/demo12a/events"             # this VM's history
echo 'create demo12c keep_runs=5 output_mib=16' > "$B/ctl" || true   # refused here too
rmdir "$B/demo12a"
