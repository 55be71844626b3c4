#!/bin/bash
# POSIX semantics through fs/ of a real guest (ext4 on virtio-blk) answer as ext4 does.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm px
fs_scenario posix px
