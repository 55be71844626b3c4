#!/bin/bash
# A snapshot taken while 4 execs stream output: the execs complete correctly in the source
# (every line, in order, exit 0), and the clone works.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
echo 'create se memory=128' > "$MNT/ctl" || fail "create se: $(cat "$MNT/ctl")"
VMS="se"; on_exit 'cleanup_vms; rmdir "$MNT/snapshots/snape" 2>/dev/null || true'
pids=""
for i in 1 2 3 4; do
  ( echo "i=0; while [ \$i -lt 150 ]; do i=\$((i+1)); echo run$i-line\$i; sleep 0.02; done" > "$MNT/se/exec" ) &
  pids="$pids $!"
done
wait_for 10 test -d "$MNT/se/runs/4" || fail "4 runs did not start"
sleep 0.5
echo 'snapshot snape' > "$MNT/se/ctl" || fail "snapshot: $(cat "$MNT/se/ctl")"
for p in $pids; do wait "$p" || fail "an exec writer failed"; done
for n in 1 2 3 4; do
  assert_eq 0 "$(cat "$MNT/se/runs/$n/status")" "run $n status"
  out=$(cat "$MNT/se/runs/$n/stdout")
  lines=$(printf '%s\n' "$out" | wc -l)
  assert_eq 150 "$lines" "run $n line count"
  tag=$(printf '%s\n' "$out" | head -n1 | sed 's/-line1$//')
  exp=$(i=0; while [ $i -lt 150 ]; do i=$((i+1)); echo "$tag-line$i"; done)
  [ "$out" = "$exp" ] || fail "run $n output is not every line in order"
done
echo 'clone snape se2' > "$MNT/ctl" || fail "clone: $(cat "$MNT/ctl")"
VMS="$VMS se2"
echo 'echo hi' > "$MNT/se2/exec"
assert_eq hi "$(cat "$MNT/se2/exec")" "clone exec"
