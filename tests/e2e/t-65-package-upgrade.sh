#!/bin/bash
# The Debian package installed, upgraded, removed and purged on a host whose trees are
# mounted, the way people do it, with a VM running throughout:
# 1. install (dpkg -i) while the configured mount point (/etc/default/bandsox) is mounted
#    by a daemon that is not the package's: it is left alone, mounted and serving;
# 2. the package's daemon serves it; a VM runs a long process;
# 3. upgrade to a rebuilt package (a higher Debian revision) with `apt-get install
#    ./bandsox_….deb`: prerm stops the daemon, postinst starts the new binary with the
#    same command line and environment, which adopts the VM: same id, same VMM, same
#    boot, the process still alive, exec works;
# 4. reinstall while the package's daemon is dead (SIGKILL; its mount's connection
#    aborted): the maintainer scripts never stat the dead mount;
# 5. remove while the package's daemon serves the tree: it is stopped, the VM keeps
#    running, and the next daemon adopts it;
# 6. purge while mounted by another daemon: that mount and the state directory stay; a
#    last install and purge with nothing mounted removes the empty mount point.
# Throughout, the host's own /mnt/bandsox, when mounted (the README's first command
# leaves it so), keeps its daemon and answers. Where PID 1 is systemd the same steps
# apply to daemons outside bandsox.service; the unit's own branch (deb-systemd-invoke) runs
# against recorders of systemctl and deb-systemd-invoke (7).
# timeout: 900
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/package-lib.sh"

