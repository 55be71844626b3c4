#!/bin/bash
# Issue 11 on a real VM (256 MiB of memory; a 4 GiB sparse disk for the inodes): a
# 100,000-entry directory and a 200,000-file tree are listed and walked through fs/ with
# no EMFILE/ENFILE/OOM, and the agent's descriptors and memory stay under the documented
# bounds (tests/fs/scale.sh).
# timeout: 1200
. "$(dirname "$0")/lib.sh"
echo "create scl memory=256 disk=4096" > "$MNT/ctl" || fail "create: $(cat "$MNT/ctl")"
VMS="scl"; trap cleanup_vms EXIT
fs_scenario scale scl
