#!/bin/bash
# Changes made inside the guest are visible on the host within a second (without waiting
# for cache lifetimes), and files written through fs/ are visible to guest commands at once.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
d=$FSDIR g=$GREL
printf 'v1\n' > "$d/f"
assert_eq v1 "$(cat "$d/f")" "first read"
ls "$d" >/dev/null; stat "$d/f" >/dev/null
# modify (same size, then longer) from the guest
guest "printf 'v2\n' > $g/f" >/dev/null
within 1 grep -qx v2 "$d/f" || fail "guest modification not visible: $(cat "$d/f")"
guest "printf 'version three\n' > $g/f" >/dev/null
within 1 grep -qx 'version three' "$d/f" || fail "guest modification (longer) not visible"
# create
guest "echo new > $g/created" >/dev/null
within 1 test -e "$d/created" || fail "guest-created file not visible"
# rename
guest "mv $g/created $g/renamed" >/dev/null
within 1 test -e "$d/renamed" || fail "guest rename target not visible"
within 1 test ! -e "$d/created" || fail "guest rename source still visible"
# delete
guest "rm $g/renamed" >/dev/null
within 1 test ! -e "$d/renamed" || fail "guest-deleted file still visible"
# attributes
guest "chmod 0640 $g/f" >/dev/null
within 1 test "$(stat -c %a "$d/f")" = 640 || fail "guest chmod not visible: $(stat -c %a "$d/f")"
# directories
guest "mkdir $g/sub && echo x > $g/sub/inner" >/dev/null
within 1 test -f "$d/sub/inner" || fail "guest mkdir not visible"
# host → guest
printf 'from host\n' > "$d/h"
assert_eq "from host" "$(guest "cat $g/h")" "guest reads a file written through fs/"
printf 'appended\n' >> "$d/h"
assert_eq "2" "$(guest "wc -l < $g/h" | tr -d ' ')" "guest sees an append at once"
note "guest → host and host → guest changes are visible"
# A directory made through fs/ is known to be empty (lookups there ask no guest): what a
# command then makes in it is visible as soon as the command has ended, with no wait.
mkdir "$d/made"
test ! -e "$d/made/x" || fail "a new directory is not empty"
guest "touch $g/made/x && mkdir $g/made/sub" >/dev/null
test -e "$d/made/x" || fail "a file a command made in a host-made directory is not visible at once"
test -d "$d/made/sub" || fail "a directory a command made in a host-made directory is not visible at once"
guest "rm $g/made/x" >/dev/null
within 1 test ! -e "$d/made/x" || fail "a file a command removed is still visible"
note "names in host-made directories are known, and commands' changes apply before they end"
