#!/bin/bash
# timeout: 420
# A daemon killed with SIGKILL in the middle of mkdir, rmdir, an exec and a 100 MB write
# to fs/ never wedges the mount: within 5 s nobody is in D state (callers got ENOTCONN /
# ECONNABORTED), the daemon is gone, a new `bandsox mount` on the dead mount point comes
# up by itself and re-adopts every VM within 30 s.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# Last resort, so a failure here never leaves processes stuck for the next tests: abort
# whatever FUSE connection is mounted at $MNT (what the watchdog should have done).
rescue() {
  grep -q fusectl /proc/self/mounts || mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
  dev=$(awk -v m="$MNT" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n1)
  if [ -n "$dev" ]; then
    echo 1 > "/sys/fs/fuse/connections/${dev#0:}/abort" 2>/dev/null || true
  fi
}
# Armed by the first VM until the kills are over (rescue_armed=0 below); lib.sh's
# cleanup_vms runs after it.
rescue_armed=0
on_exit '[ "$rescue_armed" = 1 ] && rescue'
vm() { new_vm "$1"; rescue_armed=1; }

# d_state PID...: print the pids (and daemon threads) among PID... that are in D state.
d_state() {
  for p in "$@"; do
    for t in /proc/"$p"/task/*; do
      [ -r "$t/stat" ] || continue
      s=$(sed 's/.*) //' "$t/stat" | cut -d' ' -f1)
      [ "$s" = D ] && echo "${t#/proc/}"
    done
  done
  true
}

vm_id() { sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/$1/info" | head -n1; }

# killed_during WHAT OP_PID: kill the daemon now; check what the issue promises.
killed_during() {
  what=$1 op=$2
  old=$(daemon_pid); [ -n "$old" ] || fail "$what: no daemon"
  kill -9 "$old"
  t0=$(date +%s%N)
  sleep 5
  stuck=$(d_state "$op" "$old")
  [ -z "$stuck" ] || fail "$what: in D state 5 s after the daemon was killed: $stuck ($(cat "/proc/$op/wchan" 2>/dev/null))"
  gone "$old" || fail "$what: the killed daemon is still there: $(grep State "/proc/$old/status")"
  gone "$op" || fail "$what: the caller (pid $op) is still blocked: $(grep State "/proc/$op/status" 2>/dev/null)"
  rc=0; wait "$op" 2>/dev/null || rc=$?
  note "$what: caller exited with $rc; $(tail -n 3 "$out" | tr '\n' ' ')"
  # The dead mount answers ENOTCONN at once, never blocks.
  lrc=0; err=$(timeout 5 ls "$MNT" 2>&1) || lrc=$?
  [ $lrc -ne 0 ] || fail "$what: ls of the dead mount succeeded"
  [ $lrc -ne 124 ] || fail "$what: ls of the dead mount blocked"
  note "$what: ls says: $err"
  # A new mount cleans up and re-adopts.
  timeout 30 "$BANDSOX" mount "$MNT" --state-dir "$STATE" || fail "$what: remount failed"
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  local n=0 v
  for v in "$MNT"/*/; do
    v=$(basename "$v"); case $v in images|snapshots) continue;; esac
    wait_for 30 state_is "$v" running || fail "$what: VM $v is $(cat "$MNT/$v/state") after the restart"
    n=$((n + 1))
  done
  note "$what: remounted and re-adopted $n VMs ${ms} ms after the kill"
}

out=$(mktemp /var/tmp/bsx-t50.XXXXXX)
vm k1

# 1. During mkdir (the VM is booting; the kernel holds the root directory's lock).
n=$(grep -c ' km booting' "$STATE/events.log" || true)
mkdir "$MNT/km" > "$out" 2>&1 &
op=$!
VMS="$VMS km"
wait_for 20 sh -c "[ \$(grep -c ' km booting' '$STATE/events.log') -gt $n ]" || fail "km never started booting"
sleep 0.3
killed_during mkdir "$op"
[ -d "$MNT/km" ] || fail "km is gone after the restart"
echo 'echo km-ok' > "$MNT/km/exec"
assert_eq km-ok "$(cat "$MNT/km/exec")" "exec in the VM whose mkdir was interrupted"

# 2. During rmdir.
vm kr
rmdir "$MNT/kr" > "$out" 2>&1 &
op=$!
sleep 0.05
killed_during rmdir "$op"

# 3. During an exec (a write-only exec's close waits for the command).
echo 'sleep 60' > "$MNT/k1/exec" 2> "$out" &
op=$!
id=$(vm_id k1)
wait_for 10 sh -c "ls '$STATE/vms/$id/runs/'*/pid >/dev/null 2>&1 && grep -q running \$(ls -d '$STATE/vms/$id/runs/'* | sort -V | tail -n1)/status" || fail "sleep never started"
killed_during exec "$op"
echo 'echo still-here' > "$MNT/k1/exec"
assert_eq still-here "$(cat "$MNT/k1/exec")" "exec after the restart"

# 4. During a 100 MB write into fs/.
dd if=/dev/zero of="$MNT/k1/fs/root/big" bs=1M count=100 status=none > "$out" 2>&1 &
op=$!
sleep 1.5
kill -0 "$op" 2>/dev/null || note "dd already finished before the kill"
killed_during "100 MB write" "$op"
echo 'ls /root' > "$MNT/k1/exec"
note "after the write: $(tr '\n' ' ' < "$MNT/k1/exec")"
rm -f "$out"
# shellcheck disable=SC2034 # read by the on_exit entry above
rescue_armed=0
