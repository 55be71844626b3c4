#!/bin/bash
# timeout: 600
# Warm pools: root configures a pool of 2 in `pools`; `mkdir` with no options (the
# defaults' machine) takes a pooled clone, which becomes a new machine (hostname, machine
# id, entropy, clock); `cat pools` counts the hits and the refill brings ready back to 2;
# a VM of another machine misses no pool and boots cold; an empty `pools` ends the clones.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
pools=$MNT/pools
on_exit ': > "$MNT/pools" 2>/dev/null || true; cleanup_vms'
line="image=base vcpus=1 memory=256 backend=$BACKEND size=2"
assert_eq "" "$(cat "$pools")" "no pools at first"
# Bad lines change nothing.
write_expect_error "$pools" "image=base size=0" "Invalid argument"
write_expect_error "$pools" "image=base keep_runs=3 size=1" "Invalid argument"
write_expect_error "$pools" "image=no-such-image size=1" "No such file"
assert_eq "" "$(cat "$pools")" "no pools after bad writes"

echo "$line" > "$pools" || fail "configuring the pool failed"
assert_contains "$(cat "$pools")" "$line ready="
wait_for 300 sh -c "grep -q ' ready=2 ' '$pools'" \
  || fail "the pool never got 2 clones ready: $(cat "$pools"); $(grep pools/ "$MNT/events" | tail -n 5)"
note "$(cat "$pools")"
key=""
for d in "$STATE"/pools/*/; do key=$(basename "$d"); done
[ -f "$STATE/pools/$key/template.json" ] || fail "no template.json under $STATE/pools/$key"
tpl_disk=$STATE/pools/$key/template/disk.ext4
tpl_id=$(debugfs -R 'cat /etc/machine-id' "$tpl_disk" 2>/dev/null | head -n1)
# The template's state holds device state only: its RAM is the `memory` file.
state_bytes=$(stat -c %s "$STATE/pools/$key/template/state")
[ "$state_bytes" -lt 16000000 ] || fail "the template's state is $state_bytes bytes: RAM was not left out"
[ -f "$STATE/pools/$key/template/memory" ] || fail "the template has no memory file"
pooled_dirs() { grep -l . "$STATE"/vms/*/pool.json 2>/dev/null | wc -l; }
assert_eq 2 "$(pooled_dirs)" "pooled clone directories"
# Nothing of a pooled clone is listed.
! ls "$MNT" | has '^pool-' || fail "a pooled clone is listed: $(ls "$MNT")"

t0=$(date +%s%N)
new_vm pa
t1=$(date +%s%N)
new_vm pb
note "pooled mkdir: $(( (t1 - t0) / 1000000 )) ms"
assert_contains "$(cat "$pools")" " hits=2 misses=0 "
grep ' pa created ' "$MNT/events" | has 'from pool' || fail "pa was not taken from the pool: $(grep ' pa ' "$MNT/events")"
for v in pa pb; do
  assert_eq running "$(cat "$MNT/$v/state")" "$v state"
  echo 'hostname' > "$MNT/$v/exec" || fail "exec in $v"
  assert_eq "$v" "$(cat "$MNT/$v/exec")" "$v hostname"
  echo 'date +%s' > "$MNT/$v/exec"
  guest=$(cat "$MNT/$v/exec"); host=$(date +%s)
  skew=$(( host - guest )); [ "$skew" -ge 0 ] || skew=$(( -skew ))
  [ "$skew" -le 1 ] || fail "$v's clock is ${skew} s off the host's"
done
# The agent rewrites /etc/machine-id where the image has one (as for any clone).
if [ -n "$tpl_id" ]; then
  id_a=$(cat "$MNT/pa/fs/etc/machine-id"); id_b=$(cat "$MNT/pb/fs/etc/machine-id")
  [ -n "$id_a" ] && [ "$id_a" != "$id_b" ] || fail "machine-ids: pa=$id_a pb=$id_b"
  [ "$id_a" != "$tpl_id" ] && [ "$id_b" != "$tpl_id" ] || fail "a hand-out kept the template's machine-id $tpl_id"
else
  note "the base image has no /etc/machine-id: nothing to compare"
  [ ! -e "$MNT/pa/fs/etc/machine-id" ] || fail "pa has a machine-id its template lacks"
fi
rnd='head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n"'
printf '%s\n' "$rnd" > "$MNT/pa/exec"; ra=$(cat "$MNT/pa/exec")
printf '%s\n' "$rnd" > "$MNT/pb/exec"; rb=$(cat "$MNT/pb/exec")
[ "${#ra}" -eq 64 ] && [ "$ra" != "$rb" ] || fail "urandom: pa=$ra pb=$rb"
# Files the VM's owner makes (root here, as for a cold boot).
echo 'touch /root/mine' > "$MNT/pa/exec"
assert_eq "0 0" "$(stat -c '%u %g' "$MNT/pa/fs/root/mine")" "owner of a file made in the clone"

# Refill brings ready back to 2.
wait_for 300 sh -c "grep -q ' ready=2 ' '$pools'" || fail "no refill to 2: $(cat "$pools")"
note "$(cat "$pools")"

# Another machine matches no pool: a cold boot, no error, hits and misses unchanged.
echo 'create pc memory=128' > "$MNT/ctl" || fail "create pc: $(cat "$MNT/ctl")"
VMS="$VMS pc"
grep ' pc created ' "$MNT/events" | has -v 'from pool' || fail "pc came from a pool"
assert_contains "$(cat "$pools")" " hits=2 misses=0 "

# A handed-out VM snapshots and clones like any VM (its RAM is a private mapping, so the
# snapshot carries all of it; the clone gets anonymous memory).
on_exit 'rmdir "$MNT/snapshots/pas" 2>/dev/null || true'
echo 'echo from-pa > /root/mark' > "$MNT/pa/exec"
echo 'snapshot pas' > "$MNT/pa/ctl" || fail "snapshot of pa: $(cat "$MNT/pa/ctl")"
[ "$(stat -c %s "$STATE/snapshots/pas/state")" -gt 1000000 ] || fail "pas's state holds no RAM"
echo 'clone pas pd' > "$MNT/ctl" || fail "clone pas: $(cat "$MNT/ctl")"
VMS="$VMS pd"
echo 'cat /root/mark; hostname' > "$MNT/pd/exec"
assert_eq "from-pa
pd" "$(cat "$MNT/pd/exec")" "clone of a handed-out VM"
rmdir "$MNT/pd"; rmdir "$MNT/snapshots/pas"

# Empty pools: the pools and their clones go; handed-out VMs stay.
: > "$pools"
assert_eq "" "$(cat "$pools")" "pools after emptying"
wait_for 60 sh -c "[ \"\$(grep -l . '$STATE'/vms/*/pool.json 2>/dev/null | wc -l)\" = 0 ]" \
  || fail "pooled clones left: $(ls "$STATE"/vms/*/pool.json 2>/dev/null)"
echo 'echo still' > "$MNT/pa/exec"
assert_eq still "$(cat "$MNT/pa/exec")" "a handed-out VM after the pool's removal"
