#!/bin/bash
# Every fallocate(2) mode through fs/ of a real guest (ext4 on virtio-blk) against the
# same calls made in the guest itself (tests/fs/fallocate.sh): results, sizes and
# contents match, except the modes the host kernel's FUSE client refuses by itself.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm fal
fs_scenario fallocate fal
