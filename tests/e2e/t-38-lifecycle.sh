#!/bin/bash
# VM lifecycle on real VMs: destroy-all (one VM still booting; no VMM left behind),
# ttl (set through ctl, shown in info, kept across a daemon restart, then the VM is
# destroyed; with ttl_action=snapshot, snapshotted first), auto-resume of a paused VM by exec, fs/ and ctl, and idle_pause (never
# while a command runs). Events say why each pause and resume happened.
# timeout: 600
set -euo pipefail
. "$(dirname "$0")/lib.sh"

vmm_pids() {
  for p in "$STATE"/vms/*/vmm.pid; do
    [ -f "$p" ] || continue
    pid=$(cat "$p" 2>/dev/null) || continue
    if [ -e "/proc/$pid" ] && ! gone "$pid"; then echo "$pid"; fi
  done
}
id_of() { sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/$1/info" | head -n1; }
field() { sed -n "s/.*\"$2\": *\\([^,]*\\),*\$/\\1/p" "$MNT/$1/info" | head -n1; }

# --- destroy-all: two running VMs and one still booting --------------------------------
new_vm d1
new_vm d2
# Through ctl, not mkdir: a mkdir holds the root directory's lock until the boot ends, so
# nothing could look up ctl (or d3) meanwhile.
# In a session of its own, so its result does not replace destroy-all's in `cat ctl`.
setsid sh -c "echo 'create d3' > '$MNT/ctl'" 2>/dev/null &
booting=$!
VMS="${VMS:-} d3"
wait_for 30 sh -c "[ \"\$(cat '$MNT/d3/state' 2>/dev/null)\" = booting ]" \
  || note "d3 was never seen booting (state: $(cat "$MNT/d3/state" 2>/dev/null || echo '?'))"
note "d3 is $(cat "$MNT/d3/state" 2>/dev/null || echo '?') when destroy-all starts"
echo destroy-all > "$MNT/ctl"
assert_eq "ok: destroyed 3 of your VMs" "$(cat "$MNT/ctl")" "destroy-all result"
wait "$booting" || true
for v in d1 d2 d3; do [ ! -e "$MNT/$v" ] || fail "$v still exists after destroy-all"; done
within 5 sh -c "[ -z \"\$(ls '$STATE/vms')\" ]" || fail "VM directories left: $(ls "$STATE/vms")"
[ -z "$(vmm_pids)" ] || fail "VMM processes left after destroy-all: $(vmm_pids)"
grep -q "destroy-all removed=3 failed=0" "$MNT/events" || fail "no destroy-all event"
write_expect_error "$MNT/ctl" "destroy-all everyone" "Invalid argument"
assert_contains "$(cat "$MNT/ctl")" "accepted: destroy-all [all-users]" "ctl after a bad destroy-all"

# --- ttl --------------------------------------------------------------------------------
write_expect_error "$MNT/ctl" "create tbad ttl=0" "Invalid argument"
assert_contains "$(cat "$MNT/ctl")" "ttl=0: out of range" "ctl after ttl=0"
write_expect_error "$MNT/ctl" "create tbad ttl=soon" "Invalid argument"
[ ! -e "$MNT/tbad" ] || fail "a refused create left a VM"
new_vm tt
write_expect_error "$MNT/tt/ctl" "ttl=-1" "Invalid argument"
echo ttl=8 > "$MNT/tt/ctl"
left=$(field tt ttl_remaining_s)
note "ttl_remaining_s=$left"
[ "$left" -ge 1 ] && [ "$left" -le 8 ] || fail "ttl_remaining_s=$left, expected 1..8"
tt_id=$(id_of tt)
grep -q '"ttl_deadline"' "$STATE/vms/$tt_id/vm.json" || fail "the deadline is not in vm.json"
tt_pid=$(cat "$STATE/vms/$tt_id/vmm.pid")
crash_and_restart_daemon
wait_for 60 sh -c "[ ! -e '$MNT/tt' ]" || fail "tt outlived its ttl across a restart"
within 10 gone "$tt_pid" || fail "tt's VMM $tt_pid is still running"
grep -q " tt ttl-expired action=destroy" "$MNT/events" || fail "no ttl-expired event"
# ttl_action=snapshot: the VM is snapshotted (a paused one resumed for it), then removed.
new_vm ts
on_exit 'for s in "$MNT"/snapshots/ts-ttl-*; do [ -d "$s" ] && rmdir "$s"; done'
echo ttl_action=snapshot > "$MNT/ts/ctl"
echo pause > "$MNT/ts/ctl"
echo ttl=2 > "$MNT/ts/ctl"
wait_for 60 sh -c "[ ! -e '$MNT/ts' ]" || fail "ts outlived its ttl"
snap=
for s in "$MNT"/snapshots/ts-ttl-*; do [ -d "$s" ] && snap=$(basename "$s"); done
[ -n "$snap" ] || fail "no ts-ttl-* snapshot: $(ls "$MNT/snapshots")"
grep -q " ts resumed reason=ttl" "$MNT/events" || fail "no 'resumed reason=ttl' event"
grep -q " ts ttl-expired action=snapshot snapshot=$snap" "$MNT/events" \
  || fail "no ttl-expired snapshot event"

# --- auto-resume --------------------------------------------------------------------------
new_vm ar
echo 'echo fsdata > /root/lc' > "$MNT/ar/exec"
echo pause > "$MNT/ar/ctl"
assert_eq paused "$(cat "$MNT/ar/state")" "state after pause"
echo 'echo woke' > "$MNT/ar/exec"
assert_eq woke "$(cat "$MNT/ar/exec")" "exec on a paused VM (autoresume=1)"
assert_eq running "$(cat "$MNT/ar/state")" "state after an exec woke it"
grep -q " ar resumed reason=exec" "$MNT/events" || fail "no 'resumed reason=exec' event"
echo pause > "$MNT/ar/ctl"
got=$(cat "$MNT/ar/fs/root/lc") || fail "fs/ read of a paused VM failed"
assert_eq fsdata "$got" "a file read through fs/ of a paused VM"
assert_eq running "$(cat "$MNT/ar/state")" "state after fs/ woke it"
grep -q " ar resumed reason=fs" "$MNT/events" || fail "no 'resumed reason=fs' event"
echo pause > "$MNT/ar/ctl"
echo ping > "$MNT/ar/ctl"
assert_contains "$(cat "$MNT/ar/ctl")" "ok: ping" "ping on a paused VM"
grep -q " ar resumed reason=ctl" "$MNT/events" || fail "no 'resumed reason=ctl' event"
grep -q " ar paused reason=ctl" "$MNT/events" || fail "no 'paused reason=ctl' event"

# --- idle_pause ---------------------------------------------------------------------------
# A command that runs for longer than idle_pause keeps the VM running.
( echo 'sleep 6' > "$MNT/ar/exec" ) &
runner=$!
wait_for 20 sh -c "[ \"\$(cat '$MNT/ar/runs/last/status' 2>/dev/null)\" = running ]" \
  || fail "the sleep never ran"
echo idle_pause=1 > "$MNT/ar/ctl"
sleep 3
assert_eq running "$(cat "$MNT/ar/state")" "state with a live run past idle_pause"
wait "$runner" || fail "the sleep failed"
wait_for 20 sh -c "[ \"\$(cat '$MNT/ar/state')\" = paused ]" || fail "ar was never paused when idle"
grep -q " ar paused reason=idle" "$MNT/events" || fail "no 'paused reason=idle' event"
assert_eq 1 "$(field ar idle_pause_s)" "idle_pause_s in info"
# autoresume=0: a paused VM stays paused, and its fs/ says Host is down.
echo autoresume=0 > "$MNT/ar/ctl"
err=$(cat "$MNT/ar/fs/root/lc" 2>&1) && fail "fs/ of a paused VM with autoresume=0 worked"
assert_contains "$err" "Host is down" "fs/ with autoresume=0"
assert_eq paused "$(cat "$MNT/ar/state")" "state with autoresume=0"
note "destroy-all, ttl across a restart, auto-resume (exec, fs/, ctl), idle_pause: ok"

# --- destroy-all as users -------------------------------------------------------------------
A=1638; B=1639
asu() { _u=$1; shift; setpriv --reuid="$_u" --regid="$_u" --clear-groups bash -c "$1"; }
on_exit 'rmdir "$MNT/u38a" "$MNT/u38b" 2>/dev/null || true'
asu $A "mkdir $MNT/u38a" || fail "user A's mkdir"
asu $B "mkdir $MNT/u38b" || fail "user B's mkdir"
err=$(asu $A "echo 'destroy-all all-users' > $MNT/ctl" 2>&1) && fail "A's destroy-all all-users worked"
assert_contains "$err" "Operation not permitted" "A's destroy-all all-users"
assert_eq "ok: destroyed 1 of your VMs" "$(asu $A "echo destroy-all > $MNT/ctl; cat $MNT/ctl")" \
  "A's destroy-all"
[ ! -e "$MNT/u38a" ] || fail "u38a survived A's destroy-all"
[ -d "$MNT/u38b" ] || fail "A's destroy-all removed B's VM"
# Root's: ar (root's own, still paused) and B's u38b.
echo 'destroy-all all-users' > "$MNT/ctl"
assert_eq "ok: destroyed 2 of all users' VMs" "$(cat "$MNT/ctl")" "root's destroy-all all-users"
[ -z "$(vmm_pids)" ] || fail "VMM processes left: $(vmm_pids)"
note "destroy-all as users: EPERM for all-users, only the caller's VMs, root's all-users: ok"
