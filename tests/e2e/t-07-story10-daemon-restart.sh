#!/bin/bash
# Story 10: SIGKILL the daemon, start it again: running VMs are still there and usable.
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s10
echo 'echo before > /root/mark' > "$MNT/s10/exec"
crash_and_restart_daemon
# Adoption runs in the background: right after the restart the VM is `adopting` or
# already `running`, and an exec waits for the adoption by itself.
state=$(cat "$MNT/s10/state")
case $state in adopting|running) ;; *) fail "state right after the restart: $state";; esac
echo 'cat /root/mark' > "$MNT/s10/exec"
assert_eq before "$(cat "$MNT/s10/exec")" "exec after restart"
assert_eq running "$(cat "$MNT/s10/state")" "state after restart"
# Earlier runs are still listed.
assert_eq 0 "$(cat "$MNT/s10/runs/1/status")" "runs/1/status after restart"
