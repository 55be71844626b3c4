#!/bin/bash
# Listings as two users: each lists only their own VMs (ls /mnt/bandsox) and snapshots
# (ls snapshots/), root lists all; right after one user's listing the other's still
# leaves it out (nothing cached across users). A known name still resolves for everyone
# (stat: owner, 0700), nothing inside it is readable, and taking it says EEXIST.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
A=1651; B=1652
asu() { _u=$1; shift; setpriv --reuid="$_u" --regid="$_u" --clear-groups bash -c "$1"; }
on_exit 'rmdir "$MNT/snapshots/s65a" "$MNT/e65a" "$MNT/e65b" 2>/dev/null || true'
asu $A "mkdir $MNT/e65a && echo 'snapshot s65a' > $MNT/e65a/ctl" || fail "user A: $(cat "$MNT/ctl")"
asu $B "mkdir $MNT/e65b" || fail "user B"
wait_for 60 test -d "$MNT/snapshots/s65a" || fail "snapshot s65a did not appear"

la=$(asu $A "ls -a $MNT"); lb=$(asu $B "ls -a $MNT"); lr=$(ls -a "$MNT")
note "A lists: $(echo "$la" | tr '\n' ' ')"
note "B lists: $(echo "$lb" | tr '\n' ' ')"
echo "$la" | has -x e65a || fail "A does not list A's VM"
echo "$la" | has -x e65b && fail "A lists B's VM"
echo "$lb" | has -x e65b || fail "B does not list B's VM"
echo "$lb" | has -x e65a && fail "B lists A's VM"
for n in README ctl defaults events usage images snapshots e65a e65b; do
  echo "$lr" | has -x "$n" || fail "root does not list $n: $lr"
done
for n in README ctl defaults events usage images snapshots; do
  echo "$lb" | has -x "$n" || fail "B does not list $n: $lb"
done
# Straight after A's listing (and A's lookups of its entries), B's still leaves A's out.
asu $A "ls -l $MNT >/dev/null"
asu $B "ls -l $MNT" | has e65a && fail "B lists A's VM after A's ls -l"
asu $B "find $MNT -maxdepth 1" | has e65a && fail "find as B lists A's VM"

sa=$(asu $A "ls $MNT/snapshots"); sb=$(asu $B "ls $MNT/snapshots"); sr=$(ls "$MNT/snapshots")
echo "$sa" | has -x s65a || fail "A does not list A's snapshot: $sa"
echo "$sb" | has -x s65a && fail "B lists A's snapshot"
echo "$sr" | has -x s65a || fail "root does not list A's snapshot: $sr"

# A known name: it resolves, shows its owner and 0700, and nothing inside.
assert_eq "$A 700" "$(asu $B "stat -c '%u %a' $MNT/e65a")" "B's stat of A's VM"
asu $B "ls $MNT/e65a" >/dev/null 2>&1 && fail "B listed inside A's VM"
asu $B "cat $MNT/snapshots/s65a/info" >/dev/null 2>&1 && fail "B read A's snapshot info"
err=$(asu $B "mkdir $MNT/e65a" 2>&1) && fail "B took A's name"
assert_contains "$err" "File exists" "B's mkdir of A's name"
asu $B "ls $MNT" | has -x e65a && fail "B's failed mkdir made A's VM listed"

rmdir "$MNT/snapshots/s65a"
asu $A "rmdir $MNT/e65a"; asu $B "rmdir $MNT/e65b"
