# Story 1: mkdir boots a VM; echo > exec runs a command; cat exec prints its output.
. "$(dirname "$0")/lib.sh"
new_vm s1
assert_eq running "$(cat "$MNT/s1/state")" state
echo 'uname -r' > "$MNT/s1/exec"
out=$(cat "$MNT/s1/exec")
assert_contains "$out" "cloud-amd64" "guest uname -r"
# The guest is a different kernel from the host's.
[ "$out" != "$(uname -r)" ] || fail "uname -r returned the host kernel"
echo 'hostname' > "$MNT/s1/exec"
assert_eq s1 "$(cat "$MNT/s1/exec")" hostname
