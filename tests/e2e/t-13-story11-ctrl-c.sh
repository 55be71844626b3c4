#!/bin/bash
# Story 11: SIGINT to a reader of exec returns within a second and the guest command dies.
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm cc
exec 3<>"$MNT/cc/exec"; echo 'sleep 1000' >&3; exec 3<&-
wait_for 10 grep -q running "$MNT/cc/runs/1/status" || fail "sleep not running"
# cat blocks on the live output; SIGINT must release it promptly. (Background jobs of a
# non-interactive shell ignore SIGINT, so restore the default disposition first.)
perl -e '$SIG{INT}="DEFAULT"; exec @ARGV' cat "$MNT/cc/exec" > /dev/null &
pid=$!
sleep 1
kill -0 $pid 2>/dev/null || fail "cat exited early"
start=$(date +%s%N)
kill -INT $pid
wait_for 3 gone $pid || fail "cat still blocked 3 s after SIGINT"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
note "released after ${ms} ms"
[ "$ms" -lt 1500 ] || fail "took ${ms} ms"
wait_for 10 sh -c "! grep -q running '$MNT/cc/runs/1/status'" || fail "guest sleep still running"
assert_contains "$(cat "$MNT/cc/runs/1/status")" "signal" "sleep status"
