#!/bin/bash
# Sourced by mount-helpers/setup and mount-helpers/ensure-deps: timed steps, messages, and
# installing the missing ones of a list of Debian packages. Set PROG (the name printed
# before every line) before sourcing.
#
#   step TEXT        start a step (ending the one before); its duration is printed when
#                    it ends and in the summary
#   step_record MS TEXT  end the current step, and add a duration measured elsewhere (a
#                    background job) to the summary
#   say TEXT         a line within the current step
#   die TEXT         print an error and exit 1
#   step_summary     end the last step; print every step's duration and the total since
#                    the script started
set -euo pipefail
_steps=()
_step_name=
_step_t0=0
_t_start=$(date +%s%N)

_ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
_fmt_ms() { printf '%d.%d s' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }

say() { echo "$PROG: $*"; }
die() { echo "$PROG: ERROR: $*" >&2; exit 1; }

_step_end() {
  [ -n "$_step_name" ] || return 0
  local ms
  ms=$(_ms_since "$_step_t0")
  _steps+=("$ms"$'\t'"$_step_name")
  say "  ($(_fmt_ms "$ms"))"
  _step_name=
}

step() {
  _step_end
  _step_name=$*
  _step_t0=$(date +%s%N)
  say "$*"
}

step_record() {
  _step_end
  _steps+=("$1"$'\t'"$2")
}

step_summary() {
  local s
  _step_end
  say "timing:"
  for s in "${_steps[@]}"; do
    printf '%s: %10s  %s\n' "$PROG" "$(_fmt_ms "${s%%$'\t'*}")" "${s#*$'\t'}"
  done
  printf '%s: %10s  total\n' "$PROG" "$(_fmt_ms "$(_ms_since "$_t_start")")"
}

# apt-get update, once per script run (fresh machines have empty package lists).
_apt_updated=0
apt_update_once() {
  if [ "$_apt_updated" = 0 ]; then
    say "apt-get update"
    apt-get update -qq
    _apt_updated=1
  fi
}

# apt_install_missing PACKAGE...: install those not installed yet, in one apt-get call.
apt_install_missing() {
  local p missing=()
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "present: $*"
    return 0
  fi
  apt_update_once
  say "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
