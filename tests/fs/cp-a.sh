#!/bin/bash
# cp -a of a tree with every kind of file into fs/ and back: contents, metadata (modes,
# ids, ns mtimes), hard links, sparseness and xattrs survive both ways.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
src=$WORK/src back=$WORK/back
mkdir -p "$src/dir/sub" "$src/empty-dir"
printf 'hello\n' > "$src/file"
: > "$src/zero"
head -c 300000 /dev/urandom > "$src/dir/random"
printf 'secret' > "$src/private"; chmod 0600 "$src/private"
printf '#!/bin/sh\necho hi\n' > "$src/tool"; chmod 0755 "$src/tool"
printf 'suid' > "$src/suid"; chmod 4755 "$src/suid"
ln -s file "$src/link"
ln -s ../dir/random "$src/dir/sub/rel-link"
ln -s /nonexistent/target "$src/dangling"
ln "$src/file" "$src/dir/hardlink"
mkfifo "$src/fifo"
truncate -s 64M "$src/sparse"; printf 'tail' | dd of="$src/sparse" bs=1 seek=$((32*1024*1024)) conv=notrunc status=none
printf 'latin1' > "$src/$(printf 'caf\xe9')"
mkdir "$src/$(printf 'dir-\xff\xfe')"; printf x > "$src/$(printf 'dir-\xff\xfe')/inner"
setfattr -n user.color -v blue "$src/file"
setfattr -n user.bin -v 0x00ff00 "$src/dir/random"
setfattr -n user.dir -v yes "$src/dir"
chown 1234:5678 "$src/dir/random"
touch -h -d '2001-02-03 04:05:06.123456789' "$src/link"
touch -d '1999-12-31 23:59:59.987654321' "$src/dir/sub"
touch -d '2010-01-01 00:00:00.5' "$src/dir"

cp -a "$src" "$FSDIR/tree" || fail "cp -a into fs/ failed"
cp -a "$FSDIR/tree" "$back" || fail "cp -a out of fs/ failed"

diff -r --no-dereference -x fifo "$src" "$back" >/dev/null 2>&1 || {
  diff -r --no-dereference -x fifo "$src" "$back" | head -20 >&2 || true
  fail "diff -r src back"
}
diff -r --no-dereference -x fifo "$src" "$FSDIR/tree" >/dev/null 2>&1 || fail "diff -r src fs/tree"
a=$(meta "$src"); b=$(meta "$FSDIR/tree"); c=$(meta "$back")
[ "$a" = "$b" ] || { diff <(echo "$a") <(echo "$b") >&2 || true; fail "metadata in fs/ differs"; }
[ "$a" = "$c" ] || { diff <(echo "$a") <(echo "$c") >&2 || true; fail "metadata after the round trip differs"; }
[ "$(xattrs "$src")" = "$(xattrs "$FSDIR/tree")" ] || fail "xattrs in fs/ differ"
[ "$(xattrs "$src")" = "$(xattrs "$back")" ] || fail "xattrs after the round trip differ"
[ "$(stat -c %i "$FSDIR/tree/file")" = "$(stat -c %i "$FSDIR/tree/dir/hardlink")" ] || fail "hard link lost in fs/"
[ "$(stat -c %i "$back/file")" = "$(stat -c %i "$back/dir/hardlink")" ] || fail "hard link lost on the way back"
[ "$(stat -c %F "$FSDIR/tree/fifo")" = fifo ] || fail "fifo is not a fifo in fs/"
blocks=$(stat -c %b "$FSDIR/tree/sparse")
[ "$blocks" -lt 4096 ] || fail "sparse file is not sparse in fs/ ($blocks blocks)"
# The guest sees the same bytes and modes.
assert_eq "$(md5sum < "$src/dir/random" | cut -d' ' -f1)" \
  "$(guest "md5sum $GREL/tree/dir/random" | cut -d' ' -f1)" "guest md5 of dir/random"
assert_eq "4755" "$(guest "stat -c %a $GREL/tree/suid")" "guest mode of suid"
note "cp -a round trip: $(echo "$a" | wc -l) entries identical"