VM=$PW/mnt/u
vmm=
vm_id() { sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$VM/info" | head -n1; }
guest() { echo "$1" > "$VM/exec" && cat "$VM/exec"; }
tree_daemon() { "$BANDSOX" mount "$PW/mnt" --state-dir "$PW/state" --limits "$LIMITS"; }
pkg_op() { # LOG CMD...: run a dpkg/apt command, failing with its output; shows what the
  local log=$PW/$1 l; shift    # maintainer scripts said
  timeout 300 "$@" > "$log" 2>&1 || fail "$*: $(tail -n 30 "$log")"
  note "$*"
  while IFS= read -r l; do note "  $l"; done < <(grep '^bandsox: ' "$log" || true)
}
finish() {
  [ -n "$vmm" ] || return 0
  # Stop the VM through a daemon (the tree's own when the package's is gone).
  [ -n "$(pkg_daemon)" ] || tree_daemon >/dev/null 2>&1
  [ -d "$VM" ] && rmdir "$VM"
  [ -n "$vmm" ] && kill -9 "$vmm" 2>/dev/null
}
on_exit finish

deb1=$(pkg_build)
deb2=$(pkg_build --deb-revision 99)
v1=$(dpkg-deb -f "$deb1" Version); v2=$(dpkg-deb -f "$deb2" Version)
dpkg --compare-versions "$v2" gt "$v1" || fail "rebuilt package $v2 is not newer than $v1"
note "built $v1 and $v2"

# The unit's EnvironmentFile names the mount point and state directory; the maintainer
# scripts read it too.
cat > /etc/default/bandsox <<EOF
BANDSOX_STATE_DIR=$PW/state
BANDSOX_MOUNT=$PW/mnt
BANDSOX_LIMITS=$LIMITS
EOF

# 1. Install over a mounted tree whose daemon is not the package's.
tree_daemon || fail "the tree's daemon did not mount $PW/mnt"
other=$(pkg_daemon)
pkg_op install1.log dpkg -i "$deb1"
has -F "$PW/mnt is a mount point; left as it is" < "$PW/install1.log" \
  || fail "postinst did not see the mounted $PW/mnt: $(cat "$PW/install1.log")"
has -F "(pid $other) serves $PW/mnt; not this package's daemon, left alone" < "$PW/install1.log" \
  || fail "postinst did not name the other daemon: $(cat "$PW/install1.log")"
assert_eq "$other" "$(pkg_daemon)" "the daemon of $PW/mnt after dpkg -i"
grep -q BandSox "$PW/mnt/README" || fail "$PW/mnt does not answer after dpkg -i"
host_tree_untouched "after dpkg -i"
# Enabled as debhelper enables units (deb-systemd-helper works whatever PID 1 is); not started.
[ -L /etc/systemd/system/multi-user.target.wants/bandsox.service ] || fail "the unit was not enabled"
"$BANDSOX" unmount "$PW/mnt"
wait_for 10 gone "$other" || fail "the tree's daemon did not exit after unmount"

# 2. The package's daemon, a VM, and a process in it that must survive the upgrade.
/usr/bin/bandsox mount "$PW/mnt" --state-dir "$PW/state" || fail "the package's daemon did not start"
d1=$(pkg_daemon)
assert_eq /usr/bin/bandsox "$(readlink "/proc/$d1/exe")" "the daemon's binary"
mkdir "$VM" || fail "mkdir failed: $(cat "$VM/state" 2>/dev/null)"
id=$(vm_id)
vmm=$(cat "$PW/state/vms/$id/vmm.pid")
boot=$(guest 'cat /proc/sys/kernel/random/boot_id')
[ -n "$boot" ] || fail "no boot id"
printf '#bandsox wait=0\nexec sleep 100000\n' > "$VM/exec"
wait_for 20 test -s "$VM/runs/last/pid" || fail "the long run has no pid"
gpid=$(cat "$VM/runs/last/pid")
assert_eq alive "$(guest "kill -0 $gpid && echo alive")" "the long process before the upgrade"

# 3. Upgrade, as people do.
pkg_op upgrade.log apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 "$deb2"
assert_eq "$v2" "$(dpkg-query -W -f='${Version}' bandsox)" "installed version"
has -F "stopping the daemon on $PW/mnt (pid $d1)" < "$PW/upgrade.log" \
  || fail "prerm did not stop the daemon: $(cat "$PW/upgrade.log")"
has -F "starting again: /usr/bin/bandsox mount $PW/mnt" < "$PW/upgrade.log" \
  || fail "postinst did not start it again: $(cat "$PW/upgrade.log")"
gone "$d1" || fail "the old daemon still runs"
d2=$(pkg_daemon)
[ -n "$d2" ] || fail "no daemon on $PW/mnt after the upgrade: $(tail -n 20 "$PW/state/daemon.log")"
assert_eq /usr/bin/bandsox "$(readlink "/proc/$d2/exe")" "the new daemon's binary"
tr '\0' '\n' < "/proc/$d2/environ" | has -x "BANDSOX_LIMITS=$LIMITS" || fail "the daemon's environment was not kept"
assert_eq running "$(adopted "$VM")" "VM state after the upgrade"
assert_eq "$id" "$(vm_id)" "VM id after the upgrade"
assert_eq "$vmm" "$(cat "$PW/state/vms/$id/vmm.pid")" "VMM pid after the upgrade"
kill -0 "$vmm" || fail "the VMM died"
assert_eq "$boot" "$(guest 'cat /proc/sys/kernel/random/boot_id')" "boot id (the guest did not reboot)"
assert_eq alive "$(guest "kill -0 $gpid && echo alive")" "the long process after the upgrade"
assert_eq ok "$(guest 'echo ok')" "exec after the upgrade"
[ -e /run/bandsox-package ] && fail "postinst left /run/bandsox-package"
host_tree_untouched "after the upgrade"

# 4. Reinstall while the package's daemon is dead: its mount stays in the mount table
# with an aborted connection, which a stat would fail on.
kill -9 "$d2"
wait_for 10 gone "$d2" || fail "the daemon did not die"
pkg_mounted || fail "the dead mount left the mount table"
pkg_op dead.log dpkg -i "$deb2"
has -F "$PW/mnt is a mount point; left as it is" < "$PW/dead.log" || fail "$(cat "$PW/dead.log")"
[ -z "$(pkg_daemon)" ] || fail "a daemon was started on the dead mount"
/usr/bin/bandsox mount "$PW/mnt" --state-dir "$PW/state" || fail "mount over the dead mount failed"
assert_eq running "$(adopted "$VM")" "VM state after the dead-mount reinstall"
assert_eq alive "$(guest "kill -0 $gpid && echo alive")" "the long process after the dead-mount reinstall"
host_tree_untouched "after the reinstall"

# 5. Remove while the package's daemon serves the tree.
d3=$(pkg_daemon)
pkg_op remove.log dpkg -r bandsox
has -F "stopping the daemon on $PW/mnt (pid $d3)" < "$PW/remove.log" || fail "$(cat "$PW/remove.log")"
gone "$d3" || fail "the package's daemon outlived its removal"
pkg_mounted && fail "$PW/mnt is still mounted after the removal"
[ -e /usr/bin/bandsox ] && fail "dpkg -r left /usr/bin/bandsox"
[ -e /run/bandsox-package ] && fail "dpkg -r left /run/bandsox-package"
kill -0 "$vmm" || fail "the VMM died with the removal"
tree_daemon || fail "the tree's daemon did not mount $PW/mnt after the removal"
assert_eq running "$(adopted "$VM")" "VM state after the removal"
assert_eq alive "$(guest "kill -0 $gpid && echo alive")" "the long process after the removal"
host_tree_untouched "after dpkg -r"

# 6. Purge while mounted (by the tree's daemon).
other=$(pkg_daemon)
pkg_op install2.log dpkg -i "$deb2"
assert_eq "$other" "$(pkg_daemon)" "the daemon of $PW/mnt after dpkg -i"
pkg_op purge.log dpkg -P bandsox
assert_eq "$other" "$(pkg_daemon)" "the daemon of $PW/mnt after dpkg -P"
grep -q BandSox "$PW/mnt/README" || fail "$PW/mnt does not answer after the purge"
[ -e "$PW/state/vms/$id/vmm.pid" ] || fail "the purge touched the state directory"
[ -L /etc/systemd/system/multi-user.target.wants/bandsox.service ] && fail "the purge left the unit enabled"
assert_eq ok "$(guest 'echo ok')" "exec after the purge"
host_tree_untouched "after dpkg -P"
# With nothing mounted, purge removes the (empty) mount point it created.
rmdir "$VM" || fail "rmdir of the VM failed"
vmm=
"$BANDSOX" unmount "$PW/mnt"
wait_for 10 gone "$other" || fail "the tree's daemon did not exit after unmount"
pkg_op install3.log dpkg -i "$deb2"
pkg_op purge2.log dpkg -P bandsox
[ -e "$PW/mnt" ] && fail "the purge left the empty mount point $PW/mnt"
host_tree_untouched "at the end"

# 7. The systemd branch of the maintainer scripts' helper, without systemd: in a private
# mount namespace whose /run says systemd runs, with systemctl and deb-systemd-invoke
# replaced by recorders. An active, enabled unit is stopped and started again; an active
# but disabled one is stopped and left stopped, with a hint.
shim=$PW/shim
mkdir -p "$shim"
cat > "$shim/systemctl" <<EOS
#!/bin/bash
set -euo pipefail
echo "systemctl \$*" >> "$shim/log"
case "\$*" in
  *is-active*) [ -e "$shim/active" ] ;;
  *is-enabled*) [ -e "$shim/enabled" ] ;;
  *"show -p MainPID"*) echo 0 ;;
