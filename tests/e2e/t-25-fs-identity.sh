#!/bin/bash
# Issue 11 on a real VM: stable inode numbers (mv, ln, drop_caches, guest mv,
# pause/resume, and a daemon SIGKILL + restart), d_ino == st_ino, hard links through tar
# and rsync -aH, POSIX rename for every file type (tests/fs/identity.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm idn
fs_scenario identity idn
f=$MNT/idn/fs/root/keep
echo x > "$f"
ln "$f" "$f.link"
before=$(stat -c %i "$f")
crash_and_restart_daemon
assert_eq running "$(adopted idn)" "state after restart"
assert_eq "$before" "$(stat -c %i "$f")" "st_ino after a daemon restart"
assert_eq "$before" "$(stat -c %i "$f.link")" "st_ino of the link after a daemon restart"
