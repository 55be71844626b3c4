#!/bin/bash
# A clone and a snapshot survive a daemon SIGKILL: the clone is adopted (its QEMU runs
# the restore command line) and usable, the snapshot still clones.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
echo 'create sr memory=128' > "$MNT/ctl" || fail "create sr: $(cat "$MNT/ctl")"
VMS="sr"; on_exit 'cleanup_vms; rmdir "$MNT/snapshots/snapr" 2>/dev/null || true'
echo 'snapshot snapr' > "$MNT/sr/ctl" || fail "snapshot: $(cat "$MNT/sr/ctl")"
echo 'clone snapr cr' > "$MNT/ctl" || fail "clone: $(cat "$MNT/ctl")"
VMS="$VMS cr"
echo 'echo mark > /root/mark' > "$MNT/cr/exec"
crash_and_restart_daemon
# The exec waits for the background adoption.
echo 'cat /root/mark; hostname' > "$MNT/cr/exec"
assert_eq "mark
cr" "$(cat "$MNT/cr/exec")" "clone exec after restart"
assert_eq running "$(cat "$MNT/cr/state")" "clone state after restart"
ls "$MNT/snapshots" | has -x snapr || fail "snapshot gone after restart"
echo 'clone snapr cr2' > "$MNT/ctl" || fail "clone after restart: $(cat "$MNT/ctl")"
VMS="$VMS cr2"
echo 'hostname' > "$MNT/cr2/exec"
assert_eq cr2 "$(cat "$MNT/cr2/exec")" "second clone"
