#!/bin/bash
# bandsox doctor on this machine: every check line, KVM's verdict with its reason, and the
# exit status (0: the default backend can boot VMs from this state directory; 1: not).
# The initramfs is checked against the agent run.sh built it from ($AGENT), never against
# whatever a Debian package installed on this host ships.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
out=$("$BANDSOX" doctor --state-dir "$STATE" --agent "$AGENT") || fail "doctor says no VM can boot here: $out"
note "$out"
for check in kvm firecracker qemu fuse cgroup net=tap space guest; do
  echo "$out" | grep -Eq "^(ok  |warn|FAIL)  $check: " || fail "no $check line"
done
if ! grep -Eqw 'vmx|svm' /proc/cpuinfo || [ -e /sys/module/kvm_pvm ] || ! [ -e /dev/kvm ]; then
  # This machine's KVM cannot run guests: doctor must say so, and why.
  line=$(echo "$out" | grep '^warn  kvm: ')
  assert_contains "$line" "unusable" "kvm line"
  echo "$line" | grep -Eq "no vmx/svm flag|kvm_pvm|/dev/kvm unusable" || fail "no reason in: $line"
  echo "$out" | grep -A1 '^warn  kvm: ' | has 'fix: ' || fail "no fix for kvm"
fi
echo "$out" | has "^ok    guest: " || fail "guest artefacts not ok: $out"
echo "$out" | has "can boot VMs" || fail "no verdict"
empty=$(mktemp -d /var/tmp/bandsox-t64.XXXXXX)
out=$("$BANDSOX" doctor --state-dir "$empty" --agent "$AGENT") && fail "doctor passed with no guest artefacts"
assert_contains "$out" "FAIL  guest: missing" "empty state dir"
assert_contains "$out" "CANNOT boot a VM" "empty state dir"
rm -rf "$empty"
