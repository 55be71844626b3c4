#!/bin/bash
# Story 6: processes started before the snapshot (`sleep 10000 &` and a counter writing a
# file every 100 ms) are alive in each of 3 clones, and the counters diverge from there.
# Each clone has its own hostname and its own entropy.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
echo 'create s6 memory=128' > "$MNT/ctl" || fail "create s6: $(cat "$MNT/ctl")"
VMS="s6"; on_exit 'cleanup_vms; rmdir "$MNT/snapshots/snap6" 2>/dev/null || true'
# Written to a temporary name and renamed, so a reader never sees a half-written file.
printf 'i=0\nwhile true; do i=$((i+1)); echo $i > /root/counter.new; mv /root/counter.new /root/counter; sleep 0.1; done\n' > "$MNT/s6/fs/root/count.sh"
echo 'sleep 10000 >/dev/null 2>&1 &
sh /root/count.sh >/dev/null 2>&1 &
echo started' > "$MNT/s6/exec"
assert_eq started "$(cat "$MNT/s6/exec")" "background start"
wait_for 10 test -s "$MNT/s6/fs/root/counter" || fail "the counter does not run in the source"

echo 'snapshot snap6' > "$MNT/s6/ctl" || fail "snapshot: $(cat "$MNT/s6/ctl")"
echo 'clone snap6 b6 count=3' > "$MNT/ctl" || fail "clone: $(cat "$MNT/ctl")"
VMS="$VMS b6-1 b6-2 b6-3"
note "$(cat "$MNT/ctl")"

counter() { echo 'cat /root/counter' > "$MNT/$1/exec" && cat "$MNT/$1/exec"; }
for v in b6-1 b6-2 b6-3; do
  assert_eq running "$(cat "$MNT/$v/state")" "$v state"
  echo 'ps' > "$MNT/$v/exec"
  assert_contains "$(cat "$MNT/$v/exec")" "sleep 10000" "$v: ps"
  echo 'hostname' > "$MNT/$v/exec"
  assert_eq "$v" "$(cat "$MNT/$v/exec")" "$v hostname"
done
# Every counter advances on its own.
c1=$(counter b6-1); c2=$(counter b6-2); c3=$(counter b6-3)
sleep 1.5
d1=$(counter b6-1); d2=$(counter b6-2); d3=$(counter b6-3)
[ "$d1" -gt "$c1" ] && [ "$d2" -gt "$c2" ] && [ "$d3" -gt "$c3" ] ||
  fail "counters do not advance in every clone: $c1->$d1 $c2->$d2 $c3->$d3"
# Stop the counter in b6-1: the others keep counting past it (they diverge).
# shellcheck disable=SC2028 # the guest's tr gets the two characters \0
echo 'for p in /proc/[0-9]*; do [ "$(tr "\0" " " < $p/cmdline 2>/dev/null)" = "sh /root/count.sh " ] && kill ${p#/proc/}; done; true' > "$MNT/b6-1/exec"
sleep 0.5
f1=$(counter b6-1)
sleep 1.5
g1=$(counter b6-1); g2=$(counter b6-2)
note "b6-1 stopped at $f1/$g1, b6-2 at $g2"
[ "$g2" -gt "$g1" ] || fail "b6-2's counter ($g2) did not pass the stopped b6-1 ($g1)"
# Fresh entropy: two clones of the same memory read different random bytes.
rnd() { echo 'head -c 16 /dev/urandom | od -An -tx1' > "$MNT/$1/exec" && cat "$MNT/$1/exec"; }
r2=$(rnd b6-2); r3=$(rnd b6-3)
[ "$r2" != "$r3" ] || fail "clones read the same random bytes: $r2"
# The source is unaffected.
echo 'ps' > "$MNT/s6/exec"
assert_contains "$(cat "$MNT/s6/exec")" "sleep 10000" "source ps"
