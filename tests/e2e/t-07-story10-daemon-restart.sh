#!/bin/bash
# Story 10: SIGKILL the daemon, start it again: running VMs are still there and usable.
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s10
echo 'echo before > /root/mark' > "$MNT/s10/exec"
crash_and_restart_daemon
assert_eq running "$(cat "$MNT/s10/state")" "state after restart"
echo 'cat /root/mark' > "$MNT/s10/exec"
assert_eq before "$(cat "$MNT/s10/exec")" "exec after restart"
# Earlier runs are still listed.
assert_eq 0 "$(cat "$MNT/s10/runs/1/status")" "runs/1/status after restart"
