#!/bin/bash
# import of every SOURCE kind: directory, rootfs tar (plain, gzip, zstd), ext4 file,
# OCI layout, oci-archive, docker-save; info JSON; the image config applied by the agent
# (Env, WorkingDir, User) and layer semantics (whiteouts, opaque dirs, hard links).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
need_tools

W=$IMG_WORK
mk_rootfs "$W/rootfs"
tar -C "$W/rootfs" -cf "$W/root.tar" .
gzip -c "$W/root.tar" > "$W/root.tar.gz"
zstd -q -c "$W/root.tar" > "$W/root.tar.zst"
mk_oci "$W/oci"
skopeo copy -q oci:"$W/oci:v2" oci-archive:"$W/img.oci.tar" >/dev/null
skopeo copy -q oci:"$W/oci:v2" docker-archive:"$W/save.tar:t/app:v2" >/dev/null

import_ok t40-dir "$W/rootfs"
assert_eq directory "$(info_field t40-dir kind)" "kind"
import_ok t40-tar "$W/root.tar" headroom=16
assert_eq rootfs-tar "$(info_field t40-tar kind)"
import_ok t40-tgz "$W/root.tar.gz"
assert_eq rootfs-tar.gz "$(info_field t40-tgz kind)"
import_ok t40-tzst "$W/root.tar.zst"
assert_eq rootfs-tar.zst "$(info_field t40-tzst kind)"
cp --sparse=always "$STATE/images/t40-tar/disk.ext4" "$W/disk.ext4"
import_ok t40-ext4 "$W/disk.ext4"
assert_eq ext4 "$(info_field t40-ext4 kind)"
write_expect_error "$MNT/ctl" "import t40-oci $W/oci" "Invalid argument"
assert_contains "$(cat "$MNT/ctl")" "choose one with tag=NAME" "layout with two tags"
import_ok t40-oci "$W/oci" tag=v2
assert_eq oci-layout "$(info_field t40-oci kind)"
assert_eq 3 "$(info_field t40-oci layers)" "layers of v2"
assert_contains "$(info_field t40-oci digest)" "sha256:"
import_ok t40-ociar "$W/img.oci.tar"
assert_eq oci-archive "$(info_field t40-ociar kind)"
import_ok t40-save "$W/save.tar"
assert_eq docker-save "$(info_field t40-save kind)"
assert_contains "$(info_field t40-save reference)" "t/app:v2" "docker-save tag"
info=$(cat "$MNT/images/t40-save/info")
for want in '"WorkingDir": "/srv/app"' '"User": "app"' '"GREETING=v2"' '"Entrypoint": [' '"created": "'; do
  assert_contains "$info" "$want" "images/t40-save/info"
done
grep -q '"size": [1-9]' "$MNT/images/t40-save/info" || fail "no size in info"
tail -n 200 "$MNT/events" | has "images/t40-save import-progress layer=3/3" || fail "no layer progress events"
tail -n 200 "$MNT/events" | has "images/t40-save imported kind=docker-save layers=3" || fail "no imported event"
note "all source kinds imported"

# A rootfs import boots (no image config: root in /).
create_vm t40a image=t40-tgz
assert_eq "0 /" "$(run_in t40a 'echo $(id -u) $(pwd)')"
assert_eq "old" "$(run_in t40a 'cat /etc/replaced')"
run_in t40a 'test "$(stat -c %i /bin/busybox)" = "$(stat -c %i /bin/hardbb)" && echo same' | has same \
  || fail "hard link lost"

# disk=MiB grows the VM's own copy (offline resize2fs); the image itself keeps its size.
img_mib=$(( $(stat -c %s "$STATE/images/t40-tar/disk.ext4") >> 20 ))
create_vm t40c image=t40-tar disk=$((img_mib + 300))
fs_mib=$(run_in t40c 'df -m / | tail -n1' | awk '{print $2}')
[ "$fs_mib" -gt $((img_mib + 200)) ] || fail "disk=$((img_mib + 300)) gave a ${fs_mib} MiB filesystem (image ${img_mib} MiB)"
assert_eq "$img_mib" "$(( $(stat -c %s "$STATE/images/t40-tar/disk.ext4") >> 20 ))" "image size unchanged"
run_in t40c 'head -c 100000000 /dev/zero > /big && sync && echo wrote' | has -x wrote || fail "cannot use the grown disk"
rmdir "$MNT/t40c"
write_expect_error "$MNT/ctl" "create t40d image=t40-tar disk=1" "Invalid argument"
[ ! -e "$MNT/t40d" ] || fail "a VM with a too small disk was created"

# The docker-save image: config applied, layers merged with whiteouts.
create_vm t40b image=t40-save
out=$(run_in t40b 'echo uid=$(id -u) gid=$(id -g) groups="$(id -G)" pwd=$(pwd) g=$GREETING home=$HOME')
assert_eq "uid=1000 gid=1000 groups=1000 50 pwd=/srv/app g=v2 home=/home/app" "$out" "image config in exec"
assert_eq "new" "$(run_in t40b 'cat /etc/replaced')" "replaced file"
run_in t40b 'test -e /etc/removed && echo present || echo absent' | has -x absent || fail "whiteout not applied"
assert_eq "fresh" "$(run_in t40b 'ls /data')" "opaque dir keeps only the upper layer's entry"
run_in t40b 'test -e /.wh..wh..opq -o -e /data/.wh..wh..opq -o -e /etc/.wh.removed && echo leak || echo clean' \
  | has -x clean || fail "whiteout files leaked into the image"
# Files the image user cannot touch stay protected (the user really is app).
run_in t40b 'touch /root/x 2>&1 || echo denied' | has denied || fail "exec did not drop root"

# rmdir: busy while used, then removable; base is protected as the default image.
err=$( { rmdir "$MNT/images/t40-save"; } 2>&1 ) && fail "rmdir of a used image succeeded"
assert_contains "$err" "busy" "rmdir of a used image"
err=$( { rmdir "$MNT/images/base"; } 2>&1 ) && fail "rmdir of the default image succeeded"
rmdir "$MNT/t40b"
rmdir "$MNT/images/t40-save" || fail "rmdir of an unused image failed"
[ ! -e "$MNT/images/t40-save" ] || fail "image still listed"
[ ! -e "$STATE/images/t40-save" ] || fail "image files left"
note "config, whiteouts, rmdir ok"
