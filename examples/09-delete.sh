#!/bin/bash
# Story 9: rmdir stops and deletes everything the VM had.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo9"
grep '"id"' "$B/demo9/info"
rmdir "$B/demo9"
ls "$B"
