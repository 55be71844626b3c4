#!/bin/bash
# Terminal runs from a plain shell on a real VM (screen, winsize, terminal, EPIPE), and
# bandsox exec: exit codes, separate streams, stdin, --timeout (124), --env/--cwd/--user.
# timeout: 180
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm tf
BX="env BANDSOX_MOUNT=$MNT $BANDSOX"

# A terminal run started with a shell redirection; its screen shows the cursor address.
printf '#bandsox tty=40x10\nprintf "\\033[2J\\033[5;10Hmarker"; sleep 60\n' > "$MNT/tf/exec"
n=$(readlink "$MNT/tf/runs/last")
R=$MNT/tf/runs/$n
wait_for 20 grep -q marker "$R/screen" || fail "no marker on the screen: $(cat "$R/screen")"
assert_eq "         marker" "$(sed -n 5p "$R/screen")" "row 5 of the screen"
assert_eq 10 "$(wc -l < "$R/screen")" "screen rows"
assert_eq 40x10 "$(cat "$R/winsize")" "winsize"
for bad in 0x10 -1x5 1001x10 10x1001; do
  write_expect_error "$R/winsize" "$bad" "Invalid argument"
done
echo 50x12 > "$R/winsize"
assert_eq 50x12 "$(cat "$R/winsize")" "winsize after resize"
echo 'kill KILL' > "$R/ctl"
wait_for 10 sh -c "! grep -q running '$R/status'" || fail "the run did not end"
assert_eq "signal 9" "$(cat "$R/status")" "status of the killed terminal run"
write_expect_error "$R/terminal" "x" "Broken pipe"
note "terminal files ok"

# bandsox exec.
set +e
$BX exec tf -- sh -c 'echo out; echo err >&2; exit 3' >/tmp/bsx71-out.$$ 2>/tmp/bsx71-err.$$
code=$?
assert_eq 3 "$code" "exit code"
assert_eq out "$(cat /tmp/bsx71-out.$$)" "stdout"
assert_eq err "$(cat /tmp/bsx71-err.$$)" "stderr"
rm -f /tmp/bsx71-out.$$ /tmp/bsx71-err.$$
set +e; $BX exec tf -- sh -c 'kill -9 $$'; code=$?; set -e
assert_eq 137 "$code" "exit code of a command killed by SIGKILL"
assert_eq 3 "$(printf 'a\nb\nc\n' | $BX exec tf -- wc -l | tr -d ' ')" "stdin forwarded"
assert_eq "1|x y|/tmp|1234" \
  "$($BX exec tf --env A=1 --env 'B=x y' --cwd /tmp --user 1234 -- sh -c 'echo "$A|$B|$(pwd)|$(id -u)"')" \
  "env, cwd and user"
start=$(date +%s)
set +e; $BX exec tf --timeout 1 -- sleep 10 2>/dev/null; code=$?; set -e
assert_eq 124 "$code" "exit code of a timed-out command"
[ $(( $(date +%s) - start )) -lt 8 ] || fail "the timeout took too long"
# shellcheck disable=SC2010 # run numbers are digits only
last=$(ls "$MNT/tf/runs" | grep -E '^[0-9]+$' | sort -n | tail -n1)
assert_eq "timeout signal 15" "$(cat "$MNT/tf/runs/$last/status")" "status of the timed-out run"
