#!/bin/bash
# timeout: 600
# A daemon SIGKILLed in the middle of `clone S m count=2` never leaves a clone that runs
# with the snapshot's identity, nor a VMM nobody owns. The daemon is stopped at each named
# step of a clone (BANDSOX_TEST_PAUSE_AT, test only) and killed there; then killed after
# a few plain delays. After the restart each clone is either
# - `running` with its own hostname and the host's time (the identity step was done, or
#   the adoption finished it), or
# - `failed: <why>` with its half-restored VMM ended, and `start` boots it afresh.
# Last, a VM whose adoption fails (its QEMU stopped) keeps its VMM until `start` ends it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

echo 'create cs memory=128' > "$MNT/ctl" || fail "create cs: $(cat "$MNT/ctl")"
VMS="cs"
snap_at=$(date +%s)
echo 'snapshot csnap' > "$MNT/cs/ctl" || fail "snapshot: $(cat "$MNT/cs/ctl")"

# A daemon started with pause points must never outlive the test (nor stop the cleanup:
# removing a VM whose clone task is paused would wait for ever).
hooked=0
back_to_normal() {
  if [ "$hooked" = 1 ]; then crash_and_restart_daemon; hooked=0; fi
}
on_exit 'back_to_normal; cleanup_vms; rmdir "$MNT/snapshots/csnap" 2>/dev/null || true'

hook_lines() { grep -c "test hook: paused at $1" "$STATE/daemon.log" || true; }

# restart_paused_at POINT: the daemon again, now stopping clones at POINT.
restart_paused_at() {
  "$BANDSOX" unmount "$MNT" >/dev/null 2>&1 || true
  for _ in $(seq 1 50); do [ -z "$(daemon_pid)" ] && break; sleep 0.1; done
  env BANDSOX_TEST_PAUSE_AT="$1" BANDSOX_LOG=info \
    "$BANDSOX" mount "$MNT" --state-dir "$STATE" || fail "hooked daemon did not start"
  hooked=1
}

# A restored guest's clock lags by the snapshot's age unless the identity step set it:
# make that age large enough to see.
old_enough_snapshot() {
  age=$(( $(date +%s) - snap_at ))
  if [ "$age" -lt 30 ]; then sleep $(( 30 - age )); fi
}

# guest_ok VM: the clone runs as itself, with the host's time: its `date` falls between
# the host's before and after the exec, give or take a few seconds (an emulated guest's
# clock falls behind while a busy host starves its vCPU), while a clone that skipped its
# identity step lags by the snapshot's age (at least 30 s here).
guest_ok() {
  h0=$(date +%s)
  echo 'hostname; date +%s' > "$MNT/$1/exec" || fail "$1: exec: $(cat "$MNT/$1/ctl")"
  out=$(cat "$MNT/$1/exec"); h1=$(date +%s)
  assert_eq "$1" "$(echo "$out" | head -n1)" "$1's hostname"
  guest=$(echo "$out" | sed -n 2p)
  [ "$guest" -ge $(( h0 - 8 )) ] && [ "$guest" -le $(( h1 + 2 )) ] \
    || fail "$1's clock says $guest, the host's went from $h0 to $h1 (the snapshot is $(( h1 - snap_at )) s old)"
}

# failed_and_ended VM: `failed: <why>` naming the ended VMM, which is gone; then `start`
# boots it afresh (no leftover VMM in the way) as itself.
failed_and_ended() {
  st=$(cat "$MNT/$1/state")
  case $st in "failed: "?*) ;; *) fail "$1 is [$st], not failed with a reason";; esac
  pid=$(echo "$st" | sed -n 's/.*its VMM (pid \([0-9]*\)) was ended.*/\1/p')
  if [ -n "$pid" ]; then
    gone "$pid" || fail "$1's VMM $pid still runs: $(tr '\0' ' ' < "/proc/$pid/cmdline")"
  fi
  echo start > "$MNT/$1/ctl" || fail "start of the failed $1: $(cat "$MNT/$1/ctl")"
  assert_eq running "$(cat "$MNT/$1/state")" "$1 after start"
  echo hostname > "$MNT/$1/exec"
  assert_eq "$1" "$(cat "$MNT/$1/exec")" "$1's hostname after start"
}

# no_stray_vmm VM: no process but the VM's own recorded VMM names its directory.
no_stray_vmm() {
  id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/$1/info" | head -n1)
  own=$(cat "$STATE/vms/$id/vmm.pid" 2>/dev/null || true)
  for p in $(pgrep -f "$STATE/vms/$id/" || true); do
    [ "$p" = "$own" ] || fail "$1: process $p is not its VMM ($own): $(tr '\0' ' ' < "/proc/$p/cmdline")"
  done
}

