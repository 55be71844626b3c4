#!/bin/bash
# Helpers for the Debian package tests (t-63, t-65), sourced after lib.sh. They install the
# package on this host, so:
# - they refuse to run where a bandsox package is installed (or its conffiles remain):
#   they would replace and purge it;
# - the files a host set up with mount-helpers/setup may own (/sbin/mount.fuse.bandsox),
#   and /etc/default/bandsox, are kept and put back, and the package is purged, on exit;
# - the package's daemon gets a private mount point and state directory, $PW/mnt and
#   $PW/state, with this run's guest artefacts;
# - the host's own tree (/mnt/bandsox, as the README's first command mounts it) is watched:
#   `host_tree_untouched` fails when its daemon changed or it stopped answering. A dead
#   mount there (its daemon gone) is left alone and not watched.
# Needs cargo-deb (the test command's ensure-deps step installs it).
set -euo pipefail
PKG_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
command -v cargo-deb >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo-deb" ] \
  || fail "cargo-deb is not installed (mount-helpers/ensure-deps installs it)"
case "$(dpkg-query -W -f='${db:Status-Abbrev}' bandsox 2>/dev/null || true)" in
  ""|un*) ;;
  *) fail "a bandsox package is installed on this host ($(dpkg-query -W -f='${Version} ${db:Status-Abbrev}' bandsox)); this test would replace and purge it: run it elsewhere" ;;
esac

# The package's conffile would take over a limits file the host made by hand (and its purge
# would delete it under the host's daemon).
[ -e /etc/bandsox/limits ] && fail "this host has its own /etc/bandsox/limits, which the package's conffile would replace: move it away to run this test"

PW=$(mktemp -d /var/tmp/bandsox-pkg.XXXXXX)
mkdir -p "$PW/kept/sbin" "$PW/kept/default" "$PW/mnt" "$PW/state/images" "$PW/state/boot"
[ -e /sbin/mount.fuse.bandsox ] && cp -a /sbin/mount.fuse.bandsox "$PW/kept/sbin/"
[ -e /etc/default/bandsox ] && cp -a /etc/default/bandsox "$PW/kept/default/"
cp -a --reflink=auto "$STATE/boot/." "$PW/state/boot/"
cp -a --reflink=auto --sparse=always "$STATE/images/base" "$PW/state/images/"

HOST_MNT=/mnt/bandsox
HOST_DAEMON=
if "$PKG_REPO/packaging/maint-daemons" mounted "$HOST_MNT"; then
  HOST_DAEMON=$(pgrep -f "bandsox mount $HOST_MNT( |\$)" | head -n1 || true)
  if [ -n "$HOST_DAEMON" ] && ls "$HOST_MNT" >/dev/null 2>&1; then
    note "the host's $HOST_MNT is mounted (daemon pid $HOST_DAEMON): it must stay so"
  else
    # A daemon that died (or was killed with the session that started it) leaves a mount
    # that answers ENOTCONN. The package must install beside it all the same; there is no
    # live tree to watch.
    note "the host's $HOST_MNT is a dead mount (daemon ${HOST_DAEMON:-gone}): not watched"
    HOST_DAEMON=
  fi
fi

# host_tree_untouched WHEN: the host's tree, if it was mounted, still is, by the same
# daemon, and answers.
host_tree_untouched() {
  [ -n "$HOST_DAEMON" ] || return 0
  kill -0 "$HOST_DAEMON" 2>/dev/null || fail "$1: the daemon of $HOST_MNT (pid $HOST_DAEMON) is gone"
  "$PKG_REPO/packaging/maint-daemons" mounted "$HOST_MNT" || fail "$1: $HOST_MNT is no longer mounted"
  ls "$HOST_MNT" >/dev/null || fail "$1: $HOST_MNT does not answer"
}

# pkg_build [CARGO-DEB-OPTIONS]: build the package and print the path of a copy in $PW
# (cargo-deb removes the other versions' .deb files from target/debian/).
pkg_build() {
  local deb
  deb=$(cd "$PKG_REPO" && packaging/build-deb "$@") || fail "packaging/build-deb $* failed"
  cp "$deb" "$PW/" || fail "cannot copy $deb"
  echo "$PW/$(basename "$deb")"
}

# pkg_mounted: $PW/mnt is a mount point (asked of the mount table, never stat'ed).
pkg_mounted() { "$PKG_REPO/packaging/maint-daemons" mounted "$PW/mnt"; }

# pkg_daemon: the pid of the daemon serving $PW/mnt, if any.
pkg_daemon() { pgrep -f "bandsox mount $PW/mnt( |\$)" | head -n1 || true; }

pkg_restore() {
  local pid
  # The package's daemons go first (a purge would stop them too, and say so).
  for pid in $(pkg_daemon); do kill -TERM "$pid" 2>/dev/null; done
  sleep 0.5
  for pid in $(pkg_daemon); do kill -KILL "$pid" 2>/dev/null; done
  if pkg_mounted; then umount -l "$PW/mnt" 2>/dev/null; fi
  dpkg -P bandsox >/dev/null 2>&1
  rm -f /etc/default/bandsox
  [ -e "$PW/kept/default/bandsox" ] && cp -a "$PW/kept/default/bandsox" /etc/default/
  [ -e "$PW/kept/sbin/mount.fuse.bandsox" ] && cp -a "$PW/kept/sbin/mount.fuse.bandsox" /sbin/
  rm -rf "$PW"
}
on_exit pkg_restore
