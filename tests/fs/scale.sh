#!/bin/bash
# Scale (issue 11): one directory of SCALE_DIR (default 100,000) entries is listed, and a
# tree of SCALE_TREE (default 200,000) files (that directory plus 1,000-file directories)
# is walked through fs/ (find, du, ls -lR, rsync -an) with no EMFILE/ENFILE/ENOMEM, and the
# agent's open descriptors and resident memory stay under the documented bounds
# (docs/tree.md, "Bounded guest resources"). The guest's disk needs an inode per file.
# SCALE_WALKS (default "find du ls-lR rsync") picks the walks of the tree: on a TCG guest
# each walk of 200,000 files costs minutes, so the real-VM test does `find`, and
# host mode (the same agent and host code, no emulation) does all four.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
d=$FSDIR g=$GREL
big=${SCALE_DIR:-100000}
tree=${SCALE_TREE:-200000}
# Documented bounds: 1 root + 8192 watched directories + 4096 cached nodes + one per
# device, plus the agent's own few (sockets, inotify, /proc); 96 MiB resident.
max_fds=${SCALE_MAX_FDS:-12500}
max_rss_kib=${SCALE_MAX_RSS_KIB:-98304}

# The files are made inside the guest (fast), then everything is read through fs/.
per_dir=1000
dirs=$(( (tree - big + per_dir - 1) / per_dir ))
guest "mkdir -p $g/big && cd $g/big && i=0 && while [ \$i -lt $big ]; do j=\$((i+1000)); seq \$i \$((j-1)) | sed 's/^/e/' | xargs touch; i=\$j; done" >/dev/null
guest "mkdir -p $g/tree && cd $g/tree && k=0 && while [ \$k -lt $dirs ]; do mkdir d\$k && (cd d\$k && seq 1 $per_dir | sed 's/^/f/' | xargs touch); k=\$((k+1)); done" >/dev/null
total=$((big + dirs * per_dir))
note "made $big entries in one directory and $((dirs * per_dir)) files in $dirs more directories"

errs=$WORK/errs
run() {
  local what=$1; shift
  local t0; t0=$(date +%s%N)
  if ! "$@" >/dev/null 2>"$errs"; then fail "$what failed: $(tail -n 3 "$errs")"; fi
  if grep -Eq 'Too many open files|No space|Cannot allocate|Stale' "$errs"; then
    fail "$what: $(grep -E 'Too many|No space|Cannot allocate|Stale' "$errs" | head -n 3)"
  fi
  note "$what: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
}
count=$(ls -f "$d/big" | wc -l)
assert_eq $((big + 2)) "$count" "entries listed in the big directory"
run "ls -l of $big entries" ls -l "$d/big"
for walk in ${SCALE_WALKS:-find du ls-lR rsync}; do
  case $walk in
    find) run "find of $total files" find "$d" -type f -fprint "$WORK/found"
          assert_eq "$total" "$(wc -l < "$WORK/found")" "files found" ;;
    du) run "du of $total files" du -s "$d" ;;
    ls-lR) run "ls -lR of $total files" ls -lR "$d" ;;
    rsync) run "rsync -an of $total files" rsync -an "$d/" "$WORK/rsync-dry/" ;;
    *) fail "unknown walk $walk" ;;
  esac
done

# The agent's descriptors and memory: the host-mode agent process (what the VMM pid file
# names in host mode), or else the guest's PID 1 (the agent, started as /init).
pid=$(cat "$VMM_PID_FILE")
if [ "$(cat "/proc/$pid/comm")" = bandsox-agent ]; then
  fds=$(find "/proc/$pid/fd" -mindepth 1 | wc -l)
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
else
  fds=$(guest "ls /proc/1/fd | wc -l" | tr -d ' ')
  rss=$(guest "awk '/^VmRSS/ {print \$2}' /proc/1/status")
fi
note "agent: $fds descriptors, $rss KiB resident"
[ "$fds" -le "$max_fds" ] || fail "the agent holds $fds descriptors (bound $max_fds)"
[ "$rss" -le "$max_rss_kib" ] || fail "the agent's resident memory is $rss KiB (bound $max_rss_kib)"
guest "rm -rf $g/big $g/tree" >/dev/null
