#!/bin/bash
# A Debian minbase made with debootstrap boots, and dpkg sees its package database.
# debootstrap needs a Debian mirror (BANDSOX_DEBIAN_MIRROR) and about a minute, so the
# rootfs is built on the first run and cached as $BANDSOX_CACHE/debian-minbase-bookworm.tar.zst
# (delete it to rebuild). Run alone: tests/e2e/run.sh t-44
# timeout: 600
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
cache=${BANDSOX_CACHE:-/var/cache/bandsox}/debian-minbase-bookworm.tar.zst
if [ ! -s "$cache" ]; then
  command -v debootstrap >/dev/null || fail "debootstrap missing (run mount-helpers/ensure-deps)"
  mirror=${BANDSOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
  debootstrap --variant=minbase bookworm "$IMG_WORK/deb" "$mirror" > "$IMG_WORK/debootstrap.log" 2>&1 \
    || fail "debootstrap failed: $(tail -n 5 "$IMG_WORK/debootstrap.log")"
  tar -C "$IMG_WORK/deb" --numeric-owner --xattrs -cf - . | zstd -q -T0 -o "$cache.tmp" \
    && mv "$cache.tmp" "$cache" || fail "cannot write $cache"
  rm -rf "$IMG_WORK/deb"
fi
import_ok t44 "$cache"
create_vm t44a image=t44 memory=512
out=$(run_in t44a 'dpkg -l | grep -c "^ii"; apt-get --version | head -n1; . /etc/os-release; echo $VERSION_CODENAME')
n=$(echo "$out" | head -n1)
[ "$n" -gt 50 ] || fail "dpkg -l lists only [$n] packages: $out"
assert_contains "$out" "apt " "apt-get --version"
assert_contains "$out" "bookworm"
# apt reads the same database: its dependency check passes and it knows dpkg is installed.
out=$(run_in t44a 'apt-get check >/dev/null 2>&1 && echo check-ok; apt-cache policy dpkg | grep -c "Installed: [0-9]"')
assert_eq "$(printf 'check-ok\n1')" "$out" "apt sees the package database"
note "debian minbase: $n packages"
