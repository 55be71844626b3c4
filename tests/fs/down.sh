#!/bin/bash
# fs/ of a paused VM with autoresume=0 fails promptly with "Host is down" and works
# again after resume; killing the VMM during a read makes the read fail within seconds,
# leaving nothing hung, and the dead VM's fs/ then shows its disk, read-only.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
printf 'data\n' > "$FSDIR/x"
# autoresume=1 (the default) would resume it for the read: see t-38-lifecycle.
echo autoresume=0 > "$VMDIR/ctl"
echo pause > "$VMDIR/ctl"
t0=$(date +%s)
err=$(cat "$FSDIR/x" 2>&1) && fail "read of a paused VM's file succeeded"
case "$err" in *"Host is down"*) ;; *) fail "paused read error: $err" ;; esac
err=$(ls "$FSDIR/" 2>&1) && true
[ $(( $(date +%s) - t0 )) -le 3 ] || fail "paused operations took too long"
echo resume > "$VMDIR/ctl"
assert_eq data "$(cat "$FSDIR/x")" "read after resume"
# Kill the VMM during a long read.
t0=$(date +%s)
dd if=/dev/zero of="$FSDIR/long" bs=1M count="${KILL_MB:-128}" status=none || fail "write long file"
note "wrote ${KILL_MB:-128} MiB in $(( $(date +%s) - t0 )) s"
echo 1 > /proc/sys/vm/drop_caches
(rc=0; dd if="$FSDIR/long" of=/dev/null bs=64k iflag=direct status=none 2>"$WORK/dd.err" || rc=$?; echo "rc=$rc" > "$WORK/dd.rc") &
reader=$!
sleep 0.3
kill -9 "$(cat "$VMM_PID_FILE")"
t0=$(date +%s)
while kill -0 "$reader" 2>/dev/null; do
  [ $(( $(date +%s) - t0 )) -le 10 ] || fail "read still running 10 s after the VMM died"
  sleep 0.1
done
wait "$reader" || true
rc=$(cat "$WORK/dd.rc")
[ "$rc" != "rc=0" ] || note "the read finished before the VMM died (no error to see)"
# Only processes working on this mount count (other programs may be in D state on disk I/O).
dstate=$(ps -eo stat=,args= | awk -v d="$FSDIR" '$1 ~ /^D/ && index($0, d)' || true)
[ -z "$dstate" ] || fail "processes left in D state: $dstate"
# A dead VM is stopped, and its fs/ is then its disk, read-only (docs/tree.md).
wait_for 10 grep -Eq '^(stopped|failed)' "$VMDIR/state" || fail "state after the VMM died: $(cat "$VMDIR/state")"
disk="$(dirname "$VMM_PID_FILE")/disk.ext4"
if [ "$(od -An -tx1 -j1080 -N2 "$disk" 2>/dev/null | tr -d ' ')" = 53ef ]; then
  ls "$FSROOT/" | has '^root$' || fail "a dead VM's fs/ does not show its disk"
  err=$( { printf x > "$FSROOT/root/t-down-ro"; } 2>&1 ) && fail "a write to a dead VM's fs/ succeeded"
  case "$err" in *"Read-only file system"*) ;; *) fail "write to a dead VM's fs/: $err" ;; esac
else
  # The host test backend's disk holds no filesystem: fs/ says so (ENODATA).
  err=$(ls "$FSROOT/" 2>&1) && fail "fs/ of a dead VM whose disk holds no ext4 listed: $err"
  case "$err" in *"No data available"*) ;; *) fail "fs/ of a dead VM without ext4: $err" ;; esac
fi
note "paused: Host is down at once; VMM killed: read ended ($rc: $(cat "$WORK/dd.err")), nothing hung"
