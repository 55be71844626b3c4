#!/bin/bash
# timeout: 240
# Remote use: the tree mounted over SSH with sshfs (sftp-server writes with pwrite at
# explicit offsets). Stories 1, 2, 5 and 7 run through it. The test starts its own sshd
# on 127.0.0.1 (own config, host key and client key) and stops it at the end.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
command -v sshfs >/dev/null || fail "sshfs is not installed (mount-helpers/ensure-deps installs it)"
[ -x /usr/sbin/sshd ] || fail "sshd is not installed (mount-helpers/ensure-deps installs openssh-server)"

d=$(mktemp -d /var/tmp/bsx-t54.XXXXXX)
R=$d/remote
port=$(( 20000 + $$ % 20000 ))
stop() {
  fusermount3 -u "$R" 2>/dev/null || umount -l "$R" 2>/dev/null || true
  [ -f "$d/sshd.pid" ] && kill "$(cat "$d/sshd.pid")" 2>/dev/null
  cleanup_vms
  rm -rf "$d"
}
on_exit stop
mkdir -p "$R" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$d/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$d/id"
cp "$d/id.pub" "$d/authorized_keys"
cat > "$d/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $port
HostKey $d/hostkey
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
CONF
/usr/sbin/sshd -f "$d/sshd_config" -E "$d/sshd.log" || fail "sshd did not start: $(cat "$d/sshd.log")"
wait_for 10 test -s "$d/sshd.pid" || fail "sshd wrote no pid file"
# sshfs_sync + direct_io: writes are answered one by one, so a refused write fails the
# write(2) that made it, and control files are read fresh every time.
sshfs -p "$port" "root@127.0.0.1:$MNT" "$R" \
  -o IdentityFile="$d/id",StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,LogLevel=ERROR \
  -o sshfs_sync,direct_io,cache=no || fail "sshfs mount failed: $(tail -n 5 "$d/sshd.log")"

# Story 1: mkdir boots; exec runs; cat prints.
mkdir "$R/rs" || fail "mkdir over sshfs: $(cat "$MNT/ctl")"
VMS="rs"
assert_eq running "$(cat "$R/rs/state")" "state over sshfs"
echo 'uname -r' > "$R/rs/exec"
assert_contains "$(cat "$R/rs/exec")" "cloud-amd64" "exec output over sshfs"

# Story 2: #! script, status through runs/last.
printf '#!/bin/sh\nexit 3\n' > "$R/rs/exec"
assert_eq 3 "$(cat "$R/rs/runs/last/status")" "status over sshfs"
# A remote user finds their run by its command too (runs/last follows the one sftp
# session, shared by everyone on that connection).
n=$(grep -l 'exit 3' "$R"/rs/runs/[0-9]*/cmd | tail -n1 | xargs dirname | xargs basename)
assert_eq 3 "$(cat "$R/rs/runs/$n/status")" "status of the run found by its cmd"

# Story 5: pause/resume.
echo pause > "$R/rs/ctl"
assert_eq paused "$(cat "$R/rs/state")" "state after pause over sshfs"
echo resume > "$R/rs/ctl"
assert_eq running "$(cat "$R/rs/state")" "state after resume over sshfs"

# Story 7: a bad command fails the write; ctl explains; nothing changed.
err=$( { echo bogus > "$R/rs/ctl"; } 2>&1 ) && fail "bogus command over sshfs succeeded"
note "bogus over sshfs: $err"
assert_contains "$(cat "$R/rs/ctl")" 'error: unknown command "bogus"' "ctl after bogus"
assert_eq running "$(cat "$R/rs/state")" "state after bogus"

# The positional writes sftp-server makes land as appends; a script in several writes.
{ echo 'echo one'; echo 'echo two'; } > "$R/rs/exec"
assert_eq "one
two" "$(cat "$R/rs/exec")" "a script written in pieces over sshfs"

fusermount3 -u "$R" || fail "sshfs unmount failed"
