#!/bin/bash
# The Debian package: build it (cargo-deb), install it, start the daemon the way
# bandsox.service says (Type=notify: READY=1 must arrive on $NOTIFY_SOCKET once the mount
# answers), serve story 1 through that mount, stop it with SIGTERM (STOPPING=1, clean
# unmount, exit 0), then remove the package. Where PID 1 is not systemd (as on the
# project's machines) the unit's ExecStartPre/ExecStart run as systemd would run them:
# with the unit's Environment=, overridden the way /etc/default/bandsox would, a private
# mount point and state directory, and a NOTIFY_SOCKET this test listens on. A tree the
# host has mounted at /mnt/bandsox (the README's first command leaves one) stays mounted,
# served by the same daemon, through install and removal. Upgrades: t-65.
# timeout: 900
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/package-lib.sh"
W=$PW
pid=; listener=
finish() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null
  [ -d "$W/mnt/p63" ] && rmdir "$W/mnt/p63" 2>/dev/null
  [ -n "$pid" ] && { for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done; }
  [ -n "$listener" ] && kill "$listener" 2>/dev/null
}
on_exit finish

# shellcheck disable=SC2119 # the default build: no cargo-deb options
deb=$(pkg_build)
note "built $deb"
dpkg-deb -f "$deb" Depends | has qemu-system-x86 || fail "no Depends on qemu-system-x86"
dpkg -i "$deb" > "$W/dpkg.log" 2>&1 || fail "dpkg -i: $(cat "$W/dpkg.log")"
host_tree_untouched "after dpkg -i"
for f in /usr/bin/bandsox /usr/lib/bandsox/bandsox-agent /usr/lib/bandsox/guest-setup \
         /sbin/mount.fuse.bandsox /lib/systemd/system/bandsox.service /etc/bandsox/limits; do
  [ -e "$f" ] || fail "the package did not install $f"
done
man -w bandsox >/dev/null && man -w bandsox-tree >/dev/null || fail "man pages missing"
file /usr/lib/bandsox/bandsox-agent | grep -Eq "statically linked|static-pie linked" || fail "the packaged agent is not static"
unit=/lib/systemd/system/bandsox.service
grep -qx 'Type=notify' "$unit" || fail "the unit is not Type=notify"

# The unit's command lines and environment, as systemd would run them.
value() { sed -n "s/^$1=//p" "$unit" | head -n1; }
env_line=$(value Environment)
pre=$(value ExecStartPre)
start=$(value ExecStart)
[ -n "$start" ] && [ -n "$pre" ] || fail "no ExecStart/ExecStartPre in the unit"
# shellcheck disable=SC2086,SC2163 # env_line is NAME=VALUE words, split on purpose
export $env_line
# What /etc/default/bandsox would say on this machine.
export BANDSOX_STATE_DIR=$W/state BANDSOX_MOUNT=$W/mnt BANDSOX_LIMITS=$LIMITS
if [ -d /run/systemd/system ]; then
  note "PID 1 is systemd, but this test never touches the host's service: running the unit's commands directly"
fi
# ExecStartPre: the guest artefacts are current (same agent), so nothing is rebuilt.
sh -c "$pre" > "$W/pre.log" 2>&1 || fail "ExecStartPre failed: $(tail -n 20 "$W/pre.log")"
# NOTIFY_SOCKET: a datagram socket, one line per message received.
python3 - "$W/notify.sock" "$W/notify.log" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as out:
    while True:
        msg = s.recv(4096).decode(errors="replace")
        out.write(msg.replace("\n", " ") + "\n")
PY
listener=$!
wait_for 10 test -S "$W/notify.sock" || fail "notify listener did not start"
: > "$W/notify.log"
# systemd expands ${VAR} from the environment, then runs the command (no shell).
cmd=$(eval "echo $start")
note "ExecStart: $cmd"
# shellcheck disable=SC2086
NOTIFY_SOCKET=$W/notify.sock setsid $cmd > "$W/daemon.log" 2>&1 &
pid=$!
wait_for 60 grep -q 'READY=1' "$W/notify.log" || fail "no READY=1: $(cat "$W/notify.log"); $(tail -n 20 "$W/daemon.log")"
# READY means the mount answers now.
grep -q BandSox "$W/mnt/README" || fail "READY=1 before the mount answered"
grep -q 'STATUS=serving' "$W/notify.log" || fail "no STATUS line"

# Story 1 through the package's daemon.
mkdir "$W/mnt/p63" || fail "mkdir failed: $(cat "$W/mnt/p63/state" 2>/dev/null)"
echo 'uname -r' > "$W/mnt/p63/exec"
out=$(cat "$W/mnt/p63/exec")
kver=$(sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' "$W/state/boot/kernel.json")
assert_eq "$kver" "$out" "uname -r in the guest"
rmdir "$W/mnt/p63"

# systemctl stop: SIGTERM to the main process (KillMode=process).
kill -TERM "$pid"
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "the daemon did not stop within 10 s of SIGTERM"
rc=0; wait "$pid" || rc=$?
pid=
[ "$rc" = 0 ] || fail "the daemon exited with $rc on SIGTERM: $(tail -n 20 "$W/daemon.log")"
grep -q 'STOPPING=1' "$W/notify.log" || fail "no STOPPING=1"
mountpoint -q "$W/mnt" && fail "still mounted after stop"
dpkg -r bandsox > "$W/dpkg.log" 2>&1 || fail "dpkg -r: $(cat "$W/dpkg.log")"
[ -e /usr/bin/bandsox ] && fail "dpkg -r left /usr/bin/bandsox"
host_tree_untouched "after dpkg -r"
true
