#!/bin/bash
# Story 9: rmdir stops and deletes the VM and all its files; the refused mkdir and
# rmdir inside it show in `cat ctl`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mkdir "$MNT/s9"
id=$(sed -n 's/.*"id": "\(.*\)".*/\1/p' "$MNT/s9/info")
[ -n "$id" ] || fail "no id in info"
[ -d "$STATE/vms/$id" ] || fail "no state dir for the VM"
pid=$(sed -n 's/.*"vmm_pid": \([0-9]*\).*/\1/p' "$MNT/s9/info")
echo 'echo hi' > "$MNT/s9/exec"
# Refusals the daemon makes land in `cat ctl` (this script's session), like failures.
mkdir "$MNT/s9/x" 2>/dev/null && fail "mkdir inside a VM succeeded"
assert_contains "$(cat "$MNT/ctl")" "error: mkdir x: only VMs are made with mkdir" "ctl after mkdir"
rmdir "$MNT/s9/runs/1" 2>/dev/null && fail "rmdir of a run succeeded"
assert_contains "$(cat "$MNT/ctl")" "error: rmdir 1: runs cannot be removed" "ctl after rmdir"
rmdir "$MNT/s9"
[ ! -e "$MNT/s9" ] || fail "s9 still listed"
[ ! -e "$STATE/vms/$id" ] || fail "state dir left behind: $(ls -la "$STATE/vms/$id")"
[ -z "$(ls -A "$STATE/vms")" ] || fail "state dir not empty: $(ls -A "$STATE/vms")"
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then fail "VMM $pid still running"; fi
if grep -q "s9" /dev/null; then :; fi
