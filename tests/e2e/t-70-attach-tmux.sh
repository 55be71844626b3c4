#!/bin/bash
# bandsox attach in a real terminal (tmux) on a real VM: tty and stty size, resize,
# Ctrl-C, busybox vi, detach and re-attach (redrawn), exit code, host terminal restored.
# timeout: 240
set -euo pipefail
. "$(dirname "$0")/lib.sh"
command -v tmux >/dev/null || fail "tmux is not installed (mount-helpers/ensure-deps installs it)"
new_vm tt
W=$(mktemp -d)
SOCK=bsx-e2e-$$
T="tmux -L $SOCK -f /dev/null"
finish() { $T kill-server 2>/dev/null || true; rm -rf "$W"; }
on_exit finish
$T new-session -d -s t -x 100 -y 30 "bash --norc --noprofile"
$T set -g status off
pane() { $T capture-pane -p -t t; }
# wait_pane SECONDS TEXT: the visible pane shows TEXT.
wait_pane() {
  wait_for "$1" sh -c "$T capture-pane -p -t t | grep -qF -- \"\$0\"" "$2" \
    || fail "the pane never showed [$2]:
$(pane)"
}
keys() { $T send-keys -t t "$@"; }
ATTACH="BANDSOX_MOUNT=$MNT $BANDSOX attach tt"

keys "PS1='host$ '; stty -a > $W/before; $ATTACH; echo ATTACH-EXIT=\$?; stty -a > $W/after" Enter
keys 'tty; stty size' Enter
wait_pane 30 "/dev/pts/"
wait_pane 10 "30 100"
note "tty and size ok"

# The window follows tmux.
$T resize-window -t t -x 120 -y 40
sleep 1
keys 'stty size' Enter
wait_pane 10 "40 120"
note "resize ok"

# Ctrl-C interrupts the foreground sleep; the shell survives.
keys 'sleep 100; echo AFTER-$((6*7))' Enter
sleep 1.5
keys C-c
keys 'echo ALIVE-$((2*3))' Enter
wait_pane 10 "ALIVE-6"
pane | grep -q "AFTER-42" && fail "sleep was not interrupted: $(pane)"
note "ctrl-c ok"

# busybox vi: insert, escape, write and quit.
keys 'vi /root/v.txt' Enter
sleep 2
keys 'ihello' Escape
sleep 0.5
keys ':wq' Enter
wait_for 15 sh -c "[ \"\$(cat '$MNT/tt/fs/root/v.txt' 2>/dev/null)\" = hello ]" \
  || fail "vi did not write hello: [$(cat "$MNT/tt/fs/root/v.txt" 2>&1)] pane: $(pane)"
note "vi ok"

# Detach (Ctrl-] d): the run stays; re-attaching redraws the screen.
keys 'clear; echo BEFORE-DETACH-$((5*5))' Enter
wait_pane 10 "BEFORE-DETACH-25"
keys C-] d
wait_pane 10 "ATTACH-EXIT=0"
n=$(pane | sed -n 's/.*--run \([0-9][0-9]*\).*/\1/p' | tail -n1)
[ -n "$n" ] || fail "no run number in the detach message: $(pane)"
assert_eq running "$(cat "$MNT/tt/runs/$n/status")" "run $n after detach"
keys "clear; $ATTACH --run $n; echo ATTACH-EXIT=\$?; stty -a > $W/after" Enter
wait_pane 20 "BEFORE-DETACH-25"
note "re-attach redraw ok"
keys 'echo again-$((3*3))' Enter
wait_pane 10 "again-9"

# exit 7 ends the run and attach with 7; the host terminal is as it was.
keys 'exit 7' Enter
wait_pane 15 "ATTACH-EXIT=7"
assert_eq 7 "$(cat "$MNT/tt/runs/$n/status")" "run status"
wait_for 5 test -s "$W/after" || fail "no stty -a after attach"
# The first line holds the size, which the resize changed.
diff <(sed 1d "$W/before") <(sed 1d "$W/after") || fail "stty -a changed after attach"