esac
EOS
cat > "$shim/deb-systemd-invoke" <<EOS
#!/bin/bash
set -euo pipefail
echo "deb-systemd-invoke \$*" >> "$shim/log"
case "\$1" in stop) rm -f "$shim/active" ;; start) touch "$shim/active" ;; esac
EOS
chmod +x "$shim/systemctl" "$shim/deb-systemd-invoke"
under_systemd() { # the helper's stop (prerm upgrade), then its restart (postinst)
  unshare -m bash -c 'set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/system
    PATH=$1:$PATH; "$2" stop upgrade; "$2" restart' _ "$shim" "$PKG_REPO/packaging/maint-daemons"
}
: > "$shim/log"; touch "$shim/active" "$shim/enabled"
out=$(under_systemd 2>&1) || fail "maint-daemons under systemd: $out"
assert_eq "deb-systemd-invoke stop bandsox.service|deb-systemd-invoke start bandsox.service" \
  "$(grep deb-systemd-invoke "$shim/log" | paste -sd'|')" "an enabled, active unit"
: > "$shim/log"; touch "$shim/active"; rm -f "$shim/enabled"
out=$(under_systemd 2>&1) || fail "maint-daemons under systemd: $out"
assert_eq "deb-systemd-invoke stop bandsox.service" "$(grep deb-systemd-invoke "$shim/log" | paste -sd'|')" "a disabled, active unit"
assert_contains "$out" "stays stopped: systemctl start bandsox.service" "the hint for a disabled unit"
: > "$shim/log"; rm -f "$shim/active"
out=$(under_systemd 2>&1) || fail "maint-daemons under systemd: $out"
grep -q deb-systemd-invoke "$shim/log" && fail "an inactive unit was stopped or started: $(cat "$shim/log")"
true
