#!/bin/bash
# What an ordinary user's commands make the daemon hold is bounded (issue 20): the loop
# that took the daemon to 4.7 GB (150 terminal runs of 1000x1000 in one VM) is refused
# with EDQUOT once the user's terminal_cells are used, `cat VM/ctl` names the limit, the
# daemon's memory stays under the documented bound (docs/service.md, "Daemon memory")
# and goes back down when the runs end; the same for per_user.runs with plain commands.
# timeout: 240
set -euo pipefail
. "$(dirname "$0")/lib.sh"
U=1651
asu() { setpriv --reuid=$U --regid=$U --clear-groups bash -c "$1"; }
limits() { printf '%s\n' "$@" > "$LIMITS"; }
on_exit 'rmdir "$MNT/r65" 2>/dev/null || true; : > "$LIMITS"'
rss() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$(daemon_pid)/status"; }
kill_runs() {
  asu "for r in $MNT/r65/runs/[0-9]*; do echo kill > \$r/ctl 2>/dev/null || true; done"
  for _ in $(seq 100); do
    asu "cat $MNT/r65/runs/[0-9]*/status" | has -x running || return 0
    sleep 0.1
  done
  fail "runs still running: $(asu "grep -l running $MNT/r65/runs/[0-9]*/status")"
}
MIB=$((1024 * 1024))

: > "$LIMITS"   # the host-derived defaults
asu "mkdir $MNT/r65" || fail "mkdir as uid $U"
cells=$(asu "cat $MNT/usage" | sed -n 's/^user .* terminal_cells=0\/\([0-9]*\) .*/\1/p')
[ -n "$cells" ] || fail "no terminal_cells in usage: $(asu "cat $MNT/usage")"
fit=$((cells / 1000000))
base=$(rss)

# The issue's loop, as the user: `fit` screens start, every later one is refused.
out=$(asu "for i in \$(seq 1 150); do printf '#bandsox tty=1000x1000\nexec sleep 900\n' > $MNT/r65/exec && echo started; done" 2>&1) || true
started=$(printf '%s\n' "$out" | grep -c '^started$' || true)
refused=$(printf '%s\n' "$out" | grep -c 'Disk quota exceeded' || true)
[ "$started" = "$fit" ] || fail "$started terminal runs started, $fit fit in terminal_cells=$cells: $(printf '%s\n' "$out" | sort | uniq -c)"
[ "$refused" = $((150 - fit)) ] || fail "$refused refused, want $((150 - fit)): $(printf '%s\n' "$out" | sort | uniq -c)"
why=$(asu "cat $MNT/r65/ctl")
assert_contains "$why" "error: exec: limit per_user.terminal_cells=$cells reached" "VM ctl"
assert_contains "$(asu "cat $MNT/usage")" " terminal_cells=$((fit * 1000000))/$cells " "usage"
# The documented bound: 64 bytes a cell, 320 KiB a command, plus slack for the rest.
grown=$(( $(rss) - base ))
bound=$(( fit * 64 * MIB + fit * 320 * 1024 + 64 * MIB ))
note "$fit terminal runs: the daemon grew by $grown bytes (bound $bound)"
[ "$grown" -lt "$bound" ] || fail "the daemon grew by $grown bytes (bound $bound)"

# Ending them gives the memory back to the system.
kill_runs
ok=0
for _ in $(seq 100); do
  [ $(( $(rss) - base )) -lt $((64 * MIB)) ] && { ok=1; break; }
  sleep 0.1
done
note "after they ended: $(( $(rss) - base )) bytes more than before"
[ "$ok" = 1 ] || fail "the daemon still holds $(( $(rss) - base )) bytes more than before the runs"
assert_contains "$(asu "cat $MNT/usage")" " terminal_cells=0/$cells " "usage after the runs ended"

# Plain commands count against per_user.runs: the one past the limit is EDQUOT.
limits "per_user.runs = 3"
sleep 1.1   # commands read a changed limits file at most once a second
for _ in 1 2 3; do
  asu "printf '#bandsox wait=0\nexec sleep 900\n' > $MNT/r65/exec" || fail "a command under the limit: $(asu "cat $MNT/r65/ctl")"
done
err=$(asu "echo 'echo never' > $MNT/r65/exec" 2>&1) && fail "a 4th command ran over per_user.runs=3"
assert_contains "$err" "Disk quota exceeded" "exec over per_user.runs"
assert_contains "$(asu "cat $MNT/r65/ctl")" "limit per_user.runs=3 reached: uid $U has 3 commands" "VM ctl"
kill_runs
asu "echo 'echo again' > $MNT/r65/exec && cat $MNT/r65/exec" | has -x again || fail "no command after the runs ended"
asu "rmdir $MNT/r65"
