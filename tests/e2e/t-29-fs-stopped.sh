#!/bin/bash
# fs/ of a stopped VM is its disk, read-only, read on the host by a userspace ext4 reader:
# cat, ls -l, find, cp -a (and rsync) work with the guest's ids and modes; writes give
# "Read-only file system" and `cat ctl` says to start the VM; start makes fs/ live again.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm stfs
V=$MNT/stfs
WORK=$(mktemp -d /var/tmp/bandsox-t29.XXXXXX)
on_exit "rm -rf '$WORK'"
printf '%s\n' 'mkdir -p /root/d/sub && printf "hello\n" > /root/d/hello && head -c 300000 /dev/urandom > /root/d/sub/big && ln -s hello /root/d/link && chown 1234:2345 /root/d/hello && chmod 640 /root/d/hello && md5sum /root/d/sub/big | cut -d" " -f1 > /root/d/big.md5 && sync' > "$V/exec"
live_ls=$(ls -ln "$V/fs/root/d/hello")
echo stop > "$V/ctl"
assert_eq stopped "$(cat "$V/state")" state

assert_eq hello "$(cat "$V/fs/root/d/hello")" "cat of a stopped VM's file"
stopped_ls=$(ls -ln "$V/fs/root/d/hello")
assert_contains "$stopped_ls" "-rw-r----- 1 1234 2345 6 " "ls -ln of a stopped VM's file"
# Same ids, mode, size and time as the running guest showed.
assert_eq "$(echo "$live_ls" | awk '{print $1, $3, $4, $5, $6, $7, $8}')" \
  "$(echo "$stopped_ls" | awk '{print $1, $3, $4, $5, $6, $7, $8}')" "ls -ln running vs stopped"
assert_eq hello "$(readlink "$V/fs/root/d/link")" readlink
ls -l "$V/fs/" | has ' root$' || fail "ls -l of a stopped VM's fs/ lacks root"
assert_eq 6 "$(find "$V/fs/root/d" | wc -l)" "find under a stopped VM's fs/"
ino1=$(stat -c %i "$V/fs/root/d/sub/big")
assert_eq "$ino1" "$(stat -c %i "$V/fs/root/d/sub/big")" "inode number while stopped"
assert_eq "$ino1" "$(ls -i "$V/fs/root/d/sub" | awk '$2 == "big" {print $1}')" "d_ino = st_ino"

cp -a "$V/fs/root/d" "$WORK/copy"
assert_eq "$(cat "$WORK/copy/big.md5")" "$(md5sum < "$WORK/copy/sub/big" | cut -d' ' -f1)" "cp -a data"
assert_eq hello "$(readlink "$WORK/copy/link")" "cp -a symlink"
assert_eq "640 1234 2345" "$(stat -c '%a %u %g' "$WORK/copy/hello")" "cp -a ids and mode"
if command -v rsync >/dev/null; then
  rsync -a "$V/fs/root/d/" "$WORK/rsync/"
  cmp "$WORK/copy/sub/big" "$WORK/rsync/sub/big" || fail "rsync data"
fi

write_expect_error "$V/fs/root/d/new" x "Read-only file system"
write_expect_error "$V/fs/root/d/hello" x "Read-only file system"
has start < "$V/ctl" || fail "cat ctl after EROFS: $(cat "$V/ctl")"
err=$(mkdir "$V/fs/root/d/x" 2>&1) && fail "mkdir in a stopped VM's fs/ worked"
assert_contains "$err" "Read-only file system" "mkdir"
err=$(rm "$V/fs/root/d/hello" 2>&1) && fail "rm in a stopped VM's fs/ worked"
assert_contains "$err" "Read-only file system" "rm"
err=$(touch "$V/fs/root/d/hello" 2>&1) && fail "touch in a stopped VM's fs/ worked"
assert_contains "$err" "Read-only file system" "touch"

echo start > "$V/ctl"
assert_eq running "$(cat "$V/state")" "state after start"
assert_eq hello "$(cat "$V/fs/root/d/hello")" "cat after start"
echo live > "$V/fs/root/d/new"
echo 'cat /root/d/new' > "$V/exec"
assert_eq live "$(cat "$V/exec")" "a write through fs/ after start reaches the guest"
note "stopped fs/: cat, ls -l, find, cp -a work; writes EROFS; live again after start"
