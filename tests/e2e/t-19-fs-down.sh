#!/bin/bash
# fs/ of a paused VM fails with "Host is down" and recovers; a killed VMM ends reads.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm down
KILL_MB=256 fs_scenario down down