# clone_killed_at POINT PREFIX: clone 2, kill the daemon once both reached POINT.
clone_killed_at() {
  point=$1 m=$2
  old_enough_snapshot
  restart_paused_at "$point"
  n=$(hook_lines "$point")
  ( echo "clone csnap $m count=2" > "$MNT/ctl" ) 2>/dev/null &
  w=$!
  VMS="$VMS $m-1 $m-2"
  wait_for 120 sh -c "[ \$(grep -c 'test hook: paused at $point' '$STATE/daemon.log') -ge $((n + 2)) ]" \
    || fail "$point: the clones never got there: $(tail -n 5 "$STATE/daemon.log")"
  note "$point: both clones stopped there; vm.json phases: $(cat "$STATE"/vms/*/vm.json | sed -n 's/.*"phase": *"\([a-z-]*\)".*/\1/p' | sort | uniq -c | tr '\n' ' ')"
  crash_and_restart_daemon
  hooked=0
  wait "$w" && fail "$point: the clone write succeeded although the daemon died"
  for v in "$m-1" "$m-2"; do note "$point: $v is [$(adopted "$v")]"; done
}

# 1. The VMMs run (QEMU with -incoming defer) but hold no guest yet: ended, failed.
clone_killed_at clone-vmm-started pv
for v in pv-1 pv-2; do
  assert_contains "$(cat "$MNT/$v/state")" "failed: the daemon restarted while it was being restored from its snapshot; its VMM (pid " "$v"
  failed_and_ended "$v"
  no_stray_vmm "$v"
done
grep " pv-1 failed " "$STATE/events.log" | has "being restored" || fail "no failed event for pv-1"

# 2. Restored, identity not yet taken: the adoption takes it.
clone_killed_at clone-restored pr
for v in pr-1 pr-2; do
  assert_eq running "$(cat "$MNT/$v/state")" "$v"
  guest_ok "$v"
  no_stray_vmm "$v"
done
grep " pr-1 adopted " "$STATE/events.log" | has "identity step was finished" \
  || fail "pr-1's adopted event does not say the identity step was finished"

# 3. Identity taken, `running` not yet recorded: the step is done again, harmlessly.
clone_killed_at clone-identity-set pi
for v in pi-1 pi-2; do
  assert_eq running "$(cat "$MNT/$v/state")" "$v"
  guest_ok "$v"
done
for v in pv-1 pv-2 pr-1 pr-2 pi-1 pi-2; do rmdir "$MNT/$v"; done
VMS="cs"

# 4. Plain delays (wherever the clone happens to be): either outcome, never a wrong one.
for delay in 0.2 0.4 0.7 1.2; do
  old_enough_snapshot
  m=d${delay/./}
  ( echo "clone csnap $m count=2" > "$MNT/ctl" ) 2>/dev/null &
  w=$!
  VMS="$VMS $m-1 $m-2"
  sleep "$delay"
  crash_and_restart_daemon
  wait "$w" || true
  # The running clones' clocks first: booting the others afresh loads the host.
  later=""
  for v in "$m-1" "$m-2"; do
    [ -d "$MNT/$v" ] || { note "kill after ${delay} s: $v was not created yet"; continue; }
    st=$(adopted "$v")
    note "kill after ${delay} s: $v is [$st]"
    case $st in
      running) guest_ok "$v" ;;
      "failed: "?*|stopped) later="$later $v" ;;
      *) fail "$v after the kill at ${delay} s: [$st]" ;;
    esac
  done
  for v in $later; do
    case $(cat "$MNT/$v/state") in
      stopped) echo start > "$MNT/$v/ctl" || fail "start of $v: $(cat "$MNT/$v/ctl")"; guest_ok "$v" ;;
      *) failed_and_ended "$v" ;;
    esac
  done
  for v in "$m-1" "$m-2"; do
    [ -d "$MNT/$v" ] || continue
    no_stray_vmm "$v"
    rmdir "$MNT/$v"
  done
  VMS="cs"
done

# 5. A VM whose adoption failed keeps its VMM (its guest may be busy, not gone), and
#    `start` ends that VMM before it boots (a second QEMU could not even take the pid
#    file). The guest is made silent by stopping its QEMU.
id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/cs/info" | head -n1)
qemu=$(cat "$STATE/vms/$id/vmm.pid")
kill -STOP "$qemu"
crash_and_restart_daemon
assert_eq adopting "$(cat "$MNT/cs/state")" "cs right after the restart"
st=$(adopted cs)
note "cs with a stopped QEMU: [$st]"
assert_contains "$st" "failed: adopted its VMM (pid $qemu) but the agent did not answer" "cs"
[ -e "/proc/$qemu" ] || fail "the failed adoption ended cs's VMM"
echo start > "$MNT/cs/ctl" || fail "start of cs with its VMM left over: $(cat "$MNT/cs/ctl")"
assert_eq running "$(cat "$MNT/cs/state")" "cs after start"
wait_for 5 gone "$qemu" || fail "cs's old QEMU $qemu survived the start"
grep " cs killed " "$STATE/events.log" | has "leftover VMM (pid $qemu)" || fail "no killed event for the leftover VMM"
echo hostname > "$MNT/cs/exec"
assert_eq cs "$(cat "$MNT/cs/exec")" "cs after start"
