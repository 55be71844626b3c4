#!/bin/bash
# The one shell test library: assertions, polling and chained cleanups. Sourced (under
# bash) by tests/e2e/lib.sh and tests/fs/lib.sh, so every end-to-end test and fs/ scenario
# fails, waits and cleans up the same way.
#
# Cleanups: `on_exit CMD` adds CMD to a list that one EXIT trap runs, newest first, each
# with errors ignored, keeping the script's exit status. Never set `trap ... EXIT` in a
# test: it would replace the list (and leak the VMs, images and processes on it).
set -euo pipefail

# Sourced twice (a library sourcing another): keep the first list.
if [ -z "${_TESTLIB_LOADED:-}" ]; then
  _TESTLIB_LOADED=1
  _ON_EXIT=()
fi

fail() { echo "FAIL: $*" >&2; exit 1; }
note() { echo "  .. $*" >&2; }

# assert_eq EXPECTED ACTUAL [WHAT]
assert_eq() {
  [ "$1" = "$2" ] || fail "${3:-value}: expected [$1], got [$2]"
}

# assert_contains HAYSTACK NEEDLE [WHAT]
assert_contains() {
  case "$1" in *"$2"*) ;; *) fail "${3:-text} does not contain [$2]: [$1]" ;; esac
}

# ... | has [GREP-OPTIONS] PATTERN: grep -q that reads all its input. Under pipefail a
# `grep -q` that stops at the first match can kill the writer with SIGPIPE and fail the
# pipeline; `has` cannot.
has() {
  grep "$@" >/dev/null
}

# wait_for SECONDS CMD...: retry CMD every 0.2 s until it succeeds.
wait_for() {
  local _t=$1; shift
  local _end=$(( $(date +%s) + _t ))
  while ! "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$_end" ] || return 1
    sleep 0.2
  done
}

# within SECONDS CMD...: CMD succeeds within SECONDS (polling every 50 ms).
within() {
  local t=$1; shift
  local end=$(( $(date +%s%N) + t * 1000000000 ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s%N)" -lt "$end" ] || return 1
    sleep 0.05
  done
}

# on_exit CMD: run CMD (a shell command line) when the script exits, before the cleanups
# registered earlier.
on_exit() {
  _ON_EXIT+=("$1")
}

_run_on_exit() {
  local rc=$? i
  # A cleanup that fails (or names an unset variable) must not stop the others or change
  # the test's result.
  set +eu
  for (( i=${#_ON_EXIT[@]}-1; i>=0; i-- )); do
    eval "${_ON_EXIT[i]}"
  done
  return "$rc"
}
trap _run_on_exit EXIT
