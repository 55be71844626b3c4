#!/bin/bash
# Every fallocate(2) mode through fs/ answers as the guest's own filesystem does: the same
# static program (falloc-modes.c) runs in the guest, directly on its filesystem, and on
# the host through fs/, and each case's result (ok or the errno) and the file's size and
# content afterwards must match.
# One known exception, made by the host kernel and not by BandSox: Linux's FUSE client
# forwards only plain, KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE requests and answers every
# other mode (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, unknown flags) EOPNOTSUPP
# itself, before the daemon sees them (fs/fuse/file.c, checked on 6.18). For those cases
# the line through fs/ must be exactly that refusal with the file untouched; the guest's
# own answer is printed beside it. Should a kernel forward them, they must match too.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
command -v cc >/dev/null || fail "cc missing (build-essential; the static agent build needs it too)"
tool=$WORK/falloc-modes
cc -static -O2 -o "$tool" "$(dirname "$0")/falloc-modes.c" || fail "cannot build falloc-modes.c"
cp "$tool" "$FSDIR/falloc-modes"
mkdir "$FSDIR/in-guest" "$FSDIR/through-fs"
in_guest=$(guest "cd $GREL && ./falloc-modes in-guest")
through_fs=$("$tool" "$FSDIR/through-fs") || fail "falloc-modes through fs/ failed: $through_fs"
untouched=$(echo "$through_fs" | sed -n 's/^untouched: - //p')
[ -n "$untouched" ] || fail "no untouched line: $through_fs"
gated=0 matched=0
while IFS= read -r g; do
  name=${g%%:*}
  h=$(echo "$through_fs" | grep "^$name: ") || fail "no line for $name through fs/"
  if [ "$g" = "$h" ]; then
    matched=$((matched + 1))
    continue
  fi
  case "$name" in
    collapse_range*|insert_range|unshare_range|unknown-flag)
      [ "$h" = "$name: EOPNOTSUPP $untouched" ] \
        || fail "$name: through fs/ [$h], in the guest [$g] (not the kernel's FUSE refusal)"
      note "$name: the host kernel's FUSE client refuses it (EOPNOTSUPP); in the guest: ${g#*: }"
      gated=$((gated + 1));;
    *) fail "$name: through fs/ [$h], in the guest [$g]";;
  esac
done <<< "$in_guest"
[ "$(echo "$in_guest" | wc -l)" = "$(echo "$through_fs" | wc -l)" ] || fail "case counts differ"
note "fallocate: $matched cases as in the guest, $gated refused by the host kernel's FUSE client"
