#!/bin/bash
# Story 8: follow the console and the event log (Ctrl-C to stop following).
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
tail -n 3 -f "$B/events" &
follower=$!
mkdir "$B/demo8"
head -n 5 "$B/demo8/console"
rmdir "$B/demo8"
sleep 1; kill $follower
