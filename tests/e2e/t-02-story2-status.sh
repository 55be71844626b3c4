#!/bin/bash
# Story 2: a #! script's exit code appears in runs/last/status.
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s2
printf '#!/bin/sh\nexit 3\n' > "$MNT/s2/exec"
assert_eq 3 "$(cat "$MNT/s2/runs/last/status")" status
echo 'true' > "$MNT/s2/exec"
assert_eq 0 "$(cat "$MNT/s2/runs/last/status")" status
echo 'kill -9 $$' > "$MNT/s2/exec"
assert_eq "signal 9" "$(cat "$MNT/s2/runs/last/status")" status
# runs/<n>/ keeps every command; last points at the newest.
[ "$(readlink "$MNT/s2/runs/last")" = 3 ] || fail "runs/last -> $(readlink "$MNT/s2/runs/last")"
assert_eq 3 "$(cat "$MNT/s2/runs/1/status")" "runs/1/status"
assert_contains "$(cat "$MNT/s2/runs/1/cmd")" "exit 3" "runs/1/cmd"
# stdout and stderr are kept apart, and together in order in output.
echo 'echo out; sleep 0.2; echo err >&2; sleep 0.2; echo out2' > "$MNT/s2/exec"
assert_eq "out
out2" "$(cat "$MNT/s2/runs/last/stdout")" stdout
assert_eq "err" "$(cat "$MNT/s2/runs/last/stderr")" stderr
assert_eq "out
err
out2" "$(cat "$MNT/s2/runs/last/output")" output
