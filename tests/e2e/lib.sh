#!/bin/bash
# Shared helpers for the end-to-end tests, sourced by every t-*.sh (run with bash: dash
# reports every failed write as "I/O error", hiding the errno). Assertions, polling and
# chained cleanups (`on_exit`) come from tests/testlib.sh.
# Environment (set by run.sh): MNT (mount point), STATE (state directory), BANDSOX (binary),
# AGENT (the static agent in STATE's initramfs).
# shellcheck source=SCRIPTDIR/../testlib.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"

state_is() { [ "$(cat "$MNT/$1/state")" = "$2" ]; }

# A fresh VM for this test, removed on exit (every name in VMS is: see cleanup_vms).
new_vm() {
  mkdir "$MNT/$1" || fail "mkdir $1 failed: $(cat "$MNT/$1/state" 2>/dev/null || true)"
  VMS="${VMS:-} $1"
}

# Remove the VMs named in VMS (registered with on_exit below: add a name to VMS to have
# its VM removed when the test ends).
cleanup_vms() {
  for v in ${VMS:-}; do
    if [ -d "$MNT/$v" ]; then rmdir "$MNT/$v" 2>/dev/null || true; fi
  done
}
on_exit cleanup_vms

# write_expect_error FILE TEXT ERRNO_TEXT: a write must fail with that message.
write_expect_error() {
  _err=$( { printf '%s\n' "$2" > "$1"; } 2>&1 ) && fail "write of [$2] to $1 succeeded"
  assert_contains "$_err" "$3" "error of writing [$2] to $1"
}

daemon_pid() {
  pgrep -f "bandsox mount $MNT" | head -n1
}

# crash_and_restart_daemon: SIGKILL the daemon and mount again on the same state
# directory (the daemon adopts the running VMs).
crash_and_restart_daemon() {
  _pid=$(daemon_pid); [ -n "$_pid" ] || fail "no daemon"
  kill -9 "$_pid"
  sleep 0.5
  "$BANDSOX" mount "$MNT" --state-dir "$STATE" || fail "restart failed"
}

# adopted VM: after a daemon restart, wait until VM (a name under $MNT, or a VM
# directory's path) is no longer `adopting` (adoption runs in the background; requests
# for the VM wait for it by themselves) and print its state.
adopted() {
  case $1 in */*) _vd=$1 ;; *) _vd=$MNT/$1 ;; esac
  wait_for 40 sh -c "[ \"\$(cat '$_vd/state')\" != adopting ]" \
    || fail "$1 is still adopting 40 s after the restart"
  cat "$_vd/state"
}

# gone PID: the process has exited (a zombie counts as exited).
gone() { ! [ -e "/proc/$1" ] || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# fs_scenario NAME VM: run tests/fs/NAME.sh against VM's fs/ (a fresh /root/t-NAME).
# Extra settings pass through the environment (e.g. BIG_MB=256).
fs_scenario() {
  _name=$1 _vm=$2
  _id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/$_vm/info" | head -n1)
  [ -n "$_id" ] || fail "no id in $_vm/info"
  mkdir "$MNT/$_vm/fs/root/t-$_name" || fail "mkdir in fs/ failed"
  _work=$(mktemp -d /var/tmp/bandsox-fs-work.XXXXXX)
  FSDIR="$MNT/$_vm/fs/root/t-$_name" FSROOT="$MNT/$_vm/fs" GREL="/root/t-$_name" \
    VMDIR="$MNT/$_vm" WORK="$_work" VMM_PID_FILE="$STATE/vms/$_id/vmm.pid" \
    bash "$(dirname "${BASH_SOURCE[0]}")/../fs/$_name.sh"
  _rc=$?
  rm -rf "$_work"
  return $_rc
}
