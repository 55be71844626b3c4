#!/bin/sh
# Story 7: a bad command fails with EINVAL, and ctl says why.
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo7" || exit 1
echo bogus > "$B/demo7/ctl"          # sh: write error: Invalid argument
cat "$B/demo7/ctl"                   # error: unknown command "bogus"; accepted: ...
cat "$B/demo7/state"                 # running: nothing changed
rmdir "$B/demo7"
