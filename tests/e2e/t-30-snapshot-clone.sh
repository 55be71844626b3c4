#!/bin/bash
# Snapshots: `snapshot NAME` on a running VM, snapshots/NAME/info, `clone`, identity,
# consistency (a file written through fs/ before the snapshot is in the clone, one written
# after is not), exec and fs/ on the first try after restore, rmdir of the snapshot.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
echo 'create sa memory=128' > "$MNT/ctl" || fail "create sa: $(cat "$MNT/ctl")"
VMS="sa"
sa=$MNT/sa
printf 'before\n' > "$sa/fs/root/before.txt"
printf '0123456789abcdef0123456789abcdef\n' > "$sa/fs/etc/machine-id"
echo 'echo $$ > /root/pid-before' > "$sa/exec"

echo 'snapshot s1' > "$sa/ctl" || fail "snapshot: $(cat "$sa/ctl")"
assert_contains "$(cat "$sa/ctl")" "ok: snapshot s1"
printf 'after\n' > "$sa/fs/root/after.txt"
assert_eq running "$(cat "$sa/state")" "source state after snapshot"
echo 'echo still' > "$sa/exec"
assert_eq still "$(cat "$sa/exec")" "source exec after snapshot"

ls "$MNT/snapshots" | has -x s1 || fail "snapshots/ does not list s1: $(ls "$MNT/snapshots")"
info=$(cat "$MNT/snapshots/s1/info")
assert_contains "$info" '"source_vm": "sa"'
assert_contains "$info" '"memory_mib": 128'
assert_contains "$info" "\"backend\": \"$(sed -n 's/.*"backend": *"\([a-z]*\)".*/\1/p' "$sa/info" | head -n1)\""

assert_contains "$info" '"sha256"'
assert_contains "$info" '"state_bytes"'
! ls -A "$STATE/snapshots" | has '^\.' || fail "temporary snapshot dirs left: $(ls -A "$STATE/snapshots")"

echo 'clone s1 sc' > "$MNT/ctl" || fail "clone: $(cat "$MNT/ctl")"
VMS="$VMS sc"
assert_contains "$(cat "$MNT/ctl")" "ok: cloned s1 into sc"
assert_eq running "$(cat "$MNT/sc/state")" "clone state"
# First try, no retries: exec and fs/ work right after the clone command returns.
echo 'hostname' > "$MNT/sc/exec" || fail "first exec in the clone failed"
assert_eq sc "$(cat "$MNT/sc/exec")" "clone hostname"
assert_eq before "$(cat "$MNT/sc/fs/root/before.txt")" "file written before the snapshot"
[ ! -e "$MNT/sc/fs/root/after.txt" ] || fail "a file written after the snapshot is in the clone"
assert_eq "$(cat "$sa/fs/root/pid-before")" "$(cat "$MNT/sc/fs/root/pid-before")" "same memory/disk"
mid=$(cat "$MNT/sc/fs/etc/machine-id")
[ "$mid" != 0123456789abcdef0123456789abcdef ] || fail "the clone kept the source's machine-id"
[ ${#mid} -eq 32 ] || fail "bad machine-id [$mid]"
# The clone's disk is its own.
printf 'clone\n' > "$MNT/sc/fs/root/only-in-clone"
[ ! -e "$sa/fs/root/only-in-clone" ] || fail "clone and source share a disk"
assert_contains "$(cat "$MNT/sc/info")" '"memory_mib": 128'
grep -q 'sc running restore_ms=' "$STATE/events.log" || fail "no running event for the clone"

# A snapshot of a clone restores too (its command line was itself a restore's).
echo 'snapshot s2' > "$MNT/sc/ctl" || fail "snapshot of a clone: $(cat "$MNT/sc/ctl")"
echo 'clone s2 sd' > "$MNT/ctl" || fail "clone of a clone's snapshot: $(cat "$MNT/ctl")"
VMS="$VMS sd"
assert_eq clone "$(cat "$MNT/sd/fs/root/only-in-clone")" "clone of a clone"
echo 'hostname' > "$MNT/sd/exec"
assert_eq sd "$(cat "$MNT/sd/exec")" "second-generation hostname"
rmdir "$MNT/sd"
rmdir "$MNT/snapshots/s2" || fail "rmdir snapshots/s2"

# rmdir of the snapshot while a clone of it runs is fine (the clone has its own copies).
rmdir "$MNT/snapshots/s1" || fail "rmdir snapshots/s1"
[ ! -e "$MNT/snapshots/s1" ] || fail "s1 still listed"
[ -z "$(ls -A "$STATE/snapshots")" ] || fail "files left in snapshots/: $(ls -A "$STATE/snapshots")"
echo 'echo ok' > "$MNT/sc/exec"
assert_eq ok "$(cat "$MNT/sc/exec")" "clone after snapshot removal"
