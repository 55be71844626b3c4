#!/bin/bash
# The agent connection of a real VM is dropped and re-established under open files,
# running reads and exec (tests/fs/reconnect.sh), and after pause/resume.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm rc
fs_scenario reconnect rc
echo pause > "$MNT/rc/ctl"
echo resume > "$MNT/rc/ctl"
echo 'echo after-resume' > "$MNT/rc/exec"
assert_eq after-resume "$(cat "$MNT/rc/exec")" "exec after resume"
