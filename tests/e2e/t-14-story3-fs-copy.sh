#!/bin/bash
# Story 3: cp a big file into fs/ and cmp it; rsync a tree in and a second rsync has
# nothing to do (t-20). Plus the 256 MiB round trip hashed by host and guest.
# vsock: yes
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s3
head -c 8M /dev/urandom > /var/tmp/bandsox-big.bin
cp /var/tmp/bandsox-big.bin "$MNT/s3/fs/root/" || fail "cp into fs/root"
cmp /var/tmp/bandsox-big.bin "$MNT/s3/fs/root/bandsox-big.bin" || fail "cmp"
rm -f /var/tmp/bandsox-big.bin
BIG_MB=256 fs_scenario big s3
