#!/bin/bash
# A guest flooding its serial port: the host keeps the last vm.console_mib of console.log,
# `tail -f console` follows across the cut, and `cat console` starts with what was dropped.
# timeout: 240
set -euo pipefail
. "$(dirname "$0")/lib.sh"
on_exit ': > "$LIMITS"; cleanup_vms'
echo "vm.console_mib = 1" > "$LIMITS"
new_vm f61
id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/f61/info")
log=$STATE/vms/$id/console.log
out=$(mktemp /var/tmp/bandsox-t61.XXXXXX)
tail -s 0.2 -n 0 -f "$MNT/f61/console" > "$out" 2>&1 &
t=$!
# ~2 MB through the emulated 8250 (several seconds under TCG), then a last line.
echo 'yes flooding-the-serial-port | head -c 2000000 > /dev/ttyS0; echo FLOOD-END > /dev/ttyS0' > "$MNT/f61/exec"
wait_for 20 grep -q FLOOD-END "$out" || { kill $t; fail "tail -f did not follow the console past the cut: $(tail -c 300 "$out")"; }
kill $t
grep -q 'truncated' "$out" && fail "tail saw the console truncated"
[ "$(tr -dc '\000' < "$out" | wc -c)" = 0 ] || fail "tail saw punched zeros"
sleep 1.5   # the next cap round
size=$(stat -c %s "$log")
kept=$(( $(stat -c %b "$log") * 512 ))
note "console.log: size $size, allocated $kept"
[ "$size" -gt 2000000 ] || fail "console.log size $size: the flood did not arrive"
[ "$kept" -le $((1024 * 1024 + 320 * 1024)) ] || fail "console.log holds $kept bytes, over the 1 MiB cap"
head -n 1 "$MNT/f61/console" | has '^\[bandsox: [0-9]* earlier bytes were dropped' \
  || fail "cat console does not say what was dropped: $(head -c 200 "$MNT/f61/console")"
tail -n 1 "$MNT/f61/console" | has FLOOD-END || fail "the console lost its end"
rm -f "$out"
