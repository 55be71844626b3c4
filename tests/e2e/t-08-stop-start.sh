#!/bin/bash
# stop powers the guest off and keeps the disk; start boots it again with files intact.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm ss
echo 'echo kept > /root/file; sync' > "$MNT/ss/exec"
echo stop > "$MNT/ss/ctl"
assert_eq stopped "$(cat "$MNT/ss/state")" state
# exec on a stopped VM fails at once with a clear errno
err=$( { echo true > "$MNT/ss/exec"; } 2>&1 ) && fail "exec on stopped VM succeeded"
assert_contains "$err" "Host is down" "exec on stopped VM"
write_expect_error "$MNT/ss/ctl" pause "Device or resource busy"
echo start > "$MNT/ss/ctl"
assert_eq running "$(cat "$MNT/ss/state")" state
echo 'cat /root/file' > "$MNT/ss/exec"
assert_eq kept "$(cat "$MNT/ss/exec")" "file after stop/start"
echo kill > "$MNT/ss/ctl"
assert_eq stopped "$(cat "$MNT/ss/state")" "state after kill"
echo restart > "$MNT/ss/ctl"
assert_eq running "$(cat "$MNT/ss/state")" "state after restart"
