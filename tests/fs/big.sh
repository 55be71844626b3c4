#!/bin/bash
# A 256 MiB file written through fs/ and read back hashes identically, in the host and in
# the guest.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
size_mb=${BIG_MB:-256}
head -c "${size_mb}M" /dev/urandom > "$WORK/big"
want=$(sha256sum < "$WORK/big" | cut -d' ' -f1)
cp "$WORK/big" "$FSDIR/big" || fail "cp into fs/"
cmp "$WORK/big" "$FSDIR/big" || fail "cmp (cached)"
got=$(dd if="$FSDIR/big" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)
assert_eq "$want" "$got" "sha256 read back with O_DIRECT"
assert_eq "$want" "$(guest "sha256sum $GREL/big" | cut -d' ' -f1)" "guest sha256"
note "${size_mb} MiB: host, fs/ and guest hashes agree"
