#!/bin/bash
# timeout: 400
# The MCP server at /v1/mcp on a real VM, with a real MCP client (rmcp's, in
# bandsox-devtools mcp, streamable HTTP over the API's Unix socket as user A): it lists
# the tools, creates a VM (owned by A in the tree), runs a command (exit code and
# output), writes a file (seen through the tree's fs/ on the host), reads and lists it,
# pauses and resumes, and destroys the VM. User B's client sees A's VM as missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
A=1683; B=1684
VM=m83
work=$(mktemp -d /tmp/bsx-t83.XXXXXX); chmod 755 "$work"
sock=$work/api.sock
serve_pid=
stop_serve() {
  if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
on_exit stop_serve
on_exit 'rmdir "$MNT/$VM" 2>/dev/null || true'
"$BANDSOX" serve --socket "$sock" --state-dir "$STATE" >"$work/serve.log" 2>&1 &
serve_pid=$!
wait_for 20 test -S "$sock" || fail "serve did not make its socket: $(cat "$work/serve.log")"
asu() { _u=$1; shift; setpriv --reuid="$_u" --regid="$_u" --clear-groups "$@"; }
mcp() { _u=$1; shift; asu "$_u" "$BANDSOX_DEVTOOLS" mcp --socket "$sock" "$@"; }

tools=$(mcp $A tools) || fail "tools/list: $tools"
for t in list_vms create_vm delete_vm exec read_file write_file list_files vm_ctl \
  snapshot clone_snapshot; do
  grep -qx "$t" <<<"$tools" || fail "no tool $t in: $tools"
done

out=$(mcp $A "create_vm={\"name\":\"$VM\"}") || fail "create_vm: $out"
assert_contains "$out" "ok: " "create_vm: $out"
assert_eq "$A" "$(stat -c %u "$MNT/$VM")" "the VM's owner in the tree"
wait_for 120 state_is $VM running || fail "$VM did not boot: $(cat "$MNT/$VM/state")"

out=$(mcp $A "exec={\"vm\":\"$VM\",\"command\":\"echo out-\$((6*7)); echo err >&2; exit 3\",\"timeout\":60}") \
  || fail "exec: $out"
assert_contains "$out" '"exit_code":3' "exec exit code: $out"
assert_contains "$out" 'out-42' "exec stdout: $out"
assert_contains "$out" '"stderr":"err\n"' "exec stderr: $out"

out=$(mcp $A "write_file={\"vm\":\"$VM\",\"path\":\"/tmp/m83.txt\",\"content\":\"hello mcp\"}" \
  "read_file={\"vm\":\"$VM\",\"path\":\"/tmp/m83.txt\"}" \
  "list_files={\"vm\":\"$VM\",\"path\":\"/tmp\"}") || fail "files: $out"
assert_eq "hello mcp" "$(cat "$MNT/$VM/fs/tmp/m83.txt")" "the written file through the tree"
assert_contains "$out" "ok: hello mcp" "read_file: $out"
assert_contains "$out" "m83.txt" "list_files: $out"

out=$(mcp $A "vm_ctl={\"vm\":\"$VM\",\"command\":\"pause\"}") || fail "pause: $out"
assert_eq paused "$(cat "$MNT/$VM/state")" "state after pause"
out=$(mcp $A "vm_ctl={\"vm\":\"$VM\",\"command\":\"resume\"}") || fail "resume: $out"
assert_eq running "$(cat "$MNT/$VM/state")" "state after resume"

# Another user: A's VM does not exist for B (the REST rule, the same answer).
out=$(mcp $B "read_file={\"vm\":\"$VM\",\"path\":\"/tmp/m83.txt\"}" list_vms={}) || fail "B: $out"
assert_contains "$out" "error: " "B's read of A's file"
assert_contains "$out" '"code":"ENOENT"' "B gets not-found: $out"
grep -q "$VM" <<<"$(sed -n '$p' <<<"$out")" && fail "B lists A's VM: $out"

out=$(mcp $A "delete_vm={\"name\":\"$VM\"}") || fail "delete_vm: $out"
assert_contains "$out" "ok: " "delete_vm: $out"
[ ! -e "$MNT/$VM" ] || fail "$VM is still in the tree"
note "mcp ok"
