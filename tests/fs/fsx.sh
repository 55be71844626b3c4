#!/bin/bash
# Random-offset writes, truncates and reads against a local reference copy.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
for seed in ${FSX_SEEDS:-1 2 3}; do
  "$BANDSOX_DEVTOOLS" fsx "$FSDIR/fsx-$seed" --ops "${FSX_OPS:-1000}" --seed "$seed" --max-size $((4*1024*1024)) \
    || fail "fsx seed $seed"
done
note "fsx: seeds ${FSX_SEEDS:-1 2 3} match the reference"
