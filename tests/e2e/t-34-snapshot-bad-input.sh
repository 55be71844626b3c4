#!/bin/bash
# Bad snapshot/clone input: errno + message, nothing created, no partial snapshot dirs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
echo 'create sb memory=128' > "$MNT/ctl" || fail "create sb: $(cat "$MNT/ctl")"
VMS="sb"; on_exit 'cleanup_vms; rmdir "$MNT/snapshots/snapb" 2>/dev/null || true'
snapdir_clean() {
  ! ls -A "$STATE/snapshots" | has -v '^snapb$' || fail "unexpected in snapshots/: $(ls -A "$STATE/snapshots")"
}
write_expect_error "$MNT/sb/ctl" 'snapshot ../x' "Invalid argument"
assert_contains "$(cat "$MNT/sb/ctl")" "error:"
write_expect_error "$MNT/sb/ctl" 'snapshot ctl' "Invalid argument"
write_expect_error "$MNT/sb/ctl" 'snapshot .hidden' "Invalid argument"
write_expect_error "$MNT/sb/ctl" "snapshot $(printf 'x%.0s' $(seq 1 65))" "Invalid argument"
write_expect_error "$MNT/sb/ctl" 'snapshot' "Invalid argument"
snapdir_clean
echo 'snapshot snapb' > "$MNT/sb/ctl" || fail "snapshot: $(cat "$MNT/sb/ctl")"
write_expect_error "$MNT/sb/ctl" 'snapshot snapb' "File exists"
assert_contains "$(cat "$MNT/sb/ctl")" "already exists"
write_expect_error "$MNT/ctl" 'clone nosuch x' "No such file or directory"
assert_contains "$(cat "$MNT/ctl")" "no snapshot"
write_expect_error "$MNT/ctl" 'clone snapb sb' "File exists"
write_expect_error "$MNT/ctl" 'clone snapb bad/name' "Invalid argument"
write_expect_error "$MNT/ctl" 'clone snapb x count=0' "Invalid argument"
write_expect_error "$MNT/ctl" 'clone snapb x count=many' "Invalid argument"
write_expect_error "$MNT/ctl" 'clone ../snapb x' "Invalid argument"
[ ! -e "$MNT/x" ] && [ ! -e "$MNT/x-1" ] || fail "a rejected clone created a VM"
# A snapshot taken with another kernel is refused with a clear message.
cp "$STATE/snapshots/snapb/info.json" /tmp/snapb-info.$$
sed -i '0,/"sha256": "[0-9a-f]*"/s//"sha256": "00000000000000000000"/' "$STATE/snapshots/snapb/info.json"
write_expect_error "$MNT/ctl" 'clone snapb x' "Invalid argument"
assert_contains "$(cat "$MNT/ctl")" "different kernel"
# A snapshot of another backend that this daemon cannot run is refused too (only where
# Firecracker is missing, as on the project's machines).
cp /tmp/snapb-info.$$ "$STATE/snapshots/snapb/info.json"
if ! command -v firecracker >/dev/null 2>&1 && grep -q '"backend": "qemu"' "$STATE/snapshots/snapb/info.json"; then
  sed -i 's/"backend": "qemu"/"backend": "firecracker"/' "$STATE/snapshots/snapb/info.json"
  write_expect_error "$MNT/ctl" 'clone snapb x' "Operation not supported"
  assert_contains "$(cat "$MNT/ctl")" "backend=firecracker"
fi
cp /tmp/snapb-info.$$ "$STATE/snapshots/snapb/info.json"; rm -f /tmp/snapb-info.$$
[ ! -e "$MNT/x" ] || fail "a refused clone created a VM"
# rmdir of something that is not a snapshot.
rmdir "$MNT/snapshots/nosuch" 2>/dev/null && fail "rmdir of an unknown snapshot succeeded"
# A stopped VM cannot be snapshotted.
echo stop > "$MNT/sb/ctl"
write_expect_error "$MNT/sb/ctl" 'snapshot snapc' "Device or resource busy"
assert_contains "$(cat "$MNT/sb/ctl")" "needs a running VM"
echo pause > "$MNT/sb/ctl" 2>/dev/null || true
snapdir_clean
[ ! -e "$MNT/snapshots/snapc" ] || fail "a refused snapshot is listed"
