#!/bin/bash
# Issue 11 on a real VM (256 MiB of memory; a 4 GiB sparse disk for the inodes): a
# 100,000-entry directory is listed and a 200,000-file tree is walked (find) through
# fs/ with no EMFILE/ENFILE/OOM, and the agent's descriptors and memory stay under the
# documented bounds (tests/fs/scale.sh). `du`, `ls -lR` and `rsync -an` of the same tree
# take 3-5 minutes each under TCG; they run at full scale in host mode (fsd/tests/fs_host.rs).
# timeout: 900
set -euo pipefail
. "$(dirname "$0")/lib.sh"
echo "create scl memory=256 disk=4096" > "$MNT/ctl" || fail "create: $(cat "$MNT/ctl")"
VMS="scl"
SCALE_WALKS="find" fs_scenario scale scl
