#!/bin/bash
# Story 7: a bad command fails with EINVAL, and ctl says why.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo7" || exit 1
echo bogus > "$B/demo7/ctl" || true  # bash: write error: Invalid argument
cat "$B/demo7/ctl"                   # error: unknown command "bogus"; accepted: ...
cat "$B/demo7/state"                 # running: nothing changed
rmdir "$B/demo7"
