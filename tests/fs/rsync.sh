#!/bin/bash
# rsync -a of a tree of RSYNC_DIRS x 100 files (default 50: 5,000 files) into fs/; a
# second run transfers nothing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
dirs=${RSYNC_DIRS:-50}
n=$((dirs * 100))
src=$WORK/rsrc
for d in $(seq 1 "$dirs"); do
  mkdir -p "$src/d$d"
  for f in $(seq 1 100); do printf 'file %s/%s\n' "$d" "$f" > "$src/d$d/f$f"; done
done
assert_eq "$n" "$(find "$src" -type f | wc -l)" "source files"
t0=$(date +%s%N)
rsync -a "$src/" "$FSDIR/app/" || fail "first rsync failed"
t1=$(date +%s%N)
changes=$(rsync -a --itemize-changes "$src/" "$FSDIR/app/") || fail "second rsync failed"
[ -z "$changes" ] || { echo "$changes" | head >&2; fail "second rsync found $(echo "$changes" | wc -l) changes"; }
diff -r "$src" "$FSDIR/app" >/dev/null || fail "diff after rsync"
assert_eq "$n" "$(guest "find $GREL/app -type f | wc -l" | tr -d ' ')" "files seen by the guest"
note "rsync of $n files: $(( (t1 - t0) / 1000000 )) ms; second run: nothing to do"
