#!/bin/bash
# Story 4: guest-side changes are visible in fs/ at once, and the other way round.
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s4
echo 'touch /tmp/x' > "$MNT/s4/exec"
ls "$MNT/s4/fs/tmp/x" >/dev/null || fail "guest-created /tmp/x not visible at once"
fs_scenario coherence s4
