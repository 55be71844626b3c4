#!/bin/bash
# A Debian minbase made with debootstrap boots, and dpkg sees its package database.
# debootstrap needs the network and minutes, so the rootfs is cached as
# $BANDSOX_CACHE/debian-minbase-bookworm.tar.zst; without that cache the test is skipped
# unless BANDSOX_E2E_DEBOOTSTRAP=1 (which builds it). Run alone: tests/e2e/run.sh t-44
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
cache=${BANDSOX_CACHE:-/var/cache/bandsox}/debian-minbase-bookworm.tar.zst
if [ ! -s "$cache" ]; then
  if [ "${BANDSOX_E2E_DEBOOTSTRAP:-0}" != 1 ]; then
    note "SKIP: no $cache (set BANDSOX_E2E_DEBOOTSTRAP=1 to build it)"
    exit 0
  fi
  command -v debootstrap >/dev/null || fail "debootstrap missing (run mount-helpers/setup)"
  mirror=${BANDSOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
  debootstrap --variant=minbase bookworm "$IMG_WORK/deb" "$mirror" > "$IMG_WORK/debootstrap.log" 2>&1 \
    || fail "debootstrap failed: $(tail -n 5 "$IMG_WORK/debootstrap.log")"
  tar -C "$IMG_WORK/deb" --numeric-owner --xattrs -cf - . | zstd -q -T0 -o "$cache.tmp" \
    && mv "$cache.tmp" "$cache"
  rm -rf "$IMG_WORK/deb"
fi
import_ok t44 "$cache"
create_vm t44a image=t44 memory=512
out=$(run_in t44a 'dpkg -l | grep -c "^ii"; apt-get --version | head -n1; . /etc/os-release; echo $VERSION_CODENAME')
n=$(echo "$out" | head -n1)
[ "$n" -gt 50 ] || fail "dpkg -l lists only [$n] packages: $out"
assert_contains "$out" "apt " "apt-get --version"
assert_contains "$out" "bookworm"
note "debian minbase: $n packages"
