#!/bin/bash
# Story 5: pause and resume through ctl; with autoresume=0 a paused VM refuses exec.
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s5
# autoresume=1 (the default) would resume it for the exec: see t-38-lifecycle.
echo autoresume=0 > "$MNT/s5/ctl"
echo pause > "$MNT/s5/ctl"
assert_eq paused "$(cat "$MNT/s5/state")" state
# A paused VM answers exec promptly with an error, never hangs.
start=$(date +%s)
if (echo 'true' > "$MNT/s5/exec") 2>/dev/null; then fail "exec on a paused VM succeeded"; fi
[ $(( $(date +%s) - start )) -le 3 ] || fail "exec on a paused VM took too long"
echo resume > "$MNT/s5/ctl"
assert_eq running "$(cat "$MNT/s5/state")" state
echo 'echo alive' > "$MNT/s5/exec"
assert_eq alive "$(cat "$MNT/s5/exec")" "exec after resume"
