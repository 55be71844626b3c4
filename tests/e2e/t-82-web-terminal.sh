#!/bin/bash
# timeout: 400
# The web terminal on a real VM, through `bandsox serve` on loopback TCP, with a real
# WebSocket client (bandsox-devtools wsterm, tokio-tungstenite): no key → 401, another
# Origin → 403; a new terminal run (the key in Sec-WebSocket-Protocol) runs a typed
# command and shows its output, Ctrl-C arrives as a keystroke, a resize reaches the
# guest (`stty size`) and the tree (`winsize`); the socket closes and the run stays;
# a second socket re-attaches and starts with the redrawn screen; two sockets watch one
# run at once; `exit 7` ends the run and the socket reports exit 7.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
VM=w82
work=$(mktemp -d /tmp/bsx-t82.XXXXXX)
sock=$work/api.sock
port=$((20000 + RANDOM % 20000))
serve_pid=
stop_serve() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
on_exit stop_serve
new_vm $VM
"$BANDSOX" serve --socket "$sock" --listen "127.0.0.1:$port" --state-dir "$STATE" \
  >"$work/serve.log" 2>&1 &
serve_pid=$!
wait_for 20 curl -s -o /dev/null "http://127.0.0.1:$port/v1/openapi.json" \
  || fail "serve does not answer on TCP: $(cat "$work/serve.log")"
key=$("$BANDSOX" keys --socket "$sock" add t82) || fail "keys add"
wait_for 120 state_is $VM running || fail "$VM did not boot: $(cat "$MNT/$VM/state")"

ws=ws://127.0.0.1:$port/v1/vms/$VM
term() { "$BANDSOX_DEVTOOLS" wsterm --timeout 90 "$@"; }

# No key: 401. A page of another site: 403, key or not.
out=$(term "$ws/terminal" 2>&1) && fail "a terminal without a key was opened"
assert_contains "$out" "status 401" "no key"
out=$(term --key "$key" --origin http://evil.example "$ws/terminal" 2>&1) \
  && fail "a cross-site WebSocket was accepted"
assert_contains "$out" "status 403" "cross-site WebSocket"
out=$(term --key bsx_wrong "$ws/terminal" 2>&1) && fail "a wrong key was accepted"
assert_contains "$out" "status 401" "wrong key"

# A new terminal: type, see the output (the arithmetic shows the shell ran it, not the
# echo of the typing); Ctrl-C (byte 3) interrupts a sleep; resize; the socket closes.
out=$(term --key "$key" --origin "http://127.0.0.1:$port" "$ws/terminal?cols=80&rows=24" \
  "send=echo hi-\$((40+2))"$'\r' expect=hi-42 \
  "send=echo st-\$((1+1)); sleep 100"$'\r' expect=st-2 "send="$'\003' "send=echo after-\$((2+3))"$'\r' expect=after-5 \
  resize=120x40 "send=stty size"$'\r' "expect=40 120") || fail "new terminal: $out"
n=$(sed -n 's/^run //p' <<<"$out")
[ -n "$n" ] || fail "no run number in: $out"
R=$MNT/$VM/runs/$n
assert_eq 120x40 "$(cat "$R/winsize")" "winsize in the tree after the resize"
grep -q running "$R/status" || fail "closing the socket ended the run: $(cat "$R/status")"
grep -q hi-42 "$R/screen" || fail "the tree's screen lacks the output: $(cat "$R/screen")"
note "new terminal ok (run $n)"

# Two sockets on one run at once; each sees the other's command's output.
term --key "$key" "$ws/runs/$n/terminal" expect=both-2 >"$work/watch.out" 2>&1 &
watcher=$!
term --key "$key" "$ws/runs/$n/terminal" "send=echo both-\$((1+1))"$'\r' expect=both-2 \
  >/dev/null || fail "second socket"
wait "$watcher" || fail "the watching socket did not see the output: $(cat "$work/watch.out")"

# Re-attach after the "browser" went away: the redraw shows the screen; exit ends it.
out=$(term --key "$key" "$ws/runs/$n/terminal" expect=after-5 "send=exit 7"$'\r' exit) \
  || fail "re-attach: $out"
assert_contains "$out" "exit 7" "the exit message"
assert_eq 7 "$(cat "$R/status")" "the run's status in the tree"

# A run without a terminal has no web terminal.
echo true > "$MNT/$VM/exec"
m=$(readlink "$MNT/$VM/runs/last")
out=$(term --key "$key" "$ws/runs/$m/terminal" 2>&1) && fail "attached to a run without tty"
assert_contains "$out" "status 4" "a run without a terminal is refused"
note "web terminal ok"
