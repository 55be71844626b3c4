#!/bin/bash
# A clone restored some time after its snapshot wakes up with the host's time, not the
# snapshot's: the restore step sets the guest's wall clock.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
echo 'create ck memory=128' > "$MNT/ctl" || fail "create ck: $(cat "$MNT/ctl")"
VMS="ck"; on_exit 'rmdir "$MNT/snapshots/cks" 2>/dev/null; cleanup_vms'
echo 'snapshot cks' > "$MNT/ck/ctl" || fail "snapshot: $(cat "$MNT/ck/ctl")"
rmdir "$MNT/ck"; VMS=""
sleep 25
echo 'clone cks ck2' > "$MNT/ctl" || fail "clone: $(cat "$MNT/ctl")"
VMS="ck2"
echo 'date +%s' > "$MNT/ck2/exec"
guest=$(cat "$MNT/ck2/exec"); host=$(date +%s)
skew=$(( host - guest )); [ "$skew" -ge 0 ] || skew=$(( -skew ))
note "host $host, clone $guest: ${skew} s apart (the snapshot is 25 s old)"
[ "$skew" -le 3 ] || fail "the clone's clock is ${skew} s off"
sleep 2
echo 'date +%s' > "$MNT/ck2/exec"
guest=$(cat "$MNT/ck2/exec"); host=$(date +%s)
skew=$(( host - guest )); [ "$skew" -ge 0 ] || skew=$(( -skew ))
[ "$skew" -le 3 ] || fail "the clone's clock drifted to ${skew} s off"
