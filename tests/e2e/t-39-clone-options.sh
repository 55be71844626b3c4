#!/bin/bash
# kernel= per VM (create and clone) from the kernels installed under the state's boot/,
# and `clone … net=`: a clone may keep or switch its networked mode but never add or
# remove the network; unknown kernels and impossible network changes are EINVAL and
# leave nothing behind.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
# A second kernel: a copy of the default one under its own name.
cp --reflink=auto "$STATE/boot/vmlinuz" "$STATE/boot/vmlinuz-alt"
cp --reflink=auto "$STATE/boot/initrd" "$STATE/boot/initrd-alt"
on_exit 'rm -f "$STATE/boot/vmlinuz-alt" "$STATE/boot/initrd-alt"'
on_exit 'rmdir "$MNT/snapshots/s39" 2>/dev/null || true'

write_expect_error "$MNT/ctl" "create k39x kernel=nope" "Invalid argument"
assert_contains "$(cat "$MNT/ctl")" "kernel=nope: not installed" "ctl after kernel=nope"
assert_contains "$(cat "$MNT/ctl")" "installed: default, alt" "installed kernels listed"
[ ! -e "$MNT/k39x" ] || fail "a refused create left a VM"

echo 'create k39 kernel=alt net=user' > "$MNT/ctl" || fail "create k39: $(cat "$MNT/ctl")"
VMS="k39"
assert_contains "$(cat "$MNT/k39/info")" '"kernel": "alt"' "info of k39"
pid=$(sed -n 's/.*"vmm_pid": *\([0-9]*\).*/\1/p' "$MNT/k39/info")
tr '\0' ' ' < "/proc/$pid/cmdline" | has -F "boot/vmlinuz-alt" \
  || fail "k39's VMM does not boot vmlinuz-alt: $(tr '\0' ' ' < "/proc/$pid/cmdline")"
echo 'echo up' > "$MNT/k39/exec"
assert_eq up "$(cat "$MNT/k39/exec")" "exec in k39"

echo 'snapshot s39' > "$MNT/k39/ctl" || fail "snapshot: $(cat "$MNT/k39/ctl")"
write_expect_error "$MNT/ctl" "clone s39 c39 net=none" "Invalid argument"
assert_contains "$(cat "$MNT/ctl")" "may switch between user and tap" "ctl after net=none"
write_expect_error "$MNT/ctl" "clone s39 c39 kernel=nope" "Invalid argument"
write_expect_error "$MNT/ctl" "clone s39 c39 net=wifi" "Invalid argument"
[ ! -e "$MNT/c39" ] || fail "a refused clone left a VM"

echo 'clone s39 c39 net=user kernel=alt' > "$MNT/ctl" || fail "clone: $(cat "$MNT/ctl")"
VMS="$VMS c39"
assert_contains "$(cat "$MNT/c39/info")" '"kernel": "alt"' "info of c39"
assert_contains "$(cat "$MNT/c39/info")" '"net": "user"' "info of c39"
echo 'hostname; ip -4 addr show eth0 | grep -c "inet "' > "$MNT/c39/exec"
assert_eq "c39
1" "$(cat "$MNT/c39/exec")" "clone's hostname and one IPv4 address"
note "kernel=alt booted and cloned; clone net= checks: ok"
