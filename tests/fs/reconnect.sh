#!/bin/bash
# A lost agent connection is re-established without the user noticing: a file open
# across the reconnect keeps reading, reads running while the connection is dropped
# again and again all succeed with the right bytes, and exec works on the first try.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
head -c 3000000 /dev/urandom > "$WORK/src"
cp "$WORK/src" "$FSDIR/f"
want=$(sha256sum < "$WORK/src")
exec 3< "$FSDIR/f"
dd bs=1000000 count=1 status=none <&3 > "$WORK/part"
echo reconnect > "$VMDIR/ctl"
assert_eq "ok: reconnected" "$(cat "$VMDIR/ctl")" "ctl answer"
echo 1 > /proc/sys/vm/drop_caches
cat <&3 >> "$WORK/part"
exec 3<&-
assert_eq "$want" "$(sha256sum < "$WORK/part")" "file read across a reconnect"
# Reads (each one open + O_DIRECT read + close) while the connection is dropped 5 times.
(
  for i in $(seq 1 20); do
    got=$(dd if="$FSDIR/f" bs=256k iflag=direct status=none | sha256sum) || { echo "read $i failed" > "$WORK/bad"; exit 1; }
    [ "$got" = "$want" ] || { echo "read $i: wrong bytes" > "$WORK/bad"; exit 1; }
    ls "$FSDIR" >/dev/null || { echo "ls $i failed" > "$WORK/bad"; exit 1; }
  done
) &
reader=$!
for i in 1 2 3 4 5; do
  sleep 0.2
  echo reconnect > "$VMDIR/ctl" || fail "reconnect $i: $(cat "$VMDIR/ctl")"
done
wait "$reader" || fail "$(cat "$WORK/bad" 2>/dev/null)"
echo 'echo alive' > "$VMDIR/exec" || fail "exec after reconnects"
assert_eq alive "$(cat "$VMDIR/exec")" "exec after reconnects"
grep -q "agent-reconnected" "$VMDIR/../events" || fail "no agent-reconnected event"
note "6 reconnects: open file, 20 concurrent reads and exec all fine"
