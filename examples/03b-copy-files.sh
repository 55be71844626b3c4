#!/bin/bash
# Stories 3 and 4: the guest's filesystem as files. Copy in, rsync a tree, see guest
# changes at once.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo3"
trap 'rmdir "$B/demo3"' EXIT
head -c 16M /dev/urandom > /tmp/big.bin
cp /tmp/big.bin "$B/demo3/fs/root/"
cmp /tmp/big.bin "$B/demo3/fs/root/big.bin" && echo "cp: identical"
echo 'md5sum /root/big.bin' > "$B/demo3/exec"; cat "$B/demo3/exec"
md5sum /tmp/big.bin
mkdir -p /tmp/src && for i in $(seq 1 100); do echo "$i" > "/tmp/src/f$i"; done
rsync -a /tmp/src/ "$B/demo3/fs/app/"
echo "second rsync changes: $(rsync -a --itemize-changes /tmp/src/ "$B/demo3/fs/app/" | wc -l)"
echo 'touch /tmp/x' > "$B/demo3/exec"
ls -l "$B/demo3/fs/tmp/x"
