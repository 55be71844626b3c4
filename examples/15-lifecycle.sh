#!/bin/bash
# A throwaway sandbox: it pauses itself when idle, resumes when used, and removes itself
# after its time-to-live; destroy-all clears everything of yours at once.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
echo 'create scratch ttl=300 idle_pause=5' > "$B/ctl"
grep ttl_remaining_s "$B/scratch/info"              # "ttl_remaining_s": 299,
sleep 7; cat "$B/scratch/state"                     # paused (idle for 5 s)
echo 'echo still here' > "$B/scratch/exec"          # resumes it first, then runs
cat "$B/scratch/exec"                               # still here
grep -E ' scratch (paused|resumed) ' "$B/events"    # ... paused reason=idle / resumed reason=exec
echo ttl=2 > "$B/scratch/ctl"; sleep 4
ls "$B/scratch" 2>/dev/null || echo "scratch is gone"
mkdir "$B/tmp1" "$B/tmp2"
# destroy-all removes ALL of your VMs, not only these two.
echo destroy-all > "$B/ctl"; cat "$B/ctl"           # ok: destroyed N of your VMs
