#!/bin/bash
# create NAME image=REF pulls a registry reference that is not a local image (no prior
# pull), shows the pull in events, and boots it; a second create reuses the image.
# timeout: 240
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/images-lib.sh"
registry_with_test_image
push "$IMG_WORK/oci:v2" t/ref:v2
ref="$REG/t/ref:v2"
local_name=$(printf '%s' "$ref" | tr -c 'A-Za-z0-9._-' '_')
IMAGES="$local_name"
[ -d "$MNT/images/$local_name" ] && fail "image $local_name exists before the test"

create_vm t72 "image=$ref"
assert_eq running "$(cat "$MNT/t72/state")" "state"
[ -d "$MNT/images/$local_name" ] || fail "no image $local_name after create"
grep -q "images/$local_name pull-start" "$MNT/events" || fail "no pull-start event"
grep -q "t72 image-pull" "$MNT/events" || fail "no image-pull event on the VM"
out=$(run_in t72 'echo $GREETING; cat /etc/replaced')
assert_eq "$(printf 'v2\nnew')" "$out" "the pulled image's contents"
# Local names keep priority, and the pulled image is reused.
create_vm t72b "image=$ref"
assert_eq 1 "$(grep -c "images/$local_name pull-start" "$MNT/events")" "pulls of $ref"
rmdir "$MNT/t72" "$MNT/t72b"
# A bare unknown name is a local name: ENOENT at once.
write_expect_error "$MNT/ctl" "create t72c image=nosuch" "No such file or directory"
