#!/bin/bash
# Failures of import and pull: a clear message in ctl and events, errno, no partial
# image, and a running VM undisturbed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
need_tools
W=$IMG_WORK
new_vm t42vm
mk_rootfs "$W/rootfs"
tar -C "$W/rootfs" -czf "$W/root.tgz" .
mk_oci "$W/oci"

# expect_fail NAME COMMAND ERRNO_TEXT CTL_TEXT
expect_fail() {
  write_expect_error "$MNT/ctl" "$2" "$3"
  assert_contains "$(cat "$MNT/ctl")" "$4" "ctl after [$2]"
  no_partial "$1"
}

# A truncated (corrupt) gzip tarball.
head -c 300000 "$W/root.tgz" > "$W/corrupt.tgz"
expect_fail t42a "import t42a $W/corrupt.tgz" "Invalid argument" "error: import t42a:"
tail -n 20 "$MNT/events" | has "images/t42a import-failed" || fail "no import-failed event"

# Digest mismatch: a layer blob replaced by another valid (smaller) gzip tarball.
cp -a "$W/oci" "$W/bad"
blob=$(ls -S "$W/bad/blobs/sha256/" | head -n1)
mkdir -p "$W/tamper/etc"; echo evil > "$W/tamper/etc/passwd"
tar -C "$W/tamper" -czf "$W/bad/blobs/sha256/$blob" etc
expect_fail t42b "import t42b $W/bad tag=v1" "Invalid argument" "digest mismatch"
# A corrupted blob (one byte flipped): fails as corrupt or mismatched, never imported.
cp -a "$W/oci" "$W/flip"
printf 'X' | dd of="$W/flip/blobs/sha256/$blob" bs=1 seek=100 conv=notrunc status=none
expect_fail t42l "import t42l $W/flip tag=v1" "Invalid argument" "layer 1/1"

# A missing blob.
cp -a "$W/oci" "$W/missing"
rm "$W/missing/blobs/sha256/$blob"
expect_fail t42c "import t42c $W/missing tag=v1" "No such file" "missing"

# Not an image at all; a relative path; an unknown option; a taken name.
echo "just text" > "$W/text"
expect_fail t42d "import t42d $W/text" "Invalid argument" "not a tar archive"
expect_fail t42e "import t42e relative/path" "Invalid argument" "absolute path"
expect_fail t42f "import t42f $W/rootfs bogus=1" "Invalid argument" "accepted"
write_expect_error "$MNT/ctl" "import base $W/rootfs" "File exists"

# Path traversal in a rootfs tarball fails the import and writes nothing outside.
mkdir -p "$W/evil"; echo x > "$W/evil/f"
tar -C "$W/evil" -cf "$W/evil.tar" --transform 's,^\./f$,../../escaped,' ./f
expect_fail t42g "import t42g $W/evil.tar" "Invalid argument" "escapes"
[ ! -e "$STATE/images/escaped" ] && [ ! -e "$STATE/escaped" ] || fail "traversal wrote outside"

# Registry failures: unknown reference, unknown tag, tampered blob, registry down.
start_registry
push "$W/oci:v1" t/app:v1
expect_fail t42h "pull t42h $REG/t/nosuch:v1" "No such file" "error: pull t42h"
expect_fail t42i "pull t42i $REG/t/app:nosuchtag" "No such file" "error: pull t42i"
# A registry that serves a tampered layer (its storage edited behind its back, same size):
# the download fails its digest check and nothing enters the blob cache.
push "$W/oci:v1" t/tampered:v1
layer=$(find "$IMG_WORK/registry/data" -path '*/blobs/sha256/*/data' -size +100k | head -n1)
[ -n "$layer" ] || fail "no layer blob in the registry's storage"
printf 'X' | dd of="$layer" bs=1 seek=5000 conv=notrunc status=none
rm -rf "$STATE/cache"
expect_fail t42m "pull t42m $REG/t/tampered:v1" "Invalid argument" "digest"
tail -n 20 "$MNT/events" | has "images/t42m pull-failed" || fail "no pull-failed event"
ldigest=$(basename "$(dirname "$layer")")
! find "$STATE/cache" -name "*$ldigest*" 2>/dev/null | has . || fail "the tampered blob entered the cache"
kill "$REG_PID"; wait "$REG_PID" 2>/dev/null || true; REG_PID=""
expect_fail t42j "pull t42j $REG/t/app:v1" "No route to host" "cannot be reached"
tail -n 20 "$MNT/events" | has "images/t42j pull-failed" || fail "no pull-failed event"
expect_fail t42k "pull t42k Bad//Ref" "Invalid argument" "bad image reference"

# The VM ran through all of it.
assert_eq running "$(cat "$MNT/t42vm/state")"
assert_eq ok "$(run_in t42vm 'echo ok')"
note "failures are clean"
