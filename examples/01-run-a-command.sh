#!/bin/bash
# Story 1: boot a VM, run a command, read its output.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo1"
echo 'uname -r' > "$B/demo1/exec"
cat "$B/demo1/exec"
rmdir "$B/demo1"
