#!/bin/bash
# Story 1: mkdir boots a VM; echo > exec runs a command; cat exec prints its output.
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s1
assert_eq running "$(cat "$MNT/s1/state")" state
echo 'uname -r' > "$MNT/s1/exec"
out=$(cat "$MNT/s1/exec")
assert_contains "$out" "cloud-amd64" "guest uname -r"
# The guest is a different kernel from the host's.
[ "$out" != "$(uname -r)" ] || fail "uname -r returned the host kernel"
echo 'hostname' > "$MNT/s1/exec"
assert_eq s1 "$(cat "$MNT/s1/exec")" hostname
if [ "${BANDSOX_QEMU_VSOCK:-}" = 1 ]; then
  # The vsock variant: no virtio-serial port, the agent answered over virtio-vsock.
  id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/s1/info" | head -n1)
  args=$(cat "$STATE/vms/$id/qemu.args.json")
  assert_contains "$args" "vhost-user-vsock-device" "qemu argv"
  case "$args" in *virtserialport*) fail "virtio-serial port still configured";; esac
  [ -S "$STATE/vms/$id/vsock.sock" ] || fail "no hybrid vsock socket"
  assert_contains "$(cat "$MNT/s1/info")" "BANDSOX_QEMU_VSOCK=1" "info"
fi
