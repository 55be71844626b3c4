#!/bin/bash
# Three VMs booted concurrently, each running 20 parallel execs; all outputs correct.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
VMS="c1 c2 c3"
for v in c1 c2 c3; do mkdir "$MNT/$v" & done
wait
for v in c1 c2 c3; do assert_eq running "$(cat "$MNT/$v/state")" "$v state"; done
tmp=$(mktemp -d)
for v in c1 c2 c3; do
  for i in $(seq 1 20); do
    ( exec 3<>"$MNT/$v/exec"; echo "echo $v-$i; hostname" >&3; cat <&3 > "$tmp/$v-$i" ) &
  done
done
wait
for v in c1 c2 c3; do
  for i in $(seq 1 20); do
    assert_eq "$v-$i
$v" "$(cat "$tmp/$v-$i")" "output of $v exec $i"
  done
done
rm -rf "$tmp"
