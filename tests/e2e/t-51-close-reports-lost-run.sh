#!/bin/bash
# close() of a write-only exec reports a lost run: the VMM dies while the command runs,
# and the writer's close fails with EHOSTDOWN ("Host is down"); status says why.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm lr
id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/lr/info" | head -n1)
vmm=$(cat "$STATE/vms/$id/vmm.pid")
( sleep 2; kill -9 "$vmm" ) &
rc=0
err=$(perl -MPOSIX -e '$fd = POSIX::open("$ENV{MNT}/lr/exec", O_WRONLY) // die "open: $!\n";
  POSIX::write($fd, "sleep 100\n", 10) // die "write: $!\n";
  POSIX::close($fd) // die "close: $!\n"' 2>&1) || rc=$?
wait
note "writer: rc=$rc $err"
[ "$rc" -ne 0 ] || fail "close returned 0 for a run whose VM died"
assert_contains "$err" "close: Host is down" "the writer's error"
status=$(cat "$MNT/lr/runs/last/status")
assert_contains "$status" "lost: " "status of the lost run"
note "status: $status"
