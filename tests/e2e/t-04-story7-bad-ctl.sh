#!/bin/bash
# Story 7: bad ctl input fails with EINVAL, cat ctl explains, nothing changes.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s7
write_expect_error "$MNT/s7/ctl" bogus "Invalid argument"
assert_contains "$(cat "$MNT/s7/ctl")" "error:" "ctl after bogus"
assert_contains "$(cat "$MNT/s7/ctl")" "accepted" "ctl after bogus"
assert_eq running "$(cat "$MNT/s7/state")" state
write_expect_error "$MNT/s7/ctl" "pause now" "Invalid argument"
write_expect_error "$MNT/s7/ctl" "resume" "Device or resource busy"
assert_eq running "$(cat "$MNT/s7/state")" state
# Global ctl.
write_expect_error "$MNT/ctl" "frobnicate" "Invalid argument"
assert_contains "$(cat "$MNT/ctl")" "accepted: create" "root ctl"
write_expect_error "$MNT/ctl" "create s7" "File exists"
write_expect_error "$MNT/ctl" "create x7 vcpus=0" "Invalid argument"
write_expect_error "$MNT/ctl" "create x7 colour=blue" "Invalid argument"
write_expect_error "$MNT/ctl" "create x7 image=nosuch" "No such file or directory"
[ ! -e "$MNT/x7" ] || fail "a failed create left x7 behind"
# A good ctl command reports ok.
echo pause > "$MNT/s7/ctl"
assert_contains "$(cat "$MNT/s7/ctl")" "ok" "ctl after pause"
echo resume > "$MNT/s7/ctl"
