#!/bin/bash
# 8 host processes write different files at once, then 8 read the same file at once.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
for i in $(seq 1 8); do head -c 3M /dev/urandom > "$WORK/w$i"; done
pids=()
for i in $(seq 1 8); do cp "$WORK/w$i" "$FSDIR/w$i" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p" || fail "a concurrent writer failed"; done
for i in $(seq 1 8); do cmp "$WORK/w$i" "$FSDIR/w$i" || fail "file w$i differs"; done
want=$(md5sum < "$WORK/w1" | cut -d' ' -f1)
pids=()
for i in $(seq 1 8); do
  (got=$(dd if="$FSDIR/w1" bs=64k iflag=direct status=none | md5sum | cut -d' ' -f1); [ "$got" = "$want" ]) & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "a concurrent reader read wrong bytes"; done
note "8 writers and 8 readers agree"
