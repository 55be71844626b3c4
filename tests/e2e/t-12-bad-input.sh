#!/bin/bash
# Bad input: errno + message, nothing changed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
before=$(ls "$MNT")
for bad in 'a b' '-x' ctl images snapshots README '.hidden' "$(printf 'x%.0s' $(seq 1 65))"; do
  if mkdir "$MNT/$bad" 2>/dev/null; then fail "mkdir [$bad] succeeded"; fi
done
err=$(mkdir "$MNT/$(printf 'tab\there')" 2>&1) && fail "mkdir with a tab succeeded"
assert_contains "$err" "Invalid argument" "mkdir with control char"
assert_eq "$before" "$(ls "$MNT")" "root listing after bad mkdirs"
new_vm bi
# Read-only files refuse writes, even from root.
for f in state info console; do
  write_expect_error "$MNT/bi/$f" x "Permission denied"
done
write_expect_error "$MNT/README" x "Permission denied"
write_expect_error "$MNT/events" x "Permission denied"
# defaults validate and change nothing on error
d0=$(cat "$MNT/defaults")
write_expect_error "$MNT/defaults" "vcpus=99" "Invalid argument"
write_expect_error "$MNT/defaults" "nonsense" "Invalid argument"
assert_eq "$d0" "$(cat "$MNT/defaults")" "defaults after bad writes"
echo 'memory=192' > "$MNT/defaults"
assert_contains "$(cat "$MNT/defaults")" "memory=192" "defaults after good write"
echo 'memory=256' > "$MNT/defaults"
# pause on a stopped VM
echo kill > "$MNT/bi/ctl"
write_expect_error "$MNT/bi/ctl" pause "Device or resource busy"
assert_contains "$(cat "$MNT/bi/ctl")" "stopped" "ctl message"
assert_eq stopped "$(cat "$MNT/bi/state")" state
# unknown VM in paths
[ ! -e "$MNT/nosuchvm/state" ] || fail "nosuchvm exists"
# images/ lists base with info
assert_contains "$(cat "$MNT/images/base/info")" '"name"' "images/base/info"
