#!/bin/bash
# timeout: 600
# The REST API end to end on a real VM: `bandsox serve` on a Unix socket and a loopback
# TCP port, handing connections to the mounted daemon. User A creates a VM over the
# socket (SO_PEERCRED: no key), runs a command (exit code, stdout, stderr, env, cwd),
# uploads a file with all 256 byte values and sees it through the tree's fs/ on the host,
# downloads it back byte-identical (and a Range of it), mkdir/rename/stat/delete in the
# guest; over TCP a request without a key gets 401, A's key works, B's key (and B over
# the socket) get 404 for A's VM exactly like a missing one, a revoked key gets 401 at
# once; the VM is deleted over the API and is gone from the tree. A serve whose daemon is
# away answers 503 with Retry-After.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
A=1681; B=1682
VM=r80
work=$(mktemp -d /tmp/bsx-t80.XXXXXX); chmod 755 "$work"
mkdir "$work/a"; chown "$A:$A" "$work/a"   # where user A's downloads go
sock=$work/api.sock
port=$((20000 + RANDOM % 20000))
asu() { _u=$1; shift; setpriv --reuid="$_u" --regid="$_u" --clear-groups "$@"; }
# api USER METHOD PATH [curl args...]: a request over the Unix socket as USER; prints
# the body then the status on a line of its own.
api() {
  _u=$1; _m=$2; _p=$3; shift 3
  asu "$_u" curl -sS --max-time 120 --unix-socket "$sock" -X "$_m" -w '\n%{http_code}' "$@" \
    "http://localhost$_p"
}
# tcp METHOD PATH [curl args...]: the same over TCP (no implicit key).
tcp() {
  _m=$1; _p=$2; shift 2
  curl -sS --max-time 120 -X "$_m" -w '\n%{http_code}' "$@" "http://127.0.0.1:$port$_p"
}
status() { tail -n1 <<<"$1"; }
body() { sed '$d' <<<"$1"; }
# field NAME: a scalar JSON field of a compact object on stdin.
field() { sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p" | head -n1; }

serve_pid=; dead_pid=
stop_serve() {
  for p in $serve_pid $dead_pid; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
on_exit stop_serve
on_exit 'rmdir "$MNT/$VM" 2>/dev/null || true'

"$BANDSOX" serve --socket "$sock" --listen "127.0.0.1:$port" --state-dir "$STATE" \
  >"$work/serve.log" 2>&1 &
serve_pid=$!
wait_for 20 test -S "$sock" || fail "serve did not make its socket: $(cat "$work/serve.log")"
wait_for 20 curl -s -o /dev/null "http://127.0.0.1:$port/v1/openapi.json" \
  || fail "serve does not answer on TCP"

# A non-loopback address without TLS is refused.
out=$("$BANDSOX" serve --socket "$work/x.sock" --listen 0.0.0.0:1 --state-dir "$STATE" 2>&1) \
  && fail "a public --listen without TLS was accepted"
assert_contains "$out" "insecure-public" "the refusal says how"

# Create as A over the socket.
r=$(api $A POST /v1/vms -H 'content-type: application/json' -d "{\"name\":\"$VM\"}")
assert_eq 201 "$(status "$r")" "create: $(body "$r")"
assert_eq "$A" "$(stat -c %u "$MNT/$VM")" "the VM's owner in the tree"
assert_eq running "$(cat "$MNT/$VM/state")" "state in the tree"

# Synchronous exec.
r=$(api $A POST "/v1/vms/$VM/exec" -H 'content-type: application/json' \
  -d '{"command":"echo out-$X; echo err >&2; pwd; exit 3","env":{"X":"7"},"cwd":"/tmp","timeout":60}')
assert_eq 200 "$(status "$r")" "exec: $(body "$r")"
b=$(body "$r")
assert_eq 3 "$(field exit_code <<<"$b")" "exit code: $b"
assert_contains "$b" '"stdout":"out-7\n/tmp\n"' "stdout"
assert_contains "$b" '"stderr":"err\n"' "stderr"

# Files: every byte value up, seen in the tree, and back down byte-identical.
perl -e 'print map { chr } (0 .. 255) x 4' >"$work/all"
chmod 644 "$work/all"
r=$(api $A POST "/v1/vms/$VM/fs/tmp/d80" -H 'content-type: application/json' -d '{"op":"mkdir"}')
assert_eq 2 "$(status "$r" | cut -c1)" "mkdir: $(body "$r")"
r=$(api $A PUT "/v1/vms/$VM/fs/tmp/d80/all" --data-binary "@$work/all")
assert_eq 2 "$(status "$r" | cut -c1)" "upload: $(body "$r")"
cmp "$work/all" "$MNT/$VM/fs/tmp/d80/all" || fail "the upload differs in the tree's fs/"
asu $A curl -sS --unix-socket "$sock" -o "$work/a/back" "http://localhost/v1/vms/$VM/fs/tmp/d80/all"
cmp "$work/all" "$work/a/back" || fail "the download differs from the upload"
asu $A curl -sS --unix-socket "$sock" -r 250-261 -o "$work/a/range" \
  "http://localhost/v1/vms/$VM/fs/tmp/d80/all"
cmp "$work/a/range" <(tail -c +251 "$work/all" | head -c 12) || fail "the Range answer differs"
r=$(api $A GET "/v1/vms/$VM/fs/tmp/d80/all?stat=true")
assert_eq 1024 "$(body "$r" | field size)" "stat size: $(body "$r")"
r=$(api $A POST "/v1/vms/$VM/fs/tmp/d80/all" -H 'content-type: application/json' \
  -d '{"op":"rename","to":"/tmp/d80/moved"}')
assert_eq 2 "$(status "$r" | cut -c1)" "rename: $(body "$r")"
test -e "$MNT/$VM/fs/tmp/d80/moved" || fail "the rename is not seen in the tree"
r=$(api $A GET "/v1/vms/$VM/fs/tmp/d80")
assert_contains "$(body "$r")" '"moved"' "listing"
r=$(api $A GET "/v1/vms/$VM/fs/tmp/d80/all")
assert_eq 404 "$(status "$r")" "the old name"
assert_contains "$(body "$r")" '"code":"ENOENT"' "the error body"
r=$(api $A DELETE "/v1/vms/$VM/fs/tmp/d80/moved")
assert_eq 2 "$(status "$r" | cut -c1)" "delete a file: $(body "$r")"

# Keys over TCP.
r=$(tcp GET /v1/vms)
assert_eq 401 "$(status "$r")" "no key over TCP"
keyA=$(asu $A "$BANDSOX" keys --socket "$sock" add laptop) || fail "keys add as A"
keyB=$(asu $B "$BANDSOX" keys --socket "$sock" add other) || fail "keys add as B"
asu $A "$BANDSOX" keys --socket "$sock" list | has laptop || fail "A does not list A's key"
asu $B "$BANDSOX" keys --socket "$sock" list | has laptop && fail "B lists A's key"
grep -q "$keyA" "$STATE/api-keys.json" && fail "a key is stored in clear"
r=$(tcp GET "/v1/vms/$VM" -H "Authorization: Bearer $keyA")
assert_eq 200 "$(status "$r")" "A's key: $(body "$r")"
r=$(tcp GET "/v1/vms/$VM" -H "Authorization: Bearer ${keyA}x")
assert_eq 401 "$(status "$r")" "a wrong key"
# B: A's VM is exactly a missing one (same status and error code).
miss=$(tcp GET /v1/vms/no-such-vm -H "Authorization: Bearer $keyB")
for how in tcp sock; do
  if [ $how = tcp ]; then r=$(tcp GET "/v1/vms/$VM" -H "Authorization: Bearer $keyB")
  else r=$(api $B GET "/v1/vms/$VM"); fi
  assert_eq 404 "$(status "$r")" "B ($how) on A's VM"
  assert_eq "$(body "$miss" | field code)" "$(body "$r" | field code)" "B's error code ($how)"
done
r=$(tcp POST "/v1/vms/$VM/exec" -H "Authorization: Bearer $keyB" \
  -H 'content-type: application/json' -d '{"command":"true"}')
assert_eq 404 "$(status "$r")" "B's exec in A's VM"
r=$(api $B GET /v1/vms)
assert_contains "$(body "$r")" "[" "B's list"
body "$r" | has "\"$VM\"" && fail "B lists A's VM"
# A cross-site browser request is refused.
r=$(tcp POST "/v1/vms/$VM/ctl" -H "Authorization: Bearer $keyA" -H 'Origin: http://evil.example' \
  -H 'content-type: application/json' -d '{"command":"pause"}')
assert_eq 403 "$(status "$r")" "a cross-site request"
assert_eq running "$(cat "$MNT/$VM/state")" "the refused request changed nothing"
# Revocation takes effect at once.
asu $A "$BANDSOX" keys --socket "$sock" revoke laptop || fail "revoke"
r=$(tcp GET "/v1/vms/$VM" -H "Authorization: Bearer $keyA")
assert_eq 401 "$(status "$r")" "a revoked key"
asu $B "$BANDSOX" keys --socket "$sock" revoke other

# Delete over the API: gone from the tree too.
r=$(api $A DELETE "/v1/vms/$VM")
assert_eq 2 "$(status "$r" | cut -c1)" "delete: $(body "$r")"
test -e "$MNT/$VM" && fail "the VM is still in the tree"
r=$(api $A GET "/v1/vms/$VM")
assert_eq 404 "$(status "$r")" "after delete"

# A serve with no daemon behind it answers 503 with Retry-After.
mkdir "$work/nostate"
"$BANDSOX" serve --socket "$work/dead.sock" --state-dir "$work/nostate" >"$work/dead.log" 2>&1 &
dead_pid=$!
wait_for 20 test -S "$work/dead.sock" || fail "the second serve did not start"
h=$(curl -sS -D - -o "$work/503" --unix-socket "$work/dead.sock" http://localhost/v1/vms)
assert_contains "$h" " 503" "no daemon"
grep -qi "^retry-after: 1" <<<"$h" || fail "no daemon: no Retry-After: $h"
assert_contains "$(cat "$work/503")" '"errno"' "the 503 body"
