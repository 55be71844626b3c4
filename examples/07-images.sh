#!/bin/bash
# Images: import a root filesystem tarball, look at its info, boot it, remove it.
# (For registries: echo 'pull NAME REFERENCE' > ctl — see docs/images.md.)
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
BB=${BANDSOX_BUSYBOX:-/var/cache/bandsox/busybox/bin/busybox}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A tiny root filesystem: busybox and a shell.
mkdir -p "$work/root/bin" "$work/root/etc"
cp "$BB" "$work/root/bin/busybox"
ln -s busybox "$work/root/bin/sh"
ln -s busybox "$work/root/bin/cat"
echo 'hello from an imported image' > "$work/root/etc/motd"
tar -C "$work/root" -czf "$work/root.tgz" .
echo "import demo7 $work/root.tgz headroom=16" > "$B/ctl"
cat "$B/ctl"                       # ok: image demo7 (rootfs-tar.gz, 1 layers, ... MiB disk, ... ms)
cat "$B/images/demo7/info"
echo 'create demo7vm image=demo7' > "$B/ctl"
echo 'cat /etc/motd' > "$B/demo7vm/exec"
cat "$B/demo7vm/exec"
rmdir "$B/demo7vm"
rmdir "$B/images/demo7"
