#!/bin/bash
# runs/<n>/stdin feeds a running cat; kill TERM ends a sleep with status "signal 15".
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm io
( echo 'cat' > "$MNT/io/exec" ) &
writer=$!
wait_for 10 test -e "$MNT/io/runs/1/stdin" || fail "run 1 did not appear"
assert_eq running "$(cat "$MNT/io/runs/1/status")" "cat status"
printf 'hello\n' > "$MNT/io/runs/1/stdin"
printf 'world\n' > "$MNT/io/runs/1/stdin"
echo close-stdin > "$MNT/io/runs/1/ctl"
wait $writer
assert_eq "hello
world" "$(cat "$MNT/io/runs/1/stdout")" "cat output"
assert_eq 0 "$(cat "$MNT/io/runs/1/status")" "cat status"
# kill TERM
exec 3<>"$MNT/io/exec"; echo 'sleep 1000' >&3
wait_for 10 grep -q running "$MNT/io/runs/2/status" || fail "sleep not running"
echo 'kill TERM' > "$MNT/io/runs/2/ctl"
wait_for 10 sh -c "! grep -q running '$MNT/io/runs/2/status'" || fail "sleep still running"
exec 3<&-
assert_eq "signal 15" "$(cat "$MNT/io/runs/2/status")" "sleep status"
write_expect_error "$MNT/io/runs/2/ctl" "explode" "Invalid argument"
