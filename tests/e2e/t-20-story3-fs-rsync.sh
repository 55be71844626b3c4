#!/bin/bash
# Story 3 (second half): rsync -a of a 2,000-file tree into fs/; a second
# rsync -a --itemize-changes reports nothing to do. About 8 round trips per file through
# an emulated guest (~40 ms per file on a 2-core TCG host), so the tree is smaller than
# the 5,000 files of the host-mode run (fsd/tests/fs_host.rs) and the limit is raised.
# timeout: 600
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm rs
RSYNC_DIRS=${RSYNC_DIRS:-20} fs_scenario rsync rs
