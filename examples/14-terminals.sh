#!/bin/bash
# Terminals and per-command options from a plain shell (issue 14): a terminal run driven
# through its files, its screen read as text, a resize, per-command env/cwd/timeout, and
# the same through `bandsox exec` (`bandsox attach demo14` gives an interactive shell;
# Ctrl-] d detaches).
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
mkdir "$B/demo14"

# A terminal run: the close returns once it started; runs/last names it.
printf '#bandsox tty=60x12\nexec /bin/sh\n' > "$B/demo14/exec"
r=$B/demo14/runs/$(readlink "$B/demo14/runs/last")
printf 'stty size; tty\r' > "$r/terminal"        # keystrokes: Enter is \r
sleep 1
cat "$r/screen"                                   # 12 lines of what the terminal shows
echo 80x24 > "$r/winsize"                         # SIGWINCH in the guest
printf 'stty size\r' > "$r/terminal"
sleep 1
grep -q '24 80' "$r/screen" && echo "resized"
printf 'exit 3\r' > "$r/terminal"
sleep 1
cat "$r/status"                                   # 3

# Per-command options: one command's env, cwd and timeout; the VM's defaults unchanged.
printf '%s\n' "#bandsox env='GREETING=hello there' cwd=/tmp timeout=5" 'echo "$GREETING from $(pwd)"' \
  > "$B/demo14/exec"
cat "$B/demo14/exec"                              # hello there from /tmp
printf '#bandsox timeout=1\nsleep 30\n' > "$B/demo14/exec"
cat "$B/demo14/runs/last/status"                  # timeout signal 15

# The same as a client, with separate streams and the command's exit code.
if command -v bandsox >/dev/null; then
  BANDSOX_MOUNT=$B bandsox exec demo14 --env A=1 -- sh -c 'echo "A=$A"; echo oops >&2; exit 4' \
    || echo "exit code $?"                        # A=1, oops (stderr), exit code 4
  BANDSOX_MOUNT=$B bandsox exec demo14 --timeout 1 -- sleep 10 || echo "exit code $?"   # 124
fi
rmdir "$B/demo14"
