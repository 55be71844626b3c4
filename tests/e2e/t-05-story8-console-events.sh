#!/bin/bash
# Story 8: tail -f console shows the boot log; tail -f events shows lifecycle events.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm s8
timeout 5 tail -n +1 -f "$MNT/s8/console" > /tmp/bandsox-e2e-console.$$ 2>&1 || true
# Guests boot with loglevel=4 (quiet is faster under emulation): kernel lines still appear.
grep -q "^\[ *[0-9]*\.[0-9]*\] " /tmp/bandsox-e2e-console.$$ || fail "console has no kernel log: $(head -c 300 /tmp/bandsox-e2e-console.$$)"
grep -q "bandsox-agent" /tmp/bandsox-e2e-console.$$ || fail "console does not show the agent starting"
rm -f /tmp/bandsox-e2e-console.$$
# events: follow, then cause an event, and see it arrive.
( timeout 6 tail -n 0 -f "$MNT/events" > /tmp/bandsox-e2e-events.$$ ) &
follower=$!
sleep 1.5
echo pause > "$MNT/s8/ctl"
echo resume > "$MNT/s8/ctl"
wait $follower || true
grep -q " s8 paused" /tmp/bandsox-e2e-events.$$ || fail "tail -f events missed 'paused': $(cat /tmp/bandsox-e2e-events.$$)"
grep -q " s8 resumed" /tmp/bandsox-e2e-events.$$ || fail "tail -f events missed 'resumed'"
rm -f /tmp/bandsox-e2e-events.$$
grep -q " s8 running" "$MNT/events" || fail "events has no 'running' line for s8"
# console grows and is readable by plain cat as well
[ -n "$(cat "$MNT/s8/console")" ] || fail "cat console printed nothing"
