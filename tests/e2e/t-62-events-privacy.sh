#!/bin/bash
# events as two users: each sees daemon-wide lines and their own VMs' lines, never the
# other's; root sees both; <vm>/events is the VM's own history, for its owner only.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
A=1611; B=1612
asu() { _u=$1; shift; setpriv --reuid="$_u" --regid="$_u" --clear-groups bash -c "$1"; }
on_exit 'rmdir "$MNT/e62a" "$MNT/e62b" 2>/dev/null || true'
asu $A "mkdir $MNT/e62a && echo pause > $MNT/e62a/ctl && echo resume > $MNT/e62a/ctl" || fail "user A"
asu $B "mkdir $MNT/e62b" || fail "user B"
ea=$(asu $A "cat $MNT/events"); eb=$(asu $B "cat $MNT/events"); er=$(cat "$MNT/events")
assert_contains "$ea" " e62a running " "A's events"
assert_contains "$ea" " e62a paused" "A's events"
assert_contains "$eb" " e62b running " "B's events"
# The VM name as an event's subject (a word), never a substring of, say, a digest.
case "$ea" in *" e62b "*) fail "user A sees B's VM: $(echo "$ea" | grep " e62b " | head -n 2)";; esac
case "$eb" in *" e62a "*) fail "user B sees A's VM: $(echo "$eb" | grep " e62a " | head -n 2)";; esac
assert_contains "$er" " e62a paused" "root's events"
assert_contains "$er" " e62b running " "root's events"
assert_contains "$ea" " - daemon-start" "A's events"
# tail -f as A follows A's new lines.
out=$(mktemp /var/tmp/bandsox-t62.XXXXXX); chown $A "$out"
asu $A "tail -s 0.2 -n 0 -f $MNT/events > $out & t=\$!; sleep 0.5; echo pause > $MNT/e62a/ctl; echo resume > $MNT/e62a/ctl; sleep 1; kill \$t"
asu $B "echo stop > $MNT/e62b/ctl"
grep -q " e62a resumed" "$out" || fail "tail -f events as A missed A's line: $(cat "$out")"
grep -q " e62b " "$out" && fail "tail -f events as A shows B's VM"
rm -f "$out"
# Per-VM events.
own=$(asu $A "cat $MNT/e62a/events")
assert_contains "$own" " e62a created " "e62a/events"
echo "$own" | has -v " e62a " && fail "e62a/events has other lines: $own"
asu $B "cat $MNT/e62a/events" >/dev/null 2>&1 && fail "B read A's VM events"
asu $A "rmdir $MNT/e62a"; asu $B "rmdir $MNT/e62b"
