#!/bin/bash
# 10 clones of one snapshot at once: all reach `running`, each answers on its own socket,
# and nothing is left in the state directory after rmdir of all of them and the snapshot.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
echo 'create st memory=128' > "$MNT/ctl" || fail "create st: $(cat "$MNT/ctl")"
VMS="st"; on_exit 'cleanup_vms; rmdir "$MNT/snapshots/snapt" 2>/dev/null || true'
before=$(ls "$STATE/vms" | sort)
echo 'snapshot snapt' > "$MNT/st/ctl" || fail "snapshot: $(cat "$MNT/st/ctl")"
start=$(date +%s)
( echo 'clone snapt t count=10' > "$MNT/ctl" || echo "clone: $(cat "$MNT/ctl")" > "$STATE/../clone-t.err" ) &
clone_pid=$!
# While clones restore from it, the snapshot cannot be removed.
sleep 0.7
err=$(rmdir "$MNT/snapshots/snapt" 2>&1) && fail "rmdir of a snapshot being restored from succeeded"
assert_contains "$err" "Device or resource busy" "rmdir during clone"
wait "$clone_pid"
[ ! -e "$STATE/../clone-t.err" ] || fail "$(cat "$STATE/../clone-t.err")"
note "clone of 10: $(( $(date +%s) - start ))s"
for i in 1 2 3 4 5 6 7 8 9 10; do VMS="$VMS t-$i"; done
for i in 1 2 3 4 5 6 7 8 9 10; do
  assert_eq running "$(cat "$MNT/t-$i/state")" "t-$i state"
  echo 'hostname' > "$MNT/t-$i/exec" || fail "exec in t-$i"
  assert_eq "t-$i" "$(cat "$MNT/t-$i/exec")" "t-$i answers as itself"
done
# Ten distinct VM directories, sockets included.
socks=$(for i in 1 2 3 4 5 6 7 8 9 10; do
  id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/t-$i/info" | head -n1)
  [ -S "$STATE/vms/$id/agent.sock" ] || fail "t-$i has no agent socket"
  echo "$id"; done | sort -u | wc -l)
assert_eq 10 "$socks" "distinct VM directories"
# rmdir while clones run is allowed; rmdir during a clone is covered by the EBUSY check.
for i in 1 2 3 4 5 6 7 8 9 10; do rmdir "$MNT/t-$i" || fail "rmdir t-$i"; done
rmdir "$MNT/snapshots/snapt" || fail "rmdir snapshot"
assert_eq "$before" "$(ls "$STATE/vms" | sort)" "VM directories after rmdir"
[ -z "$(ls -A "$STATE/snapshots")" ] || fail "left in snapshots/: $(ls -A "$STATE/snapshots")"
