#!/bin/bash
# Ctrl-C works while the guest does not answer (its VMM stopped with SIGSTOP): a read
# under fs/, the close of a write-only exec and a ctl command end with EINTR within a
# fraction of a second of SIGINT, SIGTERM or SIGKILL, and the VM works again afterwards.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm cs
echo hello > "$MNT/cs/fs/root/x"
id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$MNT/cs/info" | head -n1)
vmm=$(cat "$STATE/vms/$id/vmm.pid")
err=$(mktemp /var/tmp/bsx-t52.XXXXXX)
on_exit 'kill -CONT $vmm 2>/dev/null; rm -f "$err"; cleanup_vms'

# interrupted SIG CMD...: start CMD, send SIG after 1 s, check it ends within 1 s.
interrupted() {
  sig=$1; shift
  perl -e '$SIG{INT}="DEFAULT"; exec @ARGV' "$@" >/dev/null 2>"$err" &
  p=$!
  sleep 1
  kill -0 "$p" 2>/dev/null || fail "$* ended before the signal: $(cat "$err")"
  t=$(date +%s%N); kill "-$sig" "$p"
  wait_for 3 gone "$p" || fail "$* still blocked 3 s after SIG$sig"
  rc=0; wait "$p" || rc=$?
  ms=$(( ($(date +%s%N) - t) / 1000000 ))
  note "SIG$sig to $*: status $rc after ${ms} ms $(tr '\n' ' ' < "$err")"
  [ "$ms" -lt 1000 ] || fail "$* took ${ms} ms after SIG$sig"
  [ "$rc" -ne 0 ] || fail "$* succeeded"
}

kill -STOP "$vmm"
interrupted INT cat "$MNT/cs/fs/root/x.nocache" 
interrupted KILL cat "$MNT/cs/fs/root/x"
interrupted TERM ls "$MNT/cs/fs/root/"
interrupted INT bash -c "echo true > '$MNT/cs/exec'"
interrupted INT perl -MPOSIX -e '$SIG{INT}=sub {}; $fd = POSIX::open("$ENV{MNT}/cs/exec", O_WRONLY) // die; POSIX::write($fd, "true\n", 5); POSIX::close($fd) // die "close: $!\n"'
assert_contains "$(cat "$err")" "close: Interrupted system call" "close of the interrupted exec"
interrupted HUP bash -c "echo ping > '$MNT/cs/ctl'"
kill -CONT "$vmm"
assert_eq hello "$(cat "$MNT/cs/fs/root/x")" "fs/ after the guest answers again"
echo 'echo back' > "$MNT/cs/exec"
assert_eq back "$(cat "$MNT/cs/exec")" "exec after the guest answers again"
