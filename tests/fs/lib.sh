#!/bin/bash
# Shared helpers for the fs/ scenario scripts. Sourced under bash; assertions, polling and
# chained cleanups (`on_exit`) come from tests/testlib.sh.
# Every scenario gets, from its caller (tests/e2e/t-*.sh or fsd/tests/fs_host.rs):
#   FSDIR   an empty directory inside a VM's fs/ (host path)
#   FSROOT  the VM's fs/ directory itself
#   GREL    FSDIR relative to the guest command's working directory (for exec)
#   VMDIR   the VM's directory (exec, ctl, state)
#   WORK    an empty local scratch directory on a filesystem with user xattrs
#   BANDSOX_DEVTOOLS the bandsox-devtools binary (for `bandsox-devtools fsx`)
#   VMM_PID_FILE  the VM's vmm.pid (for the kill test)
set -euo pipefail
# shellcheck source=SCRIPTDIR/../testlib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"

# guest CMD: run CMD in the guest through exec, print its output; fail on non-zero.
guest() {
  local out
  exec 9<>"$VMDIR/exec"
  printf '%s' "$1" >&9
  out=$(cat <&9)
  exec 9>&-
  local st
  st=$(cat "$VMDIR/runs/last/status")
  [ "$st" = 0 ] || fail "guest command [$1] ended with status $st: $out"
  printf '%s' "$out"
}

# Metadata listing of a tree: path, type, mode, ids, size, mtime (ns), link target, links.
meta() {
  # Directory sizes depend on the filesystem's layout, not on what was copied.
  (cd "$1" && find . \( -type d -printf '%P|%y|%m|%U|%G|-|%T@|%l|%n\n' \) -o \
    -printf '%P|%y|%m|%U|%G|%s|%T@|%l|%n\n' | LC_ALL=C sort)
}

# Every user.* xattr of a tree, by path.
xattrs() {
  (cd "$1" && getfattr -R -h -d -m '^user\.' --absolute-names . 2>/dev/null | LC_ALL=C sort)
}
