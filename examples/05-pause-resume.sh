#!/bin/bash
# Story 5: pause and resume.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo5"
echo pause > "$B/demo5/ctl"; cat "$B/demo5/state"     # paused
echo resume > "$B/demo5/ctl"; cat "$B/demo5/state"    # running
rmdir "$B/demo5"
