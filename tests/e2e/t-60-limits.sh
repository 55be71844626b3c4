#!/bin/bash
# Limits on real VMs, as a user who is not root: each refusal has the documented errno,
# names the limit, its value and the use, and changes nothing; root raises the limit in
# the file (no restart) and the same request passes. (Every limit, in host mode:
# fsd/tests/service_host.rs.)
# timeout: 240
set -euo pipefail
. "$(dirname "$0")/lib.sh"
U=1601
asu() { setpriv --reuid=$U --regid=$U --clear-groups bash -c "$1"; }
limits() { printf '%s\n' "$@" > "$LIMITS"; }
cleanup_60() {
  rmdir "$MNT/c60" "$MNT/l60a" "$MNT/l60b" "$MNT/snapshots/s60" 2>/dev/null || true
  : > "$LIMITS"
}
on_exit cleanup_60

limits "per_user.vms = 1"
asu "mkdir $MNT/l60a" || fail "first VM refused"
[ "$(stat -c %u "$MNT/l60a")" = $U ] || fail "l60a is not the user's"
err=$(asu "mkdir $MNT/l60b" 2>&1) && fail "second VM over per_user.vms=1 was created"
assert_contains "$err" "Disk quota exceeded" "mkdir over the limit"
why=$(asu "cat $MNT/ctl")
assert_contains "$why" "per_user.vms=1" "ctl"
assert_contains "$why" "uid $U has 1 VMs" "ctl"
[ ! -e "$MNT/l60b" ] || fail "a refused VM appeared"

# Snapshots: refused at the limit, then taken once root raises it.
limits "per_user.vms = 1" "per_user.snapshots = 0"
err=$( { asu "echo 'snapshot s60' > $MNT/l60a/ctl"; } 2>&1) && fail "snapshot over the limit was taken"
assert_contains "$err" "Disk quota exceeded" "snapshot over the limit"
assert_contains "$(asu "cat $MNT/l60a/ctl")" "per_user.snapshots=0" "VM ctl"
[ ! -e "$MNT/snapshots/s60" ] || fail "a refused snapshot appeared"
limits "per_user.vms = 1"
asu "echo 'snapshot s60' > $MNT/l60a/ctl" || fail "snapshot after the raise: $(asu "cat $MNT/l60a/ctl")"
[ -d "$MNT/snapshots/s60" ] || fail "no snapshot s60"

# Snapshot bytes: s60 counts its size.
limits "per_user.vms = 1" "per_user.snapshot_mib = 1"
err=$( { asu "echo 'snapshot s60b' > $MNT/l60a/ctl"; } 2>&1) && fail "snapshot over snapshot_mib was taken"
assert_contains "$err" "Disk quota exceeded" "snapshot over snapshot_mib"
assert_contains "$(asu "cat $MNT/l60a/ctl")" "per_user.snapshot_mib=1" "VM ctl"

# A clone counts like a create.
err=$( { asu "echo 'clone s60 c60' > $MNT/ctl"; } 2>&1) && fail "clone over per_user.vms=1 ran"
assert_contains "$err" "Disk quota exceeded" "clone over the limit"
limits "per_user.vms = 2"
asu "echo 'clone s60 c60' > $MNT/ctl" || fail "clone after the raise: $(asu "cat $MNT/ctl")"
state_is c60 running || fail "c60 is $(cat "$MNT/c60/state")"

# usage shows the user their own use.
u=$(asu "cat $MNT/usage")
assert_contains "$u" "user uid=$U " "usage"
assert_contains "$u" " vms=2/2 " "usage"
assert_contains "$u" " snapshots=1/" "usage"
asu "rmdir $MNT/c60 $MNT/l60a $MNT/snapshots/s60" || fail "the user cannot remove their VMs"
