#!/bin/bash
# Story 2: a script's exit code.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo2"
printf '#!/bin/sh\necho working\nexit 3\n' > "$B/demo2/exec"
echo "output: $(cat "$B/demo2/exec")"
echo "status: $(cat "$B/demo2/runs/last/status")"     # 3
rmdir "$B/demo2"
